//! Bodies of the batch endpoints.
use std::collections::BTreeMap;

use crate::schemas::text::Text;
use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde_json::Value;
use uuid::Uuid;

/// One prompt to render.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct BatchItemInput {
    /// The prompt, 1 to the key's `max_prompt_chars` Unicode characters.
    #[oai(validator(min_length = 1))]
    pub prompt: Text,
    /// Renderer parameters, passed to the worker as given (e.g. `{"duration_s": 5}`).
    pub params: Option<BTreeMap<String, Value>>,
}

/// A batch to create.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct CreateBatchRequest {
    /// Idempotency key, 1–255 of `[A-Za-z0-9._:-]`; also accepted as the `Idempotency-Key`
    /// header. Without one the server assigns an id and no deduplication applies.
    #[oai(validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$"))]
    pub request_id: Option<Text>,
    /// The prompts: 1 to the key's `max_batch_items`.
    #[oai(validator(min_items = 1))]
    pub items: Vec<BatchItemInput>,
    /// Where to send this batch's webhooks instead of the key's URL (absolute https URL).
    pub webhook_url: Option<Text>,
    /// Small object (at most 4 KiB as JSON) returned as given.
    pub metadata: Option<BTreeMap<String, Value>>,
    /// How long queued items may wait before they expire (e.g. `24h`, `30m`), at most the
    /// key's `completion_window` (the default). When it ends, queued items become `expired`
    /// and are released; running items may finish; the batch ends `expired`.
    #[oai(validator(min_length = 1, max_length = 32))]
    pub completion_window: Option<Text>,
}

/// A retry of a finished batch's failed items.
#[derive(Object, Clone, Debug, Default)]
#[oai(deny_unknown_fields)]
pub struct RetryFailedRequest {
    /// Idempotency key, as for a create (also accepted as the `Idempotency-Key` header).
    /// Without one the retry's key is `retry-failed-{batch_id}`: repeating the call answers
    /// the first retry again instead of making a second one.
    #[oai(validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$"))]
    pub request_id: Option<Text>,
    /// Retry the items that expired (their completion window ended) too (default false).
    pub include_expired: Option<bool>,
}

/// Lifecycle of a batch.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum BatchStatus {
    /// No item claimed yet.
    Queued,
    /// Some item claimed; not every item final.
    Processing,
    /// Every item final; see the counts.
    Completed,
    /// Cancelled by the customer; running items were allowed to finish.
    Cancelled,
    /// Its completion window ended first: queued items expired (released), running items
    /// were allowed to finish.
    Expired,
}

impl From<entity::status::BatchState> for BatchStatus {
    fn from(s: entity::status::BatchState) -> Self {
        use entity::status::BatchState as S;
        match s {
            S::Queued => Self::Queued,
            S::Processing => Self::Processing,
            S::Completed => Self::Completed,
            S::Cancelled => Self::Cancelled,
            S::Expired => Self::Expired,
        }
    }
}

impl BatchStatus {
    /// The status of a wire name; `None` for any other name.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Processing,
            Self::Completed,
            Self::Cancelled,
            Self::Expired,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Completed, cancelled or expired: its status changes no more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Expired)
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
}

/// Lifecycle of an item.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum ItemStatus {
    /// Waiting for a worker.
    Queued,
    /// Leased by a worker.
    Running,
    /// Rendered; its cost is charged.
    Succeeded,
    /// Failed for good; its hold is released.
    Failed,
    /// Cancelled before it ran; its hold is released.
    Cancelled,
    /// Still queued when its batch's completion window ended; its hold is released.
    Expired,
}

impl From<entity::status::ItemState> for ItemStatus {
    fn from(s: entity::status::ItemState) -> Self {
        use entity::status::ItemState as S;
        match s {
            S::Queued => Self::Queued,
            S::Running => Self::Running,
            S::Succeeded => Self::Succeeded,
            S::Failed => Self::Failed,
            S::Cancelled => Self::Cancelled,
            S::Expired => Self::Expired,
        }
    }
}

impl ItemStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
}

/// The result of a create (201) or of its replay (200).
#[derive(Object, Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BatchCreated {
    /// Always `true`.
    pub ok: bool,
    /// The idempotency key (given or assigned).
    pub request_id: String,
    /// The batch.
    pub batch_id: Uuid,
    /// True when this is the stored answer to an earlier identical request.
    pub idempotent_replay: bool,
    // Status at creation.
    #[serde(with = "status_serde")]
    pub status: BatchStatus,
    /// Items in the batch.
    pub total_count: i64,
    /// Credits per item for this batch.
    pub cost_per_video: i64,
    /// `total_count * cost_per_video`, held until items finish.
    pub required_credits: i64,
    /// Credits available before this batch's hold (on replay: available now).
    pub available_credits: i64,
    /// Credits available after the hold (on replay: available now).
    pub remaining_credits: i64,
    /// Creation time (UTC).
    pub created_at: DateTime<Utc>,
    /// When the completion window ends: items still queued then expire (null: no window).
    #[oai(nullable)]
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

