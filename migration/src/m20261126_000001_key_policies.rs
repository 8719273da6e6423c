//! Per-key policies: which secret a call used during a key rotation (`usage_event.key_version`)
//! and the index the claim counts a key's running items through (`max_running_items`).
use sea_orm_migration::{prelude::*, schema::*};

/// Adds the columns and the index.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvent {
    Table,
    KeyVersion,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(UsageEvent::Table)
                    .add_column(string_len_null(UsageEvent::KeyVersion, 16))
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX ix_batch_item_key_running ON batch_item (api_key_id) \
                 WHERE status = 'running'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX ix_batch_item_key_running")
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(UsageEvent::Table)
                    .drop_column(UsageEvent::KeyVersion)
                    .to_owned(),
            )
            .await
    }
}
