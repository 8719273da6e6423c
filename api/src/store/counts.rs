//! The open counters of the batch row (`queued_count`, `running_count`): moved in the same
//! transaction as every item statement that moves items into, out of or between `queued` and
//! `running`, and read without touching items.
use sea_orm::{ConnectionTrait, DbErr};
use uuid::Uuid;

use super::sql::stmt;

/// Queued and running counts of some batches, as their rows keep them: one read of the rows
/// by primary key.
pub async fn open_counts<C: ConnectionTrait>(
    db: &C,
    batch_ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, (i64, i64)>, DbErr> {
    if batch_ids.is_empty() {
        return Ok(Default::default());
    }
    let sql = format!(
        "SELECT id, queued_count, running_count FROM batch_job WHERE id IN ({})",
        super::sql::placeholders(1, batch_ids.len())
    );
    let values = batch_ids.iter().map(|&id| id.into());
    db.query_all_raw(stmt(db.get_database_backend(), &sql, values))
        .await?
        .into_iter()
        .map(|r| {
            let (q, n): (i32, i32) = (
                r.try_get("", "queued_count")?,
                r.try_get("", "running_count")?,
            );
            Ok((r.try_get("", "id")?, (i64::from(q), i64::from(n))))
        })
        .collect()
}

/// Moves the open counts of batches by `(queued, running)` each: the companion of every item
/// statement that moves items into, out of or between `queued` and `running` (claims,
/// requeues, failures, cancels, expiries), run in the same transaction. One statement for all
/// the batches, which PostgreSQL locks in id order (the order of the map).
pub async fn shift_open<C: ConnectionTrait>(
    txn: &C,
    shifts: &std::collections::BTreeMap<Uuid, (i32, i32)>,
) -> Result<(), DbErr> {
    let shifts: Vec<(&Uuid, &(i32, i32))> = shifts.iter().filter(|(_, d)| **d != (0, 0)).collect();
    if shifts.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    // Three values per batch: id, queued, running.
    let (mut queued, mut running, mut ids) = (String::new(), String::new(), Vec::new());
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(shifts.len() * 3);
    for (i, (id, (q, r))) in shifts.iter().enumerate() {
        let at = 3 * i + 1;
        queued.push_str(&format!(" WHEN ${at} THEN ${}", at + 1));
        running.push_str(&format!(" WHEN ${at} THEN ${}", at + 2));
        ids.push(format!("${at}"));
        values.extend([(**id).into(), (*q).into(), (*r).into()]);
    }
    let sql = format!(
        "UPDATE batch_job SET queued_count = queued_count + CASE id{queued} ELSE 0 END, \
         running_count = running_count + CASE id{running} ELSE 0 END \
         WHERE id IN ({})",
        ids.join(", ")
    );
    txn.execute_raw(stmt(backend, &sql, values)).await?;
    Ok(())
}
