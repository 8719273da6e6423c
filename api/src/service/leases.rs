//! The worker side: fair, exclusive claims under leases; heartbeat, complete and fail reports
//! that settle each item's credits exactly once.
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use entity::batch_job;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait};
use uuid::Uuid;

use crate::db::stmt;
use crate::error::ApiError;
use crate::schemas::batches::{BatchStatus, ItemStatus};
use crate::schemas::worker::{ClaimedItem, ItemState};
use crate::service::batches::finalize_if_done;
use crate::service::credits::{self, LedgerKind};
use crate::state::Runtime;
use crate::store::pipeline::Writes;

/// Leases up to `max` queued items to `worker_id`, in fair order: items carry a position from
/// start-time fair queuing, so a small batch of one key is interleaved with the head of a huge
/// batch of another instead of waiting behind it. Expired leases are requeued first (those
/// another transaction holds are left to the next claim or to the reaper).
pub async fn claim(
    writes: &Writes,
    worker_id: &str,
    max: u32,
    lease: Duration,
    max_attempts: u32,
) -> Result<Vec<ClaimedItem>, ApiError> {
    let worker_id = worker_id.to_string();
    writes
        .run(None, move |txn| {
            let worker_id = worker_id.clone();
            Box::pin(async move { claim_in(txn, &worker_id, max, lease, max_attempts).await })
        })
        .await
}

async fn claim_in(
    txn: &DatabaseTransaction,
    worker_id: &str,
    max: u32,
    lease: Duration,
    max_attempts: u32,
) -> Result<Vec<ClaimedItem>, ApiError> {
    let backend = txn.get_database_backend();
    let now = Utc::now();
    let expires = now + lease;
    let token = Uuid::new_v4();
    let lock = skip_locked(backend);
    requeue_expired(txn, now, max_attempts).await?;
    // Written into the SQL (an integer, so safe): SQLite re-prepares a statement whose LIMIT is
    // a bound parameter every time it runs.
    let max = max.clamp(1, 1000);
    let sql = format!(
        "UPDATE batch_item SET status = 'running', attempts = attempts + 1, lease_token = $1, \
         worker_id = $2, lease_expires_at = $3, updated_at = $4 \
         WHERE id IN (SELECT id FROM batch_item WHERE status = 'queued' \
         ORDER BY fair_pos, created_at LIMIT {max}{lock}) \
         RETURNING id, batch_id, prompt, params, attempts, fair_pos"
    );
    let rows = txn
        .query_all_raw(stmt(
            backend,
            &sql,
            [token.into(), worker_id.into(), expires.into(), now.into()],
        ))
        .await?;
    metrics::counter!("worker_claims_total").increment(1);
    metrics::counter!("worker_claimed_items_total").increment(rows.len() as u64);
    let mut items = Vec::with_capacity(rows.len());
    let mut batches = Vec::new();
    for r in rows {
        let batch_id: Uuid = r.try_get("", "batch_id")?;
        let params: Option<String> = r.try_get("", "params")?;
        let pos: i64 = r.try_get("", "fair_pos")?;
        if !batches.contains(&batch_id) {
            batches.push(batch_id);
        }
        items.push((
            pos,
            ClaimedItem {
                item_id: r.try_get("", "id")?,
                batch_id,
                lease_token: token,
                lease_expires_at: expires,
                prompt: r.try_get("", "prompt")?,
                params: params.and_then(|p| serde_json::from_str(&p).ok()),
                attempt: r.try_get("", "attempts")?,
            },
        ));
    }
    if !batches.is_empty() {
        // In the claim's own transaction, without waiting for a batch row another transaction
        // holds (that one marks the batch `processing` itself: see `lock_batch_of`). A claim
        // never waits on a lock, so it can never be part of a deadlock.
        batches.sort();
        let ids: Vec<sea_orm::Value> = batches.into_iter().map(Into::into).collect();
        let marks = (0..ids.len())
            .map(|i| format!("${}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE batch_job SET status = 'processing', updated_at = $1 WHERE id IN \
             (SELECT id FROM batch_job WHERE id IN ({marks}) AND status = 'queued'{lock})"
        );
        let mut values = vec![now.into()];
        values.extend(ids);
        txn.execute_raw(stmt(backend, &sql, values)).await?;
    }
    items.sort_by_key(|(pos, i)| (*pos, i.item_id));
    Ok(items.into_iter().map(|(_, i)| i).collect())
}

/// Puts items whose lease expired back in the queue when attempts remain and their batch has no
/// cancel request. Expired leases of cancelled batches and of last attempts are left to
/// [`reap_expired`], which settles their credits: cancel wins over expiry, so such an item is
/// never leased again nor charged.
async fn requeue_expired<C: ConnectionTrait>(
    db: &C,
    now: DateTime<Utc>,
    max_attempts: u32,
) -> Result<u64, ApiError> {
    let backend = db.get_database_backend();
    // Rows another transaction holds are skipped (the next pass takes them): this never waits.
    let sql = format!(
        "UPDATE batch_item SET status = 'queued', lease_token = NULL, worker_id = NULL, \
         lease_expires_at = NULL, error = 'lease expired', updated_at = $1 \
         WHERE id IN (SELECT id FROM batch_item WHERE status = 'running' AND lease_expires_at < $1 \
         AND attempts < $2 \
         AND batch_id NOT IN (SELECT id FROM batch_job WHERE cancel_requested_at IS NOT NULL){})",
        skip_locked(backend)
    );
    let r = db
        .execute_raw(stmt(
            backend,
            &sql,
            [now.into(), (max_attempts as i32).into()],
        ))
        .await?;
    Ok(r.rows_affected())
}

/// `FOR UPDATE SKIP LOCKED` where the store has it (SQLite has one writer: nothing to skip).
fn skip_locked(backend: DbBackend) -> &'static str {
    if backend == DbBackend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    }
}

