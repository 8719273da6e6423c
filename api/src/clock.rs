//! The service's "now": the system clock, or a time a test has frozen, so that tests which
//! count calls against a one-minute window (or ask for "today") never race the wall clock.
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};

/// Where rate-limit windows, audit minutes and "today" come from. Clones share one clock:
/// freezing it freezes every holder's "now".
#[derive(Debug, Default, Clone)]
pub struct Clock {
    frozen: Arc<ArcSwapOption<DateTime<Utc>>>,
}

/// Test-only: a process started with this variable set to an RFC 3339 time runs with its clock
/// frozen there (see [`Clock::from_env`]), so that tests driving the real binary, several
/// nodes at once, count calls against one window they chose instead of racing the minute.
/// Nothing but tests sets it; it is not a setting and is not documented for operators.
pub const TEST_FROZEN_CLOCK_ENV: &str = "VB_TEST_FROZEN_CLOCK";

impl Clock {
    /// The system clock, or (tests only) the time in [`TEST_FROZEN_CLOCK_ENV`]; a value that is
    /// not an RFC 3339 time is refused, so a test never runs on the wall clock by mistake.
    pub fn from_env() -> Result<Clock, String> {
        let clock = Clock::default();
        if let Ok(at) = std::env::var(TEST_FROZEN_CLOCK_ENV) {
            let at = DateTime::parse_from_rfc3339(&at)
                .map_err(|e| format!("{TEST_FROZEN_CLOCK_ENV}={at:?}: {e}"))?;
            clock.freeze(at.with_timezone(&Utc));
        }
        Ok(clock)
    }

    /// The current time: frozen if a test froze it, else the system clock.
    pub fn now(&self) -> DateTime<Utc> {
        match self.frozen.load().as_deref() {
            Some(t) => *t,
            None => Utc::now(),
        }
    }

    /// Stops the clock at `at` (tests).
    pub fn freeze(&self, at: DateTime<Utc>) {
        self.frozen.store(Some(Arc::new(at)));
    }

    /// Lets the clock run again.
    pub fn unfreeze(&self) {
        self.frozen.store(None);
    }
}
