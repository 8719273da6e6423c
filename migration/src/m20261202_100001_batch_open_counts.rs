//! Open item counts on the batch row: `queued_count` and `running_count`, kept with every item
//! transition like the terminal counts, so that a status poll or a list page reads its counts
//! from the batch rows alone. Existing batches are backfilled from their items (open batches
//! only: a final batch has no open item).
use sea_orm_migration::{prelude::*, schema::*};

/// Adds and backfills the columns.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum BatchJob {
    Table,
    QueuedCount,
    RunningCount,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            integer(BatchJob::QueuedCount).default(0).to_owned(),
            integer(BatchJob::RunningCount).default(0).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(BatchJob::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE batch_job SET \
                 queued_count = (SELECT COUNT(*) FROM batch_item \
                   WHERE batch_item.batch_id = batch_job.id AND batch_item.status = 'queued'), \
                 running_count = (SELECT COUNT(*) FROM batch_item \
                   WHERE batch_item.batch_id = batch_job.id AND batch_item.status = 'running') \
                 WHERE status IN ('queued', 'processing')",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [BatchJob::QueuedCount, BatchJob::RunningCount] {
            manager
                .alter_table(
                    Table::alter()
                        .table(BatchJob::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
