//! The wire views of stored batches and items, shared by the batch reads and the webhook
//! events that carry them.
use crate::domain::failure::FailureCode;
use crate::schemas::batches::{Batch, BatchCounts, BatchItemView, BatchStatus, ItemStatus};
use crate::store::{items, jobs};

/// A stored JSON text as a value (absent or unreadable: none).
pub(crate) fn parse_json(text: Option<&str>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(t).ok())
}

/// Builds the wire view of a batch.
pub fn view(job: &jobs::Visible, open: (i64, i64), items: Option<Vec<BatchItemView>>) -> Batch {
    Batch {
        batch_id: job.id,
        request_id: job.request_id.clone(),
        status: BatchStatus::from(job.status),
        counts: BatchCounts {
            total: job.total_count.into(),
            queued: open.0,
            running: open.1,
            succeeded: job.succeeded_count.into(),
            failed: job.failed_count.into(),
            cancelled: job.cancelled_count.into(),
            expired: job.expired_count.into(),
        },
        cost_per_video: job.cost_per_video,
        required_credits: job.required_credits,
        webhook_url: job.webhook_url.clone(),
        metadata: parse_json(job.metadata.as_deref()),
        created_at: job.created_at,
        updated_at: job.updated_at,
        cancel_requested_at: job.cancel_requested_at,
        completed_at: job.completed_at,
        expires_at: job.expires_at,
        error_counts: {
            let mut counts = jobs::error_counts(job.error_counts.as_deref());
            if job.expired_count > 0 {
                counts.insert("expired".into(), job.expired_count.into());
            }
            counts
        },
        retry_of: job.retry_of,
        retried_by: job.retried_by,
        items,
        items_next_cursor: None,
    }
}

/// Wire view of an item.
pub fn item_view(m: &items::Visible) -> BatchItemView {
    BatchItemView {
        item_id: m.id,
        index: m.idx,
        prompt: m.prompt.clone(),
        params: parse_json(m.params.as_deref()),
        status: ItemStatus::from(m.status),
        attempts: m.attempts,
        result_url: m.result_url.clone(),
        result: parse_json(m.result.as_deref()),
        error_code: FailureCode::of_item(m.status, m.error_code.as_deref()),
        message: m.error.clone(),
        error: m.error.clone(),
        original_index: m.source_idx,
    }
}
