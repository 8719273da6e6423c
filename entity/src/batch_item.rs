//! One prompt of a batch, claimed by workers under a lease.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "batch_item")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub batch_id: Uuid,
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
    pub error: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
