//! The worker side: fair, exclusive claims under leases; heartbeat, complete and fail reports
//! that settle each item's credits exactly once.
use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use uuid::Uuid;

use crate::domain::failure::FailureCode;
use crate::domain::ids::AccountId;
use crate::domain::ids::{ItemId, LeaseToken};
use crate::error::ApiError;
use crate::schemas::batches::{BatchStatus, ItemStatus};
use crate::schemas::worker::{ClaimedItem, FailRequest, ItemState};
use crate::service::batches::finalize_if_done;
use crate::service::credits::{self, LedgerKind, NewEntry};
use crate::state::Runtime;
use crate::store::commit::Writes;
use crate::store::unit::Txn;
use crate::store::{items, jobs};

/// Leases up to `max` queued items to `worker_id`, in fair order: items carry a position from
/// start-time fair queuing, so a small batch of one key is interleaved with the head of a huge
/// batch of another instead of waiting behind it. Expired leases are requeued first (those
/// another transaction holds are left to the next claim or to the reaper).
pub async fn claim(
    writes: &Writes,
    runtime: Arc<Runtime>,
    worker_id: &str,
    max: u32,
    lease: Duration,
) -> Result<Vec<ClaimedItem>, ApiError> {
    let worker_id = worker_id.to_string();
    writes
        .run(None, move |txn| {
            let worker_id = worker_id.clone();
            let runtime = Arc::clone(&runtime);
            Box::pin(async move {
                let max_attempts = runtime.settings.worker.max_attempts;
                claim_in(
                    txn,
                    &worker_id,
                    max,
                    lease,
                    max_attempts,
                    &runtime.running_caps,
                )
                .await
            })
        })
        .await
}

/// The claim's unit of work (in the pipeline's transaction; the benchmark runs it alone).
pub async fn claim_in(
    txn: &Txn<'_>,
    worker_id: &str,
    max: u32,
    lease: Duration,
    max_attempts: u32,
    caps: &HashMap<i64, u32>,
) -> Result<Vec<ClaimedItem>, ApiError> {
    let now = Utc::now();
    let lease = items::Lease {
        token: Uuid::new_v4(),
        worker_id,
        expires_at: now + lease,
    };
    let want = u64::from(max.clamp(1, 1000));
    // A claim skips the item rows other transactions hold; only the update of its batches'
    // counts may wait for a batch row (see `items::claim`).
    let mut rows = if caps.is_empty() {
        items::claim(txn, lease, want, max_attempts as i32, now).await?
    } else {
        items::requeue_expired(txn, now, max_attempts as i32).await?;
        let rows = crate::service::fair_share::lease_capped(txn, lease, want, caps, now).await?;
        let mut batches: Vec<Uuid> = rows.iter().map(|r| r.batch_id).collect();
        batches.sort();
        batches.dedup();
        jobs::mark_processing(txn, &batches, now).await?;
        rows
    };
    metrics::counter!("worker_claims_total").increment(1);
    metrics::counter!("worker_claimed_items_total").increment(rows.len() as u64);
    rows.sort_by_key(|r| (r.fair_pos, r.id));
    Ok(rows
        .into_iter()
        .map(|r| ClaimedItem {
            item_id: r.id,
            batch_id: r.batch_id,
            lease_token: lease.token,
            lease_expires_at: lease.expires_at,
            prompt: r.prompt,
            params: r.params.and_then(|p| serde_json::from_str(&p).ok()),
            attempt: r.attempts,
        })
        .collect())
}

/// The lane an item's report runs in: its key's, so that the report is ordered with the key's
/// other writes and takes its row locks in the group's key order. Unknown items are 404.
/// Where writes take no row locks (SQLite: one writer, one lane) the key decides nothing and
/// is not read; an unknown item is then 404 from the report's own unit.
async fn lane_of(
    db: &DatabaseConnection,
    writes: &Writes,
    item_id: Uuid,
) -> Result<Option<i64>, ApiError> {
    if !writes.orders_by_key() {
        return Ok(None);
    }
    items::key_of(db, item_id)
        .await?
        .map(Some)
        .ok_or_else(|| ApiError::not_found("item", item_id))
}

