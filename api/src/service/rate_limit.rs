//! Hard rate limits per account (across all its keys), and per key where a key has its own
//! tighter limit: fixed UTC minute windows counted by an atomic upsert.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};
use serde_json::json;

use crate::call::PendingQuota;
use crate::domain::error_code::ErrorCode;
use crate::domain::ids::{AccountId, KeyId};
use crate::domain::usage::UsageRow;
use crate::error::ApiError;
use crate::store::commit::{UnitFuture, Writes};
use crate::store::rate_limits;
use crate::store::unit::Txn;

pub use crate::domain::quota::{SCOPE_BATCH, SCOPE_READ, SCOPE_REFUSED, SCOPE_UNAUTHENTICATED};

/// The quota scope a customer call counts against: creating a batch (a create, or a retry of
/// failed items) is `batch`, every other
/// customer call `read`. The one place that decides it.
pub fn scope_of(method: &poem::http::Method, path: &str) -> &'static str {
    let path = path.trim_end_matches('/');
    // A retry of failed items creates a batch: the same quota as a create.
    if method == poem::http::Method::POST
        && (path.ends_with("/video-batch")
            || (path.contains("/video-batch/") && path.ends_with("/retry-failed")))
    {
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
    account: AccountId,
    scope: &'static str,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<RateInfo, ApiError> {
    let count = writes.hit(account.0, scope, window_start(now)).await?;
    Ok(RateInfo::after(scope, limit, count, now))
}

/// The window scope of a key's own limit for a call of `scope` (apart from its account's
/// windows, which count the same scope names under the account's id).
fn key_scope(scope: &'static str) -> &'static str {
    if scope == SCOPE_BATCH {
        "key_batch"
    } else {
        "key_read"
    }
}

/// Counts one call against its key's own limit (a key tighter than its account), like
/// [`admit`].
pub async fn admit_key(
    writes: &Writes,
    key_id: KeyId,
    scope: &'static str,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<RateInfo, ApiError> {
    let count = writes
        .hit(key_id.0, key_scope(scope), window_start(now))
        .await?;
    Ok(RateInfo::after(scope, limit, count, now))
}

/// What the quota headers report for a call counted against its account and its key's own
/// limit: the quota with fewer calls left (the account's when it was exceeded).
pub fn tighter(account: RateInfo, own: Option<RateInfo>) -> RateInfo {
    match own {
        Some(own) if !account.exceeded && own.remaining < account.remaining => own,
        _ => account,
    }
}

/// Counts a call that changed nothing (a read, or a create refused before writing) and writes
/// its audit row in the same group commit: `admitted` as given when the call is within the
/// quota, else as the 429 it becomes, which carries `refused_request_id` (a refused call is
/// refused before its body is read). One commit instead of two (count, then row), and the
/// limit stays exact: the count is the same atomic upsert in arrival order. Returns the quota
/// after the call and, apart, whether the row was written.
pub async fn admit_and_audit(
    writes: &Writes,
    account: AccountId,
    quota: &PendingQuota,
    admitted: UsageRow,
    refused_request_id: String,
) -> Result<(RateInfo, Result<(), ApiError>), ApiError> {
    let &PendingQuota {
        scope, limit, at, ..
    } = quota;
    let row = move |count: i64| {
        if count > i64::from(limit) {
            UsageRow {
                request_id: Some(refused_request_id.clone()),
                status: 429,
                error_code: Some(ErrorCode::RateLimitExceeded.as_str().to_string()),
                batch_id: None,
                items: 0,
                credits: 0,
                ..admitted.clone()
            }
        } else {
            admitted.clone()
        }
    };
    let (count, audited) = writes
        .hit_and_audit(account.0, scope, window_start(at), row, at)
        .await?;
    Ok((RateInfo::after(scope, limit, count, at), audited))
}

/// Counts a call that writes and runs its `work` in the same group commit when it is within the
/// quota (nothing runs when it is over): one commit for both. Returns the quota after the call
/// and the work's output (`None`: refused).
pub async fn admit_and_run<T, F>(
    writes: &Writes,
    account: AccountId,
    quota: &PendingQuota,
    work: F,
) -> Result<(RateInfo, Option<T>), ApiError>
where
    T: Send + 'static,
    F: for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, T> + Send + 'static,
{
    let &PendingQuota {
        scope, limit, at, ..
    } = quota;
    let (count, out) = writes
        .run_counted(account.0, scope, window_start(at), limit, work)
        .await?;
    Ok((RateInfo::after(scope, limit, count, at), out))
}

/// The 429 of a call over its account's quota or its key's own (`per`: `account` or `key`;
/// counted in the rejection metric). It carries the call's `x-request-id`, never a request id
/// read from its body: the quota comes first.
pub fn refusal(key: &str, info: &RateInfo, per: &'static str) -> ApiError {
    crate::context::set_call_request_id(None);
    metrics::counter!("rate_limit_rejections_total", "key" => key.to_string(), "scope" => info.scope)
        .increment(1);
    tracing::info!(key, scope = info.scope, "rate limit exceeded");
    let (limit, scope) = (info.limit, info.scope);
    let whose = if per == "key" {
        "this key's own"
    } else {
        "the account's"
    };
    ApiError::new(
        ErrorCode::RateLimitExceeded,
        format!(
            "{whose} rate limit of {limit} {scope} calls per minute exceeded; retry in {}s",
            info.reset_secs
        ),
    )
    .with_details(json!({
        "limit": limit,
        "scope": scope,
        "reset_seconds": info.reset_secs,
        "applies_to": per,
    }))
    .with_header("Retry-After", info.reset_secs.to_string())
}

/// Counts one call in `db` (outside the pipeline: the benchmark's one-commit-per-create loop)
/// and tells whether it is admitted. One statement, atomic on both backends: under any
/// concurrency and on any number of nodes exactly `limit` calls are admitted.
pub async fn hit<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    scope: &'static str,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<RateInfo, DbErr> {
    let count = rate_limits::increment(db, account, scope, window_start(now)).await?;
    Ok(RateInfo::after(scope, limit, count, now))
}

/// Deletes windows that ended more than a minute ago.
pub async fn prune<C: ConnectionTrait>(db: &C, now: DateTime<Utc>) -> Result<u64, DbErr> {
    rate_limits::delete_before(db, window_start(now) - 60).await
}
