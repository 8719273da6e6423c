//! `store_probe`: one row that the readiness probe rewrites while writes are failing, so that
//! `/readyz` learns that the store takes writes again (a real write, not only a read).
use sea_orm_migration::{prelude::*, schema::*};

/// Creates the table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum StoreProbe {
    Table,
    Id,
    ProbedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(StoreProbe::Table)
                    .if_not_exists()
                    .col(integer(StoreProbe::Id).primary_key())
                    .col(timestamp_with_time_zone(StoreProbe::ProbedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(StoreProbe::Table).to_owned())
            .await
    }
}
