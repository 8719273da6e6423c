//! Indexes the retention pruner deletes through: usage rows by age, finished webhook deliveries
//! by age (pending ones are never pruned; their attempts go with them by cascade).
use sea_orm_migration::prelude::*;

/// Adds the pruning indexes.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for sql in [
            "CREATE INDEX ix_usage_event_created ON usage_event (created_at)",
            "CREATE INDEX ix_webhook_delivery_finished_created ON webhook_delivery (created_at) \
             WHERE status <> 'pending'",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for sql in [
            "DROP INDEX ix_usage_event_created",
            "DROP INDEX ix_webhook_delivery_finished_created",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}
