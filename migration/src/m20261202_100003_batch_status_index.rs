//! An index for a key's batches of one status, newest first: a list page filtered by status
//! reads its page, not the key's other batches.
use sea_orm_migration::prelude::*;

/// Adds the index.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX ix_batch_job_key_status ON batch_job (api_key_id, status, id)",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX ix_batch_job_key_status")
            .await?;
        Ok(())
    }
}
