//! Completion windows: a batch's `expires_at` (its window's end), `expired_at` (when the window
//! was enforced: its queued items expired), `expired_count`, and `expired` as a status of
//! batches and items. The status checks are widened in place (every stored row already
//! satisfies the wider check): PostgreSQL replaces the constraints; SQLite edits the table's
//! stored definition by the procedure its documentation gives for such changes.
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_migration::{prelude::*, schema::*};

/// Adds the columns, the wider checks and the index the reaper finds due batches through.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum BatchJob {
    Table,
    ExpiresAt,
    ExpiredAt,
    ExpiredCount,
}

const JOB_CHECK: &str = "status IN ('queued','processing','completed','cancelled','expired') \
     AND succeeded_count + failed_count + cancelled_count + expired_count <= total_count";
const ITEM_CHECK: &str =
    "status IN ('queued','running','succeeded','failed','cancelled','expired')";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            timestamp_with_time_zone_null(BatchJob::ExpiresAt),
            timestamp_with_time_zone_null(BatchJob::ExpiredAt),
            integer(BatchJob::ExpiredCount).default(0).to_owned(),
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
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(
                    "DO $$ DECLARE r record; BEGIN \
                     FOR r IN SELECT conrelid::regclass::text AS t, conname FROM pg_constraint \
                     WHERE conrelid IN ('batch_job'::regclass, 'batch_item'::regclass) \
                     AND contype = 'c' LOOP \
                     EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', r.t, r.conname); \
                     END LOOP; END $$",
                )
                .await?;
                db.execute_unprepared(&format!(
                    "ALTER TABLE batch_job ADD CONSTRAINT batch_job_status_counts CHECK ({JOB_CHECK})"
                ))
                .await?;
                db.execute_unprepared(&format!(
                    "ALTER TABLE batch_item ADD CONSTRAINT batch_item_status CHECK ({ITEM_CHECK})"
                ))
                .await?;
            }
            _ => {
                let version: i64 = db
                    .query_one_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        "PRAGMA schema_version",
                    ))
                    .await?
                    .ok_or_else(|| DbErr::Custom("no schema_version".into()))?
                    .try_get_by_index(0)?;
                // One call: the statements must run on one connection of the pool.
                db.execute_unprepared(&format!(
                    "PRAGMA writable_schema = ON; \
                     UPDATE sqlite_master SET sql = replace(sql, '''cancelled'')', \
                     '''cancelled'',''expired'')') \
                     WHERE type = 'table' AND name IN ('batch_job', 'batch_item'); \
                     UPDATE sqlite_master SET sql = replace(sql, \
                     'cancelled_count <= total_count', \
                     'cancelled_count + expired_count <= total_count') \
                     WHERE type = 'table' AND name = 'batch_job'; \
                     PRAGMA schema_version = {}; \
                     PRAGMA writable_schema = OFF",
                    version + 1
                ))
                .await?;
            }
        }
        db.execute_unprepared(
            "CREATE INDEX ix_batch_job_open_expires ON batch_job (expires_at) \
             WHERE status IN ('queued', 'processing')",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        // Rows may be `expired` by now; narrowing the checks back would refuse them.
        Err(DbErr::Migration(
            "completion windows cannot be rolled back once items may have expired".into(),
        ))
    }
}
