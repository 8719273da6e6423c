//! Hard per-key rate limits: fixed UTC minute windows counted by an atomic upsert.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};

use crate::error::ApiError;
use crate::store::pipeline::Writes;
use crate::store::rate_limits;

pub use crate::domain::quota::{SCOPE_BATCH, SCOPE_READ, SCOPE_UNAUTHENTICATED};

/// The quota scope a customer call counts against: creating a batch is `batch`, every other
/// customer call `read`. The one place that decides it.
pub fn scope_of(method: &poem::http::Method, path: &str) -> &'static str {
    if method == poem::http::Method::POST && path.trim_end_matches('/').ends_with("/video-batch") {
        SCOPE_BATCH
    } else {
        SCOPE_READ
    }
}

pub use crate::domain::quota::RateInfo;

fn window_start(now: DateTime<Utc>) -> i64 {
    now.timestamp() - now.timestamp().rem_euclid(60)
}

/// Counts one call through the write pipeline and tells whether it is admitted, once the
/// count is committed. The hits of a group are one upsert, admitted in arrival order, so under
/// any concurrency and on any number of nodes exactly `limit` calls are admitted.
pub async fn admit(
    writes: &Writes,
    key_id: i64,
    scope: &'static str,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<RateInfo, ApiError> {
    let count = writes.hit(key_id, scope, window_start(now)).await?;
    Ok(RateInfo::after(scope, limit, count, now))
}

/// Counts one call in `db` (outside the pipeline: the benchmark's one-commit-per-create loop)
/// and tells whether it is admitted. One statement, atomic on both backends: under any
/// concurrency and on any number of nodes exactly `limit` calls are admitted.
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