/// The key an item belongs to: its reports run in that key's write lane, ordered with the
/// key's other writes. Unknown items are 404.
async fn key_of(db: &DatabaseConnection, item_id: Uuid) -> Result<i64, ApiError> {
    db.query_one_raw(stmt(
        db.get_database_backend(),
        "SELECT api_key_id FROM batch_item WHERE id = $1",
        [item_id.into()],
    ))
    .await?
    .ok_or_else(|| ApiError::not_found("item", item_id))?
    .try_get::<i64>("", "api_key_id")
    .map_err(Into::into)
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
                Box::pin(async move { requeue_expired(txn, now, max_attempts).await })
            })
            .await?,
        ..Default::default()
    };
    let rows = db
        .query_all_raw(stmt(
            db.get_database_backend(),
            "SELECT id, api_key_id, lease_token FROM batch_item WHERE status = 'running' AND lease_expires_at < $1 \
             LIMIT 200",
            [now.into()],
        ))
        .await?;
    for r in rows {
        let (id, key, token): (Uuid, i64, Option<Uuid>) = (
            r.try_get("", "id")?,
            r.try_get("", "api_key_id")?,
            r.try_get("", "lease_token")?,
        );
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
                        fail_in(txn, &runtime, id, token, "lease expired", true, at).await
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
    key_id: i64,
    cost: i64,
    cancel_requested: bool,
    status: BatchStatus,
    /// Items still open (queued or running) before this transition.
    open: i64,
}

async fn lock_batch_of(
    txn: &DatabaseTransaction,
    item_id: Uuid,
    now: DateTime<Utc>,
) -> Result<LockedBatch, ApiError> {
    let b = txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_job SET updated_at = $2, \
             status = CASE WHEN status = 'queued' THEN 'processing' ELSE status END \
             WHERE id = (SELECT batch_id FROM batch_item WHERE id = $1) \
             RETURNING id, api_key_id, cost_per_video, cancel_requested_at, status, \
             total_count - succeeded_count - failed_count - cancelled_count AS open",
            [item_id.into(), now.into()],
        ))
        .await?
        .ok_or_else(|| ApiError::not_found("item", item_id))?;
    let cancel: Option<DateTime<Utc>> = b.try_get("", "cancel_requested_at")?;
    let status: String = b.try_get("", "status")?;
    Ok(LockedBatch {
        id: b.try_get("", "id")?,
        key_id: b.try_get("", "api_key_id")?,
        cost: b.try_get("", "cost_per_video")?,
        cancel_requested: cancel.is_some(),
        status: BatchStatus::parse(&status),
        open: i64::from(b.try_get::<i32>("", "open")?),
    })
}

