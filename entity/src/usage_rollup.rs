//! Audited calls summed per key, UTC day and outcome (status class and error code): what the
//! usage reports read. It outlives the raw `usage_event` rows under retention.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_rollup")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub api_key_id: i64,
    /// UTC date, `YYYY-MM-DD`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub day: String,
    /// HTTP status divided by 100.
    #[sea_orm(primary_key, auto_increment = false)]
    pub status_class: i32,
    /// The error code of refused calls; empty for none.
    #[sea_orm(primary_key, auto_increment = false)]
    pub error_code: String,
    /// Calls (an aggregated audit row adds its count).
    pub calls: i64,
    /// Calls answered 429.
    pub rate_limited: i64,
    /// Batches created (201 with a batch).
    pub batches: i64,
    /// Items of the batches created.
    pub items: i64,
}

impl ActiveModelBehavior for ActiveModel {}
