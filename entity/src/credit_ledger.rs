//! Append-only record of every credit movement.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "credit_ledger")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The owning account (`account.id`): the column keeps the name it had before accounts,
    /// when each key was its own account with the key's id.
    pub api_key_id: i64,
    /// grant, hold, charge, release or adjust.
    pub kind: crate::status::LedgerKind,
    pub amount: i64,
    pub batch_id: Option<Uuid>,
    pub item_id: Option<Uuid>,
    pub note: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
