//! A customer's batch; its item counts (open and terminal) are kept here, changed with every
//! item transition under the batch row's lock.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "batch_job")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The owning account (`account.id`): the column keeps the name it had before accounts,
    /// when each key was its own account with the key's id.
    pub api_key_id: i64,
    pub request_id: String,
    /// SHA-256 of the canonical request, for idempotency.
    pub fingerprint: String,
    pub status: crate::status::BatchState,
    pub total_count: i32,
    pub succeeded_count: i32,
    pub failed_count: i32,
    pub cancelled_count: i32,
    pub cost_per_video: i64,
    pub required_credits: i64,
    pub webhook_url: Option<String>,
    /// JSON object, as given.
    pub metadata: Option<String>,
    /// The first response, as JSON, replayed for repeats.
    pub response: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub cancel_requested_at: Option<DateTimeUtc>,
    pub completed_at: Option<DateTimeUtc>,
    /// The end of the batch's completion window (none: no window).
    pub expires_at: Option<DateTimeUtc>,
    /// When the window was enforced: its queued items expired, the batch ends `expired`.
    pub expired_at: Option<DateTimeUtc>,
    pub expired_count: i32,
    /// Items waiting to be claimed.
    pub queued_count: i32,
    /// Items leased to a worker.
    pub running_count: i32,
    /// Failed items per error code, a JSON object (none: no failure yet).
    pub error_counts: Option<String>,
    /// The batch whose failed items this batch retries.
    pub retry_of: Option<Uuid>,
    /// The batch that retries this batch's failed items.
    pub retried_by: Option<Uuid>,
}

impl ActiveModelBehavior for ActiveModel {}
