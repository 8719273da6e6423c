//! An account's prepaid wallet: `available = balance - held`.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "credit_wallet")]
pub struct Model {
    /// The owning account (`account.id`): the column keeps the name it had before accounts,
    /// when each key was its own account with the key's id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub api_key_id: i64,
    pub balance: i64,
    pub held: i64,
    pub updated_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
