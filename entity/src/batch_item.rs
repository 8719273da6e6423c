//! One prompt of a batch, claimed by workers under a lease.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "batch_item")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub batch_id: Uuid,
    /// The owning account (`account.id`): the column keeps the name it had before accounts,
    /// when each key was its own account with the key's id.
    pub api_key_id: i64,
    pub idx: i32,
    pub prompt: String,
    /// JSON object, as given.
    pub params: Option<String>,
    pub status: crate::status::ItemState,
    pub attempts: i32,
    /// Position in the fair queue (start-time fair queuing across keys).
    pub fair_pos: i64,
    pub lease_token: Option<Uuid>,
    pub worker_id: Option<String>,
    pub lease_expires_at: Option<DateTimeUtc>,
    pub result_url: Option<String>,
    /// JSON, as reported by the worker.
    pub result: Option<String>,
    /// The failure's message.
    pub error: Option<String>,
    /// The failure's kind (`content_policy`, `worker_lost`, ...).
    pub error_code: Option<String>,
    /// The item's index in the batch this batch retried, if it is a retry.
    pub source_idx: Option<i32>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