impl LockedBatch {
    /// Finalizes the batch when this transition closed its last open item; returns its status.
    async fn settle(
        &self,
        txn: &DatabaseTransaction,
        runtime: &Runtime,
        now: DateTime<Utc>,
    ) -> Result<BatchStatus, ApiError> {
        if self.open <= 1
            && let Some(job) = finalize_if_done(txn, runtime, self.id, now).await?
        {
            return Ok(BatchStatus::parse(&job.status));
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
    Ok(batch_job::Entity::find_by_id(batch_id)
        .one(db)
        .await?
        .map(|b| BatchStatus::parse(&b.status))
        .unwrap_or(BatchStatus::Queued))
}

/// Extends a live lease.
pub async fn heartbeat(
    db: &DatabaseConnection,
    writes: &Writes,
    item_id: Uuid,
    token: Uuid,
    lease: Duration,
) -> Result<ItemState, ApiError> {
    let key = key_of(db, item_id).await?;
    writes
        .run(Some(key), move |txn| {
            Box::pin(async move { heartbeat_in(txn, item_id, token, lease).await })
        })
        .await
}

async fn heartbeat_in(
    txn: &DatabaseTransaction,
    item_id: Uuid,
    token: Uuid,
    lease: Duration,
) -> Result<ItemState, ApiError> {
    let now = Utc::now();
    let expires = now + lease;
    let row = txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_item SET lease_expires_at = $3, updated_at = $4 \
             WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at >= $4 \
             RETURNING batch_id, attempts",
            [item_id.into(), token.into(), expires.into(), now.into()],
        ))
        .await?;
    let Some(row) = row else {
        return Err(lease_error(txn, item_id).await);
    };
    let batch_id: Uuid = row.try_get("", "batch_id")?;
    Ok(ItemState {
        item_id,
        status: ItemStatus::Running,
        attempts: row.try_get("", "attempts")?,
        lease_expires_at: Some(expires),
        batch_status: batch_status(txn, batch_id).await?,
    })
}

async fn lease_error<C: ConnectionTrait>(db: &C, item_id: Uuid) -> ApiError {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT id FROM batch_item WHERE id = $1",
            [item_id.into()],
        ))
        .await
    {
        Ok(Some(_)) => ApiError::lease_lost(item_id),
        Ok(None) => ApiError::not_found("item", item_id),
        Err(e) => e.into(),
    }
}

/// Reports success: the item's cost moves from held to charged, exactly once.
pub async fn complete(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: Arc<Runtime>,
    item_id: Uuid,
    token: Uuid,
    result_url: String,
    result: Option<String>,
) -> Result<ItemState, ApiError> {
    let key = key_of(db, item_id).await?;
    writes
        .run(Some(key), move |txn| {
            let (runtime, result_url, result) =
                (Arc::clone(&runtime), result_url.clone(), result.clone());
            Box::pin(async move {
                complete_in(txn, &runtime, item_id, token, &result_url, result).await
            })
        })
        .await
}

