//! One HTTP attempt of a webhook delivery.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "webhook_attempt")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub created_at: DateTimeUtc,
    /// What kind of failure: dns, connect, timeout, tls, refused_target, http, config.
    pub error_kind: Option<String>,
    /// The first 1 KB of the answer's body.
    pub response_excerpt: Option<String>,
}

impl ActiveModelBehavior for ActiveModel {}
