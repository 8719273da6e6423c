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
        self.frozen.store(Some(Arc::new(at)));
    }

    /// Lets the clock run again.
    pub fn unfreeze(&self) {
        self.frozen.store(None);
    }
}
