//! Retention: old usage rows and finished webhook deliveries are deleted in small chunks through
//! indexes made for it, so a pruning pass never holds a long lock. Safe on several nodes (two
//! nodes deleting the same chunk delete it once).
use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr};

use crate::db::stmt;
use crate::settings::RetentionSettings;

/// Rows deleted per statement.
const CHUNK: u32 = 1000;
/// Chunks per table and pass, so one pass is bounded; the next pass goes on.
const MAX_CHUNKS: u32 = 50;

/// Rows deleted by one pass, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// `usage_event` rows.
    pub usage: u64,
    /// `webhook_delivery` rows (their attempts go with them).
    pub webhook_deliveries: u64,
}

async fn prune_table(
    db: &DatabaseConnection,
    table: &'static str,
    sql: &str,
    cutoff: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let mut total = 0;
    for _ in 0..MAX_CHUNKS {
        let r = db
            .execute_raw(stmt(db.get_database_backend(), sql, [cutoff.into()]))
            .await?;
        total += r.rows_affected();
        if r.rows_affected() < u64::from(CHUNK) {
            break;
        }
    }
    if total > 0 {
        metrics::counter!("retention_pruned_rows_total", "table" => table).increment(total);
        tracing::info!(table, rows = total, "pruned old rows");
    }
    Ok(total)
}

/// Deletes what `retention` no longer keeps, as of `now`. On SQLite the freed pages are then
/// returned to the file system (`auto_vacuum = INCREMENTAL` on databases it created).
pub async fn prune(
    db: &DatabaseConnection,
    retention: &RetentionSettings,
    now: DateTime<Utc>,
) -> Result<Pruned, DbErr> {
    let mut pruned = Pruned::default();
    if retention.usage_days > 0 {
        let cutoff = now - TimeDelta::days(retention.usage_days.into());
        // The LIMIT is written into the SQL: SQLite re-prepares statements with a bound LIMIT.
        let sql = format!(
            "DELETE FROM usage_event WHERE id IN \
             (SELECT id FROM usage_event WHERE created_at < $1 LIMIT {CHUNK})"
        );
        pruned.usage = prune_table(db, "usage_event", &sql, cutoff).await?;
    }
    if retention.webhook_days > 0 {
        let cutoff = now - TimeDelta::days(retention.webhook_days.into());
        let sql = format!(
            "DELETE FROM webhook_delivery WHERE id IN \
             (SELECT id FROM webhook_delivery WHERE status <> 'pending' AND created_at < $1 LIMIT {CHUNK})"
        );
        pruned.webhook_deliveries = prune_table(db, "webhook_delivery", &sql, cutoff).await?;
    }
    if db.get_database_backend() == DbBackend::Sqlite
        && pruned.usage + pruned.webhook_deliveries > 0
    {
        db.execute_unprepared("PRAGMA incremental_vacuum").await?;
    }
    Ok(pruned)
}