mod status_serde {
    use super::BatchStatus;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &BatchStatus, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BatchStatus, D::Error> {
        let name = String::deserialize(d)?;
        BatchStatus::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown batch status {name:?}")))
    }
}

/// Item counts by status.
#[derive(Object, Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// All items.
    pub total: i64,
    /// Waiting.
    pub queued: i64,
    /// Leased by a worker.
    pub running: i64,
    /// Rendered.
    pub succeeded: i64,
    /// Failed for good.
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Still queued when the completion window ended (released).
    pub expired: i64,
}

/// One item of a batch.
#[derive(Object, Clone, Debug)]
pub struct BatchItemView {
    /// Item id.
    pub item_id: Uuid,
    /// Position in the request, from 0.
    pub index: i32,
    /// The prompt.
    pub prompt: String,
    /// Parameters as given.
    pub params: Option<Value>,
    // Status.
    pub status: ItemStatus,
    /// Attempts started so far.
    pub attempts: i32,
    /// Where the video is, once succeeded.
    #[oai(nullable)]
    pub result_url: Option<String>,
    /// Extra result data reported by the worker.
    pub result: Option<Value>,
    // Why the item failed or expired (of the last failed attempt while it is retried); absent
    // while nothing failed. (A plain comment: a described enum field becomes an `allOf` that
    // stock generators refuse.)
    #[oai(skip_serializing_if_is_none)]
    pub error_code: Option<crate::domain::failure::FailureCode>,
    /// What the worker said went wrong, with `error_code`.
    #[oai(nullable)]
    pub message: Option<String>,
    /// The same as `message` (its older name).
    #[oai(nullable)]
    pub error: Option<String>,
    /// In a batch made by `retry-failed`: the item's `index` in the batch it retries.
    #[oai(skip_serializing_if_is_none)]
    pub original_index: Option<i32>,
}

/// A batch with counts (and items, when read one at a time).
#[derive(Object, Clone, Debug)]
pub struct Batch {
    /// Batch id.
    pub batch_id: Uuid,
    /// Its idempotency key.
    pub request_id: String,
    // Status.
    pub status: BatchStatus,
    // Item counts.
    pub counts: BatchCounts,
    /// Credits per item.
    pub cost_per_video: i64,
    /// Credits held at creation.
    pub required_credits: i64,
    /// Webhook target override, if any.
    #[oai(nullable)]
    pub webhook_url: Option<String>,
    /// Metadata as given.
    pub metadata: Option<Value>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When a cancel was requested.
    #[oai(nullable)]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// When every item became final.
    #[oai(nullable)]
    pub completed_at: Option<DateTime<Utc>>,
    /// When the completion window ends (null: no window).
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Failed and expired items per `error_code` (empty while none).
    pub error_counts: BTreeMap<String, i64>,
    /// The batch whose failed items this batch retries (`retry-failed`).
    #[oai(nullable)]
    pub retry_of: Option<Uuid>,
    /// The batch that retries this batch's failed items, once one was made.
    #[oai(nullable)]
    pub retried_by: Option<Uuid>,
    /// The first items in request order (only when reading one batch; at most 100).
    #[oai(skip_serializing_if_is_none)]
    pub items: Option<Vec<BatchItemView>>,
    /// Present when the batch has more items than `items` holds: pass it as `cursor` to
    /// `GET /video-batch/{batch_id}/items` for the next page.
    #[oai(skip_serializing_if_is_none)]
    pub items_next_cursor: Option<String>,
}

/// A page of a batch's items, in request order.
#[derive(Object, Clone, Debug)]
pub struct ItemPage {
    /// The items.
    pub data: Vec<BatchItemView>,
    /// More items follow.
    pub has_more: bool,
    /// Pass as `cursor` for the next page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// A page of batches, newest first.
#[derive(Object, Clone, Debug)]
pub struct BatchList {
    /// The batches (without items).
    pub data: Vec<Batch>,
    /// More batches follow.
    pub has_more: bool,
    /// Pass as `cursor` for the next page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// Filter of the list endpoint.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum BatchStatusFilter {
    /// Queued batches.
    Queued,
    /// Processing batches.
    Processing,
    /// Completed batches.
    Completed,
    /// Cancelled batches.
    Cancelled,
    /// Batches whose completion window ended.
    Expired,
}

impl From<BatchStatusFilter> for BatchStatus {
    fn from(f: BatchStatusFilter) -> Self {
        match f {
            BatchStatusFilter::Queued => BatchStatus::Queued,
            BatchStatusFilter::Processing => BatchStatus::Processing,
            BatchStatusFilter::Completed => BatchStatus::Completed,
            BatchStatusFilter::Cancelled => BatchStatus::Cancelled,
            BatchStatusFilter::Expired => BatchStatus::Expired,
        }
    }
}
