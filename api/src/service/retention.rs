//! Retention: old usage rows, finished webhook deliveries (and endpoints idle as long) and (only when configured) old days of
//! the usage rollup are deleted in small chunks through indexes made for it, so a pruning pass never holds a long lock. Safe on several nodes (two
//! nodes deleting the same chunk delete it once).
use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr};

use crate::settings::RetentionSettings;
use crate::store::{usage, webhooks};

/// Rows deleted per statement.
const CHUNK: u64 = 1000;
/// Chunks per table and pass, so one pass is bounded; the next pass goes on.
const MAX_CHUNKS: u32 = 50;

/// Rows deleted by one pass, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// `usage_event` rows.
    pub usage: u64,
    /// `webhook_delivery` rows (their attempts go with them).
    pub webhook_deliveries: u64,
    /// `webhook_endpoint` rows of endpoints idle as long (neither disabled nor with a pending
    /// delivery).
    pub webhook_endpoints: u64,
    /// `usage_rollup` and `charge_rollup` rows.
    pub usage_rollup: u64,
}

/// Deletes in chunks with `chunk` (rows deleted by one statement) until a chunk comes back
/// short or the pass has done its share.
async fn prune_table<F, Fut>(table: &'static str, mut chunk: F) -> Result<u64, DbErr>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, DbErr>>,
{
    let mut total = 0;
    for _ in 0..MAX_CHUNKS {
        let n = chunk().await?;
        total += n;
        if n < CHUNK {
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
        pruned.usage = prune_table("usage_event", || {
            usage::delete_older_than(db, cutoff, CHUNK)
        })
        .await?;
    }
    if retention.webhook_days > 0 {
        let cutoff = now - TimeDelta::days(retention.webhook_days.into());
        pruned.webhook_deliveries = prune_table("webhook_delivery", || {
            webhooks::delete_finished_older_than(db, cutoff, CHUNK)
        })
        .await?;
        pruned.webhook_endpoints = prune_table("webhook_endpoint", || {
            webhooks::delete_idle_endpoints_older_than(db, cutoff, CHUNK)
        })
        .await?;
    }
    if retention.usage_rollup_days > 0 {
        let cutoff = now - TimeDelta::days(retention.usage_rollup_days.into());
        pruned.usage_rollup = prune_table("usage_rollup", || {
            usage::delete_rollup_older_than(db, cutoff, CHUNK)
        })
        .await?;
    }
    if db.get_database_backend() == DbBackend::Sqlite
        && pruned.usage + pruned.webhook_deliveries + pruned.webhook_endpoints + pruned.usage_rollup
            > 0
    {
        db.execute_unprepared("PRAGMA incremental_vacuum").await?;
    }
    Ok(pruned)
}
