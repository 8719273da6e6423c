//! The one row the readiness probe rewrites while writes are failing.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "store_probe")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i32,
    pub probed_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
