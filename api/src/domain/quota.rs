//! The state of a key's per-minute quota, as the rate limiter decides it and the
//! `X-RateLimit-*` headers report it.
use chrono::{DateTime, Utc};

/// The quota scope of batch creation.
pub const SCOPE_BATCH: &str = "batch";
/// The quota scope of every other customer call.
pub const SCOPE_READ: &str = "read";
/// The budget of calls that carry no valid key, per client address (see the strangers module).
pub const SCOPE_UNAUTHENTICATED: &str = "unauthenticated";
/// The budget of a valid key's refused calls (address not allowed, body too large or too
/// slow), per key and client address (see the strangers module).
pub const SCOPE_REFUSED: &str = "refused";

/// The state of a key's quota after a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateInfo {
    /// `batch` or `read`.
    pub scope: &'static str,
    /// Calls allowed per window.
    pub limit: u32,
    /// Calls left in this window.
    pub remaining: u32,
    /// Seconds until the window ends.
    pub reset_secs: u32,
    /// This call was refused.
    pub exceeded: bool,
}

impl RateInfo {
    /// The quota once `count` calls were counted in the window of `now`.
    pub fn after(scope: &'static str, limit: u32, count: i64, now: DateTime<Utc>) -> Self {
        Self {
            scope,
            limit,
            remaining: (i64::from(limit) - count).max(0) as u32,
            reset_secs: reset_secs(now),
            exceeded: count > i64::from(limit),
        }
    }

    /// A budget of refused calls (`unauthenticated` or `refused`), used up.
    pub fn budget_exhausted(scope: &'static str, limit: u32, retry_after: u32) -> Self {
        Self {
            scope,
            limit,
            remaining: 0,
            reset_secs: retry_after,
            exceeded: true,
        }
    }

    /// A view of an untouched quota (calls that consumed none).
    pub fn untouched(scope: &'static str, limit: u32, now: DateTime<Utc>) -> Self {
        Self {
            scope,
            limit,
            remaining: limit,
            reset_secs: reset_secs(now),
            exceeded: false,
        }
    }
}

/// Seconds until the UTC minute window of `now` ends.
pub fn reset_secs(now: DateTime<Utc>) -> u32 {
    (60 - now.timestamp().rem_euclid(60)) as u32
}