async fn complete_in(
    txn: &DatabaseTransaction,
    runtime: &Runtime,
    item_id: Uuid,
    token: Uuid,
    result_url: &str,
    result: Option<String>,
) -> Result<ItemState, ApiError> {
    let backend = txn.get_database_backend();
    let now = Utc::now();
    let batch = lock_batch_of(txn, item_id, now).await?;
    let updated = txn
        .query_one_raw(stmt(
            backend,
            "UPDATE batch_item SET status = 'succeeded', result_url = $3, result = $4, error = NULL, \
             lease_token = NULL, lease_expires_at = NULL, updated_at = $5 \
             WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at >= $5 \
             RETURNING attempts",
            [item_id.into(), token.into(), result_url.into(), result.into(), now.into()],
        ))
        .await?;
    let Some(updated) = updated else {
        return Err(ApiError::lease_lost(item_id));
    };
    let attempts: i32 = updated.try_get("", "attempts")?;
    txn.execute_raw(stmt(
        backend,
        "UPDATE batch_job SET succeeded_count = succeeded_count + 1 WHERE id = $1",
        [batch.id.into()],
    ))
    .await?;
    if !credits::apply_for(
        txn,
        batch.key_id,
        LedgerKind::Charge,
        batch.cost,
        Some(batch.id),
        Some(item_id),
        None,
        None,
    )
    .await?
    {
        return Err(ApiError::internal(format!(
            "charge failed for item {item_id}: held too small"
        )));
    }
    crate::service::webhooks::enqueue_item_event(
        txn,
        runtime,
        batch.key_id,
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

/// Reports failure: requeued while attempts remain and the error is retryable (and the batch
/// is not being cancelled); otherwise final, with the item's hold released.
pub async fn fail(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: Arc<Runtime>,
    item_id: Uuid,
    token: Uuid,
    error: String,
    retryable: bool,
) -> Result<ItemState, ApiError> {
    let key = key_of(db, item_id).await?;
    writes
        .run(Some(key), move |txn| {
            let (runtime, error) = (Arc::clone(&runtime), error.clone());
            Box::pin(async move {
                fail_in(txn, &runtime, item_id, token, &error, retryable, Utc::now()).await
            })
        })
        .await
}

/// Fails (or requeues, or cancels) a running item whose lease is live at `live_at`, in one
/// conditional update on item and token under its batch's lock.
async fn fail_in(
    txn: &DatabaseTransaction,
    runtime: &Runtime,
    item_id: Uuid,
    token: Uuid,
    error: &str,
    retryable: bool,
    live_at: DateTime<Utc>,
) -> Result<ItemState, ApiError> {
    let backend = txn.get_database_backend();
    let now = Utc::now();
    let max_attempts = runtime.settings.worker.max_attempts as i32;
    let batch = lock_batch_of(txn, item_id, now).await?;
    // One conditional update on item and token decides the outcome; a stale token matches no
    // row and changes nothing.
    let row = txn
        .query_one_raw(stmt(
            backend,
            "UPDATE batch_item SET status = CASE \
               WHEN $5 AND attempts < $6 AND NOT $7 THEN 'queued' \
               WHEN $5 AND $7 THEN 'cancelled' ELSE 'failed' END, \
             error = $3, lease_token = NULL, worker_id = NULL, lease_expires_at = NULL, updated_at = $4 \
             WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at >= $8 \
             RETURNING status, attempts",
            [
                item_id.into(),
                token.into(),
                error.into(),
                now.into(),
                retryable.into(),
                max_attempts.into(),
                batch.cancel_requested.into(),
                live_at.into(),
            ],
        ))
        .await?;
    let Some(row) = row else {
        return Err(ApiError::lease_lost(item_id));
    };
    let attempts: i32 = row.try_get("", "attempts")?;
    let status: String = row.try_get("", "status")?;
    let (status, counter) = match status.as_str() {
        "queued" => ("queued", None),
        "cancelled" => ("cancelled", Some("cancelled_count")),
        _ => ("failed", Some("failed_count")),
    };
    let batch_status = if let Some(counter) = counter {
        txn.execute_raw(stmt(
            backend,
            &format!("UPDATE batch_job SET {counter} = {counter} + 1 WHERE id = $1"),
            [batch.id.into()],
        ))
        .await?;
        if !credits::apply_for(
            txn,
            batch.key_id,
            LedgerKind::Release,
            batch.cost,
            Some(batch.id),
            Some(item_id),
            None,
            None,
        )
        .await?
        {
            return Err(ApiError::internal(format!(
                "release failed for item {item_id}: held too small"
            )));
        }
        if status == "failed" {
            crate::service::webhooks::enqueue_item_event(
                txn,
                runtime,
                batch.key_id,
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
        status: ItemStatus::parse(status),
        attempts,
        lease_expires_at: None,
        batch_status,
    })
}
