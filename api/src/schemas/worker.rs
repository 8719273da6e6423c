//! Bodies of the worker API.
use std::collections::BTreeMap;

use crate::schemas::text::Text;
use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde_json::Value;
use uuid::Uuid;

use crate::schemas::batches::{BatchStatus, ItemStatus};

/// Ask for work.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Who is asking (for logs and leases).
    #[oai(validator(min_length = 1, max_length = 128))]
    pub worker_id: Text,
    /// At most this many items (1–100).
    #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
    pub max_items: u32,
    /// Lease length; defaults to `worker.lease_seconds`.
    #[oai(validator(minimum(value = "1"), maximum(value = "86400")))]
    pub lease_seconds: Option<u32>,
}

/// One leased item.
#[derive(Object, Clone, Debug)]
pub struct ClaimedItem {
    /// Item id.
    pub item_id: Uuid,
    /// Its batch.
    pub batch_id: Uuid,
    /// Proof of the lease, required by every report.
    pub lease_token: Uuid,
    /// The lease ends then unless extended by a heartbeat.
    pub lease_expires_at: DateTime<Utc>,
    /// The prompt.
    pub prompt: String,
    /// Parameters as the customer gave them.
    pub params: Option<Value>,
    /// 1 for the first attempt.
    pub attempt: i32,
}

/// Items leased by one claim (possibly none).
#[derive(Object, Clone, Debug)]
pub struct ClaimResponse {
    /// Leased items, fairest first.
    pub items: Vec<ClaimedItem>,
}

/// Extend a lease.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The claim's token.
    pub lease_token: Uuid,
    /// New lease length; defaults to the configured one.
    #[oai(validator(minimum(value = "1"), maximum(value = "86400")))]
    pub lease_seconds: Option<u32>,
}

/// Report success.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The claim's token.
    pub lease_token: Uuid,
    /// Where the video is.
    #[oai(validator(min_length = 1, max_length = 2048))]
    pub result_url: Text,
    /// Extra result data.
    pub result: Option<BTreeMap<String, Value>>,
}

/// Report failure: what kind (`error_code`, any code but `expired`, which only the service
/// gives; without it the failure is `internal`) and what happened (`message`). The code decides
/// `retryable` when that is not sent: `render_timeout`, `worker_lost` and `internal` are
/// retried while attempts remain, the others are not.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct FailRequest {
    /// The claim's token.
    pub lease_token: Uuid,
    // The kind of failure (any code but `expired`, which only the service gives); it decides
    // `retryable` when that is not sent (`render_timeout`, `worker_lost` and `internal` are
    // retried). Without it the failure is `internal`. (A plain comment: see `BatchItemView`.)
    pub error_code: Option<crate::domain::failure::FailureCode>,
    /// What went wrong, shown to the customer with the code (1–4096 characters).
    #[oai(validator(min_length = 1, max_length = 4096))]
    pub message: Option<Text>,
    /// What went wrong: the older name of `message` (send one of the two, or neither with an
    /// `error_code`).
    #[oai(validator(min_length = 1, max_length = 4096))]
    pub error: Option<Text>,
    /// Try again while attempts remain (default: decided by `error_code`).
    pub retryable: Option<bool>,
}

/// The item after a report.
#[derive(Object, Clone, Debug)]
pub struct ItemState {
    /// Item id.
    pub item_id: Uuid,
    // Item status now.
    pub status: ItemStatus,
    /// Attempts so far.
    pub attempts: i32,
    /// Lease end, while running.
    #[oai(nullable)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    // The batch's status now.
    pub batch_status: BatchStatus,
}
