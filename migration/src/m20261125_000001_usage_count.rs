//! Aggregated audit rows: `usage_event.count` says how many calls one row stands for (1 for
//! every ordinary call; more for the refused calls of one client address in one minute).
use sea_orm_migration::{prelude::*, schema::*};

/// Adds `usage_event.count`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvent {
    Table,
    Count,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(UsageEvent::Table)
                    .add_column(big_integer(UsageEvent::Count).default(1))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(UsageEvent::Table)
                    .drop_column(UsageEvent::Count)
                    .to_owned(),
            )
            .await
    }
}