/// What one pass of the lease reaper did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Items put back in the queue.
    pub requeued: u64,
    /// Items settled for good: failed (last attempt) or cancelled (batch cancel requested).
    pub settled: u64,
    /// Rows that could not be settled this pass (logged and skipped).
    pub skipped: u64,
}

/// The lease reaper, run in the background whether or not anyone claims: requeues expired
/// leases, fails and releases expired last attempts, cancels and releases expired leases of
/// batches with a cancel request, and finalizes the batches this completes. A row that fails
/// is logged and skipped. Safe on several nodes: each row is settled under its batch's lock
/// and its lease token, so a second node finds the lease gone and moves on.
pub async fn reap_expired(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: &Arc<Runtime>,
) -> Result<Reaped, ApiError> {
    let now = Utc::now();
    let max_attempts = runtime.settings.worker.max_attempts;
    let mut reaped = Reaped {
        requeued: writes
            .run(None, move |txn| {
                Box::pin(
                    async move { Ok(items::requeue_expired(txn, now, max_attempts as i32).await?) },
                )
            })
            .await?,
        ..Default::default()
    };
    for items::Expired {
        id,
        key_id: key,
        token,
    } in items::expired_leases(db, now, 200).await?
    {
        let Some(token) = token else { continue };
        // As of the lease's end: a late report with the same token is already stale. Retryable,
        // so that a cancel request turns it into `cancelled`; with no attempt left it fails.
        let at = now - Duration::days(36500);
        let result = writes
            .run(Some(key), {
                let runtime = Arc::clone(runtime);
                move |txn| {
                    let runtime = Arc::clone(&runtime);
                    Box::pin(async move {
                        let report = Reported {
                            token: LeaseToken(token),
                            code: FailureCode::WorkerLost,
                            message: items::LEASE_EXPIRED.to_string(),
                            retryable: true,
                        };
                        fail_in(txn, &runtime, ItemId(id), &report, at).await
                    })
                }
            })
            .await;
        match result {
            Ok(_) => reaped.settled += 1,
            Err(e) if e.code == crate::error::ErrorCode::LeaseLost => {}
            Err(e) => {
                reaped.skipped += 1;
                tracing::error!(item_id = %id, error = %e, "reaping an expired lease failed; skipped");
            }
        }
    }
    Ok(reaped)
}

/// The batch of an item, locked for the transition (batch row first, then item: the same
/// order as cancel, so the two never deadlock).
struct LockedBatch {
    id: Uuid,
    account: AccountId,
    cost: i64,
    cancel_requested: bool,
    status: BatchStatus,
    /// Items still open (queued or running) before this transition.
    open: i64,
}

async fn lock_batch_of(
    txn: &Txn<'_>,
    item_id: Uuid,
    now: DateTime<Utc>,
) -> Result<LockedBatch, ApiError> {
    let b = jobs::lock_of_item(txn, item_id, now)
        .await?
        .ok_or_else(|| ApiError::not_found("item", item_id))?;
    Ok(LockedBatch::from(b))
}

impl From<jobs::LockedJob> for LockedBatch {
    fn from(b: jobs::LockedJob) -> Self {
        LockedBatch {
            id: b.id,
            account: AccountId(b.key_id),
            cost: b.cost_per_video,
            cancel_requested: b.cancel_requested,
            status: BatchStatus::from(b.status),
            open: b.open,
        }
    }
}

impl LockedBatch {
    /// Finalizes the batch when this transition closed its last open item; returns its status.
    async fn settle(
        &self,
        txn: &Txn<'_>,
        runtime: &Runtime,
        now: DateTime<Utc>,
    ) -> Result<BatchStatus, ApiError> {
        if self.open <= 1
            && let Some(job) = finalize_if_done(txn, runtime, self.id, now).await?
        {
            return Ok(BatchStatus::from(job.status));
        }
        Ok(self.current())
    }

    /// The status while an item of it was running (claims mark batches processing just after).
    fn current(&self) -> BatchStatus {
        match self.status {
            BatchStatus::Queued => BatchStatus::Processing,
            other => other,
        }
    }
}

