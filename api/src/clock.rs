//! The service's "now": the system clock, or a time a test has frozen, so that tests which
//! count calls against a one-minute window (or ask for "today") never race the wall clock.
use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};

/// Where rate-limit windows, audit minutes and "today" come from.
#[derive(Debug, Default)]
pub struct Clock {
    frozen: ArcSwapOption<DateTime<Utc>>,
}

impl Clock {
    /// The current time: frozen if a test froze it, else the system clock.
    pub fn now(&self) -> DateTime<Utc> {
        match self.frozen.load().as_deref() {
            Some(t) => *t,
            None => Utc::now(),
        }
    }

    /// Stops the clock at `at` (tests).
    pub fn freeze(&self, at: DateTime<Utc>) {
        self.frozen.store(Some(std::sync::Arc::new(at)));
    }

    /// Lets the clock run again.
    pub fn unfreeze(&self) {
        self.frozen.store(None);
    }
}
