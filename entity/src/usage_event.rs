//! One audit row per customer API call, admitted or not.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_event")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub api_key_id: Option<i64>,
    /// The key's account (rows written before accounts existed leave it empty: the key was
    /// its own account, with the key's id).
    pub account_id: Option<i64>,
    /// `current` or `previous`: which of the key's secrets the call used.
    pub key_version: Option<String>,
    pub request_id: Option<String>,
    pub method: String,
    pub path: String,
    pub status: i32,
    pub error_code: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub minute_bucket: DateTimeUtc,
    pub latency_us: i64,
    pub batch_id: Option<Uuid>,
    pub items: i32,
    pub credits: i64,
    /// Calls this row stands for (1, or more for an aggregated row of refused calls).
    pub count: i64,
    pub created_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