async fn batch_status<C: ConnectionTrait>(db: &C, batch_id: Uuid) -> Result<BatchStatus, ApiError> {
    Ok(jobs::by_id(db, batch_id)
        .await?
        .map(|b| BatchStatus::from(b.status))
        .unwrap_or(BatchStatus::Queued))
}

/// Extends a live lease.
pub async fn heartbeat(
    db: &DatabaseConnection,
    writes: &Writes,
    item: ItemId,
    token: LeaseToken,
    lease: Duration,
) -> Result<ItemState, ApiError> {
    let key = lane_of(db, writes, item.0).await?;
    writes
        .run(key, move |txn| {
            Box::pin(async move { heartbeat_in(txn, item, token, lease).await })
        })
        .await
}

async fn heartbeat_in(
    txn: &Txn<'_>,
    item: ItemId,
    token: LeaseToken,
    lease: Duration,
) -> Result<ItemState, ApiError> {
    let item_id = item.0;
    let now = Utc::now();
    let expires = now + lease;
    let Some((batch_id, attempts)) = items::extend_lease(txn, item, token, expires, now).await?
    else {
        return Err(lease_error(txn, item_id).await);
    };
    Ok(ItemState {
        item_id,
        status: ItemStatus::Running,
        attempts,
        lease_expires_at: Some(expires),
        batch_status: batch_status(txn, batch_id).await?,
    })
}

async fn lease_error<C: ConnectionTrait>(db: &C, item_id: Uuid) -> ApiError {
    match items::exists(db, item_id).await {
        Ok(true) => ApiError::lease_lost(item_id),
        Ok(false) => ApiError::not_found("item", item_id),
        Err(e) => e.into(),
    }
}

/// Reports success: the item's cost moves from held to charged, exactly once.
pub async fn complete(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: Arc<Runtime>,
    item: ItemId,
    token: LeaseToken,
    result_url: String,
    result: Option<String>,
) -> Result<ItemState, ApiError> {
    let key = lane_of(db, writes, item.0).await?;
    writes
        .run(key, move |txn| {
            let (runtime, result_url, result) =
                (Arc::clone(&runtime), result_url.clone(), result.clone());
            Box::pin(
                async move { complete_in(txn, &runtime, item, token, &result_url, result).await },
            )
        })
        .await
}

/// The success report's unit of work (in the pipeline's transaction; the benchmark runs it
/// alone).
pub async fn complete_in(
    txn: &Txn<'_>,
    runtime: &Runtime,
    item: ItemId,
    token: LeaseToken,
    result_url: &str,
    result: Option<String>,
) -> Result<ItemState, ApiError> {
    let item_id = item.0;
    let now = Utc::now();
    // Recorded only for a live lease of this token: a stale or unknown report changes nothing.
    let (batch, attempts) =
        match jobs::record_success(txn, item, token, result_url, result, now).await? {
            jobs::Success::Recorded { job, attempts } => (LockedBatch::from(job), attempts),
            jobs::Success::Stale => return Err(lease_error(txn, item_id).await),
            // The lease ended in between: the count is rolled back with this unit.
            jobs::Success::Raced => return Err(ApiError::lease_lost(item_id)),
        };
    let charge =
        NewEntry::new(batch.account.0, LedgerKind::Charge, batch.cost).item(batch.id, item_id);
    if !credits::apply_in(txn, charge).await? {
        return Err(ApiError::internal(format!(
            "charge failed for item {item_id}: held too small"
        )));
    }
    crate::service::webhooks::enqueue_item_event(
        txn,
        runtime,
        batch.account,
        batch.id,
        item_id,
        "item.succeeded",
        now,
    )
    .await?;
    let batch_status = batch.settle(txn, runtime, now).await?;
    Ok(ItemState {
        item_id,
        status: ItemStatus::Succeeded,
        attempts,
        lease_expires_at: None,
        batch_status,
    })
}

/// A failure as a worker reported it, with the defaults applied.
#[derive(Clone, Debug)]
pub struct Reported {
    pub token: LeaseToken,
    pub code: FailureCode,
    pub message: String,
    pub retryable: bool,
}

