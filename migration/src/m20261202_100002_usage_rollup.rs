//! The usage rollup: audited calls per key, UTC day and outcome (`usage_rollup`), and credits
//! charged per key and UTC day (`charge_rollup`), kept as audit and ledger rows are written, so
//! that a usage report reads at most one row per day and outcome whatever the key's history.
//! Both are backfilled from the rows kept so far.
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

/// Creates and backfills the tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The UTC date (`YYYY-MM-DD`) of a timestamp column, as the store writes it.
fn day(backend: DbBackend, col: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
        _ => format!("substr({col}, 1, 10)"),
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        for sql in [
            "CREATE TABLE usage_rollup (\
             api_key_id BIGINT NOT NULL REFERENCES api_key (id) ON DELETE RESTRICT, \
             day VARCHAR(10) NOT NULL, status_class INTEGER NOT NULL, \
             error_code VARCHAR(32) NOT NULL DEFAULT '', calls BIGINT NOT NULL DEFAULT 0, \
             rate_limited BIGINT NOT NULL DEFAULT 0, batches BIGINT NOT NULL DEFAULT 0, \
             items BIGINT NOT NULL DEFAULT 0, \
             PRIMARY KEY (api_key_id, day, status_class, error_code))",
            "CREATE INDEX ix_usage_rollup_day ON usage_rollup (day)",
            "CREATE TABLE charge_rollup (\
             api_key_id BIGINT NOT NULL REFERENCES api_key (id) ON DELETE RESTRICT, \
             day VARCHAR(10) NOT NULL, credits BIGINT NOT NULL DEFAULT 0, \
             PRIMARY KEY (api_key_id, day))",
            "CREATE INDEX ix_charge_rollup_day ON charge_rollup (day)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        let usage_day = day(backend, "minute_bucket");
        db.execute_unprepared(&format!(
            "INSERT INTO usage_rollup \
             (api_key_id, day, status_class, error_code, calls, rate_limited, batches, items) \
             SELECT api_key_id, {usage_day}, status / 100, COALESCE(error_code, ''), \
             SUM(count), SUM(CASE WHEN status = 429 THEN count ELSE 0 END), \
             SUM(CASE WHEN status = 201 AND batch_id IS NOT NULL THEN 1 ELSE 0 END), \
             SUM(CASE WHEN status = 201 THEN items ELSE 0 END) \
             FROM usage_event WHERE api_key_id IS NOT NULL \
             GROUP BY api_key_id, {usage_day}, status / 100, COALESCE(error_code, '')"
        ))
        .await?;
        let charge_day = day(backend, "created_at");
        db.execute_unprepared(&format!(
            "INSERT INTO charge_rollup (api_key_id, day, credits) \
             SELECT api_key_id, {charge_day}, SUM(amount) FROM credit_ledger \
             WHERE kind = 'charge' GROUP BY api_key_id, {charge_day}"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP TABLE charge_rollup").await?;
        db.execute_unprepared("DROP TABLE usage_rollup").await?;
        Ok(())
    }
}
