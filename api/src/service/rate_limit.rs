//! Hard per-key rate limits: fixed UTC minute windows counted by an atomic upsert.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};

use crate::store::rate_limits;

/// The quota scope of batch creation.
pub const SCOPE_BATCH: &str = "batch";
/// The quota scope of every other customer call.
pub const SCOPE_READ: &str = "read";

/// The budget of calls that carry no valid key, per client address (see `service::strangers`).
pub const SCOPE_UNAUTHENTICATED: &str = "unauthenticated";

/// The quota scope a customer call counts against: creating a batch is `batch`, every other
/// customer call `read`. The one place that decides it.
pub fn scope_of(method: &poem::http::Method, path: &str) -> &'static str {
    if method == poem::http::Method::POST && path.trim_end_matches('/').ends_with("/video-batch") {
        SCOPE_BATCH
    } else {
        SCOPE_READ
    }
}

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
    fn after(scope: &'static str, limit: u32, count: i64, now: DateTime<Utc>) -> Self {
        Self {
            scope,
            limit,
            remaining: (i64::from(limit) - count).max(0) as u32,
            reset_secs: reset_secs(now),
            exceeded: count > i64::from(limit),
        }
    }

    /// The per-address budget of unauthenticated calls, used up.
    pub fn strangers_exhausted(limit: u32, retry_after: u32) -> Self {
        Self {
            scope: SCOPE_UNAUTHENTICATED,
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

fn window_start(now: DateTime<Utc>) -> i64 {
    now.timestamp() - now.timestamp().rem_euclid(60)
}

fn reset_secs(now: DateTime<Utc>) -> u32 {
    (60 - now.timestamp().rem_euclid(60)) as u32
}

/// Counts one call and tells whether it is admitted. One statement, atomic on both backends:
/// under any concurrency and on any number of nodes exactly `limit` calls are admitted.
pub async fn hit<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    scope: &'static str,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<RateInfo, DbErr> {
    let count = rate_limits::increment(db, key_id, scope, window_start(now)).await?;
    Ok(RateInfo::after(scope, limit, count, now))
}

/// The quota state without counting a call (for refused calls that use no quota).
pub async fn peek<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    scope: &'static str,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<RateInfo, DbErr> {
    let count = rate_limits::count(db, key_id, scope, window_start(now)).await?;
    // Peeking counts nothing, so nothing is refused.
    Ok(RateInfo {
        exceeded: false,
        ..RateInfo::after(scope, limit, count, now)
    })
}

/// Deletes windows that ended more than a minute ago.
pub async fn prune<C: ConnectionTrait>(db: &C, now: DateTime<Utc>) -> Result<u64, DbErr> {
    rate_limits::delete_before(db, window_start(now) - 60).await
}
