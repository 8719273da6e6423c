//! Completion windows: when a batch's window ends, its queued items expire (released at once),
//! running ones may finish, and the batch ends `expired` with its `batch.expired` event.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use uuid::Uuid;

use crate::domain::ids::AccountId;
use crate::error::ApiError;
use crate::service::batches::{close_queued, finalize_if_done};
use crate::state::Runtime;
use crate::store::commit::Writes;
use crate::store::jobs;
use crate::store::unit::Txn;

/// Enforces the completion windows that ended by now (up to 100 batches a pass): each batch's
/// queued items become `expired` and their holds are released at once; running items may
/// still finish and are charged; the batch ends `expired` (with its `batch.expired` event)
/// once nothing runs. Each batch in its key's write lane, under its row lock. Returns how
/// many batches were handled.
pub async fn expire_due(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: &Arc<Runtime>,
) -> Result<usize, ApiError> {
    let now = Utc::now();
    let due = jobs::due_to_expire(db, now, 100).await?;
    let n = due.len();
    for (batch_id, key_id) in due {
        let runtime = Arc::clone(runtime);
        let result = writes
            .run(Some(key_id), move |txn| {
                let runtime = Arc::clone(&runtime);
                Box::pin(
                    async move { expire_in(txn, &runtime, AccountId(key_id), batch_id, now).await },
                )
            })
            .await;
        if let Err(e) = result {
            tracing::error!(%batch_id, error = %e, "enforcing a completion window failed");
        }
    }
    Ok(n)
}

async fn expire_in(
    txn: &Txn<'_>,
    runtime: &Runtime,
    account: AccountId,
    batch_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if !jobs::lock_owned(txn, account, batch_id, now).await? {
        return Ok(());
    }
    let Some(job) = jobs::by_id(txn, batch_id).await? else {
        return Ok(());
    };
    if job.status.is_final() || job.expires_at.is_none_or(|at| at > now) {
        return Ok(());
    }
    let n = close_queued(
        txn,
        &job,
        entity::status::ItemState::Expired,
        "expired: completion window ended",
        now,
    )
    .await?;
    metrics::counter!("items_expired_total").increment(n as u64);
    jobs::record_expiry(txn, batch_id, n as i32, now).await?;
    finalize_if_done(txn, runtime, batch_id, now).await?;
    Ok(())
}
