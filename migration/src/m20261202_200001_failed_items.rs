//! Failures a customer can act on: an item's `error_code` (what kind of failure, beside its
//! message in `error`) and `source_idx` (its index in the batch it was retried from); a batch's
//! `error_counts` (failed items per code, a JSON object kept with every final failure) and the
//! link between a batch and its retry (`retry_of` / `retried_by`). Existing failures are
//! backfilled: a lease that ran out is `worker_lost`, any other failure `internal`.
use sea_orm_migration::sea_orm::prelude::Uuid;
use sea_orm_migration::sea_orm::{self, ConnectionTrait};
use sea_orm_migration::{prelude::*, schema::*};

/// Adds and backfills the columns.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum BatchItem {
    Table,
    ErrorCode,
    SourceIdx,
}

#[derive(DeriveIden)]
enum BatchJob {
    Table,
    ErrorCounts,
    RetryOf,
    RetriedBy,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            string_null(BatchItem::ErrorCode).to_owned(),
            integer_null(BatchItem::SourceIdx).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(BatchItem::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        for col in [
            text_null(BatchJob::ErrorCounts).to_owned(),
            uuid_null(BatchJob::RetryOf).to_owned(),
            uuid_null(BatchJob::RetriedBy).to_owned(),
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
        let db = manager.get_connection();
        db.execute_unprepared(
            "UPDATE batch_item SET error_code = CASE WHEN error = 'lease expired' \
             THEN 'worker_lost' ELSE 'internal' END WHERE status = 'failed'",
        )
        .await?;
        // Failed items per code, per batch that has any, as the JSON object the service keeps.
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT batch_id, error_code, COUNT(*) AS n FROM batch_item \
                 WHERE status = 'failed' GROUP BY batch_id, error_code ORDER BY batch_id",
            ))
            .await?;
        // The codes are the service's own snake_case names: nothing to escape.
        let mut counts: std::collections::BTreeMap<Uuid, Vec<String>> = Default::default();
        for r in rows {
            let batch: Uuid = r.try_get("", "batch_id")?;
            let code: String = r.try_get("", "error_code")?;
            let n: i64 = r.try_get("", "n")?;
            counts
                .entry(batch)
                .or_default()
                .push(format!("\"{code}\":{n}"));
        }
        for (batch, pairs) in counts {
            db.execute_raw(sea_orm::Statement::from_sql_and_values(
                db.get_database_backend(),
                match db.get_database_backend() {
                    sea_orm::DbBackend::Postgres => {
                        "UPDATE batch_job SET error_counts = $1 WHERE id = $2"
                    }
                    _ => "UPDATE batch_job SET error_counts = ? WHERE id = ?",
                },
                [format!("{{{}}}", pairs.join(",")).into(), batch.into()],
            ))
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [BatchItem::ErrorCode, BatchItem::SourceIdx] {
            manager
                .alter_table(
                    Table::alter()
                        .table(BatchItem::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        for col in [
            BatchJob::ErrorCounts,
            BatchJob::RetryOf,
            BatchJob::RetriedBy,
        ] {
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
