//! Credits charged per key and UTC day, summed as charges are written to the ledger: what the
//! usage reports read instead of the ledger's rows.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "charge_rollup")]
pub struct Model {
    /// The owning account (`account.id`): the column keeps the name it had before accounts,
    /// when each key was its own account with the key's id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub api_key_id: i64,
    /// UTC date, `YYYY-MM-DD`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub day: String,
    pub credits: i64,
}

impl ActiveModelBehavior for ActiveModel {}