impl Reported {
    /// The report of a `fail` call: `message` (or its older name `error`; not both), the code
    /// (`internal` when not sent), and `retryable` (by default the code's). A report without a
    /// code and without a message says nothing and is refused.
    pub fn from_request(req: FailRequest) -> Result<Self, ApiError> {
        let message = match (req.message, req.error) {
            (Some(_), Some(_)) => {
                return Err(ApiError::validation(
                    "error",
                    "send the message once, as `message` (`error` is its older name)",
                ));
            }
            (Some(m), None) | (None, Some(m)) => Some(m.into_string()),
            (None, None) => None,
        };
        if req.error_code == Some(FailureCode::Expired) {
            return Err(ApiError::validation(
                "error_code",
                "`expired` is given by the service when a completion window ends; report what \
                 happened to the item (e.g. `render_timeout`, `internal`)",
            ));
        }
        let (code, message) = match (req.error_code, message) {
            (Some(code), message) => (code, message.unwrap_or_else(|| code.as_str().to_string())),
            (None, Some(message)) => (FailureCode::Internal, message),
            (None, None) => {
                return Err(ApiError::validation(
                    "error_code",
                    "say what failed: send `error_code` and, ideally, a `message`",
                ));
            }
        };
        Ok(Self {
            token: LeaseToken(req.lease_token),
            retryable: req.retryable.unwrap_or(code.retryable_by_default()),
            code,
            message,
        })
    }
}

/// Reports failure: requeued while attempts remain and the error is retryable (and the batch
/// is not being cancelled); otherwise final, with the item's hold released.
pub async fn fail(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: Arc<Runtime>,
    item: ItemId,
    report: Reported,
) -> Result<ItemState, ApiError> {
    let key = lane_of(db, writes, item.0).await?;
    writes
        .run(key, move |txn| {
            let (runtime, report) = (Arc::clone(&runtime), report.clone());
            Box::pin(async move { fail_in(txn, &runtime, item, &report, Utc::now()).await })
        })
        .await
}

/// Fails (or requeues, or cancels) a running item whose lease is live at `live_at`, in one
/// conditional update on item and token under its batch's lock.
async fn fail_in(
    txn: &Txn<'_>,
    runtime: &Runtime,
    item: ItemId,
    report: &Reported,
    live_at: DateTime<Utc>,
) -> Result<ItemState, ApiError> {
    let item_id = item.0;
    let now = Utc::now();
    let batch = lock_batch_of(txn, item_id, now).await?;
    // One conditional update on item and token decides the outcome; a stale token matches no
    // row and changes nothing.
    let failure = items::Failure {
        token: report.token,
        code: report.code.as_str(),
        error: &report.message,
        retryable: report.retryable,
        max_attempts: runtime.settings.worker.max_attempts as i32,
        cancel_requested: batch.cancel_requested,
        live_at,
    };
    let Some((status, attempts)) = items::settle_failure(txn, item, failure, now).await? else {
        return Err(ApiError::lease_lost(item_id));
    };
    let status = ItemStatus::from(status);
    let outcome = match status {
        ItemStatus::Queued => None,
        ItemStatus::Cancelled => Some(jobs::Outcome::Cancelled),
        ItemStatus::Failed => Some(jobs::Outcome::Failed),
        other => {
            return Err(ApiError::internal(format!(
                "a failure report left item {item_id} {}",
                other.as_str()
            )));
        }
    };
    let batch_status = if let Some(outcome) = outcome {
        jobs::count_outcome(txn, batch.id, outcome).await?;
        if outcome == jobs::Outcome::Failed {
            jobs::count_failure_code(txn, batch.id, report.code.as_str()).await?;
        }
        let release =
            NewEntry::new(batch.account.0, LedgerKind::Release, batch.cost).item(batch.id, item_id);
        if !credits::apply_in(txn, release).await? {
            return Err(ApiError::internal(format!(
                "release failed for item {item_id}: held too small"
            )));
        }
        if status == ItemStatus::Failed {
            crate::service::webhooks::enqueue_item_event(
                txn,
                runtime,
                batch.account,
                batch.id,
                item_id,
                "item.failed",
                now,
            )
            .await?;
        }
        batch.settle(txn, runtime, now).await?
    } else {
        batch.current()
    };
    Ok(ItemState {
        item_id,
        status,
        attempts,
        lease_expires_at: None,
        batch_status,
    })
}
