//! Retry failed: a new batch of exactly the failed (and, when asked, expired) items of a
//! finished batch, with their prompts, params and original indexes, made through every guard
//! of a create (quota, caps, credits, idempotency) and linked both ways to the batch it
//! retries.
use std::collections::BTreeMap;
use std::sync::Arc;

use sea_orm::DatabaseConnection;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::RequestId;
use crate::error::{ApiError, ErrorCode};
use crate::schemas::batches::{BatchItemInput, BatchStatus, CreateBatchRequest};
use crate::service::batches::{AuditInfo, CreateOutcome, RetryOf, create_batch};
use crate::state::{KeyEntry, Runtime};
use crate::store::commit::Writes;
use crate::store::{items, jobs};

/// Items read per query while collecting the failures.
const CHUNK: u64 = 1000;

/// What a retry asks for.
#[derive(Clone, Debug, Default)]
pub struct RetryRequest {
    /// The idempotency key (body or `Idempotency-Key` header); by default one per batch
    /// retried and `include_expired`, so that repeating the call never makes a second retry.
    pub request_id: Option<String>,
    /// Retry the expired items too.
    pub include_expired: bool,
}

/// The idempotency key a retry uses when the caller gives none.
pub fn default_request_id(batch_id: Uuid, include_expired: bool) -> String {
    if include_expired {
        format!("retry-failed-expired-{batch_id}")
    } else {
        format!("retry-failed-{batch_id}")
    }
}

/// Stands for the retry's request: the batch retried and what it includes (the items follow
/// from them, since a finished batch's failures no longer change).
fn fingerprint(batch_id: Uuid, include_expired: bool) -> String {
    let canon = format!(r#"{{"include_expired":{include_expired},"retry_of":"{batch_id}"}}"#);
    hex::encode(Sha256::digest(canon.as_bytes()))
}

/// Retries the failed items of the key's batch `batch_id`: 404 for another key's batch, 409
/// `CONFLICT` (reason `batch_not_finished`) while items are queued or running, 422
/// `VALIDATION_ERROR` (reason `nothing_to_retry`) when no item failed (or expired, when
/// included); otherwise what a create answers.
#[allow(clippy::too_many_arguments)]
pub async fn retry_failed(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: &Arc<Runtime>,
    key: &KeyEntry,
    batch_id: Uuid,
    req: RetryRequest,
    header_request_id: Option<&str>,
    audit: AuditInfo,
) -> Result<CreateOutcome, ApiError> {
    let original = jobs::owned(db, key.account, batch_id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch", batch_id))?;
    let rid = match (&req.request_id, header_request_id) {
        (Some(body), Some(header)) if body != header => {
            return Err(ApiError::validation(
                "request_id",
                "differs from the Idempotency-Key header; send one or make them equal",
            ));
        }
        (Some(id), _) => RequestId::parse("request_id", id)?,
        (None, Some(id)) => RequestId::parse("Idempotency-Key", id)?,
        (None, None) => RequestId::parse(
            "request_id",
            &default_request_id(batch_id, req.include_expired),
        )?,
    };
    let fingerprint = fingerprint(batch_id, req.include_expired);
    let retry = |source_idx| RetryOf {
        batch_id,
        fingerprint: fingerprint.clone(),
        source_idx,
    };
    let request = |items| CreateBatchRequest {
        request_id: Some(rid.as_str().into()),
        items,
        webhook_url: original.webhook_url.clone().map(Into::into),
        metadata: original
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok()),
        completion_window: None,
    };
    // A repeat is answered as a create's repeat is, whatever the batches look like now.
    if jobs::by_request_id(db, key.account, rid.as_str())
        .await?
        .is_some()
    {
        return create_batch(
            db,
            writes,
            runtime,
            key,
            &request(Vec::new()),
            None,
            audit,
            Some(retry(Vec::new())),
        )
        .await;
    }
    let status = BatchStatus::from(original.status);
    if !status.is_final() || original.queued_count + original.running_count > 0 {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "batch {batch_id} is {} with {} queued and {} running items: retry its \
                 failed items once it has finished",
                status.as_str(),
                original.queued_count,
                original.running_count
            ),
        )
        .with_details(serde_json::json!({
            "reason": "batch_not_finished",
            "status": status.as_str(),
        })));
    }
    let (inputs, source_idx) = failures(db, batch_id, req.include_expired).await?;
    if inputs.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            if req.include_expired {
                format!("batch {batch_id} has no failed or expired item")
            } else {
                format!("batch {batch_id} has no failed item (expired ones: include_expired)")
            },
        )
        .with_details(serde_json::json!({ "reason": "nothing_to_retry" })));
    }
    create_batch(
        db,
        writes,
        runtime,
        key,
        &request(inputs),
        None,
        audit,
        Some(retry(source_idx)),
    )
    .await
}

/// The failed (and expired) items of a batch as a create's items, in request order, with
/// their indexes.
async fn failures(
    db: &DatabaseConnection,
    batch_id: Uuid,
    include_expired: bool,
) -> Result<(Vec<BatchItemInput>, Vec<i32>), ApiError> {
    let (mut inputs, mut source_idx) = (Vec::new(), Vec::new());
    let mut after = -1;
    loop {
        let rows = items::failures_after(db, batch_id, after, CHUNK).await?;
        let Some(last) = rows.last().map(|r| r.idx) else {
            break;
        };
        for r in &rows {
            if r.status == entity::status::ItemState::Expired && !include_expired {
                continue;
            }
            let params: Option<BTreeMap<String, Value>> = r
                .params
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok());
            inputs.push(BatchItemInput {
                prompt: r.prompt.clone().into(),
                params,
            });
            source_idx.push(r.idx);
        }
        if (rows.len() as u64) < CHUNK {
            break;
        }
        after = last;
    }
    Ok((inputs, source_idx))
}
