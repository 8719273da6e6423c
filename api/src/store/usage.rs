//! `usage_event`: the audit of customer calls, one row per call (or per minute of refused
//! strangers' calls, with a count), and its per-day summaries.
use chrono::{DateTime, DurationRound, NaiveDate, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::sql::{limit, stmt, value_rows};
pub use crate::domain::usage::{DayUsage, UsageRow};

/// The UTC minute containing `t`.
pub fn minute_bucket(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::minutes(1)).unwrap_or(t)
}

/// Writes one audit row.
pub async fn insert<C: ConnectionTrait>(
    db: &C,
    row: &UsageRow,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    insert_many(db, &[(row, now)]).await
}

/// Columns of an audit row, in the order [`row_values`] binds them.
const COLUMNS: &str = "api_key_id, request_id, method, path, status, error_code, client_ip, \
    user_agent, minute_bucket, latency_us, batch_id, items, credits, count, created_at, key_version";
const N_COLUMNS: usize = 16;

/// Rows per multi-row insert: 16 values each, far below both stores' limits on bound values.
const INSERT_CHUNK: usize = 256;

/// Writes audit rows, each with the time it was written: one statement per chunk of rows.
pub async fn insert_many<C: ConnectionTrait>(
    db: &C,
    rows: &[(&UsageRow, DateTime<Utc>)],
) -> Result<(), DbErr> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let tuples = value_rows(db.get_database_backend(), chunk.len(), N_COLUMNS);
        let sql = format!("INSERT INTO usage_event ({COLUMNS}) VALUES {tuples}");
        let values = chunk
            .iter()
            .flat_map(|(row, now)| row_values(row, *now))
            .collect::<Vec<_>>();
        db.execute_raw(stmt(db.get_database_backend(), &sql, values))
            .await?;
    }
    Ok(())
}

fn row_values(row: &UsageRow, now: DateTime<Utc>) -> [sea_orm::Value; N_COLUMNS] {
    let ua = row
        .user_agent
        .as_ref()
        .map(|s| s.chars().take(512).collect::<String>());
    [
        row.api_key_id.into(),
        row.request_id.clone().into(),
        row.method.chars().take(16).collect::<String>().into(),
        row.path.chars().take(1024).collect::<String>().into(),
        i32::from(row.status).into(),
        row.error_code.clone().into(),
        row.client_ip.clone().into(),
        ua.into(),
        minute_bucket(now).into(),
        row.latency_us.into(),
        row.batch_id.into(),
        row.items.into(),
        row.credits.into(),
        row.count.max(1).into(),
        now.into(),
        row.key_version.into(),
    ]
}

/// The UTC date (`YYYY-MM-DD`) of a timestamp column, as SQL.
pub(super) fn day_expr(backend: DbBackend, col: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
        _ => format!("substr({col}, 1, 10)"),
    }
}

/// Per-day usage of a key in `[from, to)`, oldest first.
pub async fn daily<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<DayUsage>, DbErr> {
    let backend = db.get_database_backend();
    let day = day_expr(backend, "minute_bucket");
    let sql = format!(
        "SELECT {day} AS day, CAST(SUM(count) AS BIGINT) AS calls, \
         CAST(SUM(CASE WHEN status BETWEEN 200 AND 299 THEN count ELSE 0 END) AS BIGINT) AS c2, \
         CAST(SUM(CASE WHEN status BETWEEN 400 AND 499 THEN count ELSE 0 END) AS BIGINT) AS c4, \
         CAST(SUM(CASE WHEN status >= 500 THEN count ELSE 0 END) AS BIGINT) AS c5, \
         CAST(SUM(CASE WHEN status = 429 THEN count ELSE 0 END) AS BIGINT) AS rl, \
         SUM(CASE WHEN status = 201 AND batch_id IS NOT NULL THEN 1 ELSE 0 END) AS batches, \
         SUM(CASE WHEN status = 201 THEN items ELSE 0 END) AS items \
         FROM usage_event WHERE api_key_id = $1 AND minute_bucket >= $2 AND minute_bucket < $3 \
         GROUP BY {day} ORDER BY {day}"
    );
    let rows = db
        .query_all_raw(stmt(backend, &sql, [key_id.into(), from.into(), to.into()]))
        .await?;
    let mut days: std::collections::BTreeMap<String, DayUsage> = Default::default();
    for r in rows {
        let d: String = r.try_get("", "day")?;
        let date = NaiveDate::parse_from_str(&d, "%Y-%m-%d").unwrap_or_default();
        days.insert(
            d,
            DayUsage {
                date,
                calls: r.try_get("", "calls")?,
                calls_2xx: r.try_get::<Option<i64>>("", "c2")?.unwrap_or(0),
                calls_4xx: r.try_get::<Option<i64>>("", "c4")?.unwrap_or(0),
                calls_5xx: r.try_get::<Option<i64>>("", "c5")?.unwrap_or(0),
                rate_limited: r.try_get::<Option<i64>>("", "rl")?.unwrap_or(0),
                batches: r.try_get::<Option<i64>>("", "batches")?.unwrap_or(0),
                items: r.try_get::<Option<i64>>("", "items")?.unwrap_or(0),
                credits_charged: 0,
            },
        );
    }
    for (d, charged) in super::ledger::charged_per_day(db, key_id, from, to).await? {
        let date = NaiveDate::parse_from_str(&d, "%Y-%m-%d").unwrap_or_default();
        days.entry(d)
            .or_insert_with(|| DayUsage {
                date,
                ..Default::default()
            })
            .credits_charged = charged;
    }
    Ok(days.into_values().collect())
}

/// Deletes up to `max` rows written before `cutoff`: how many.
pub async fn delete_older_than<C: ConnectionTrait>(
    db: &C,
    cutoff: DateTime<Utc>,
    max: u64,
) -> Result<u64, DbErr> {
    let sql = format!(
        "DELETE FROM usage_event WHERE id IN \
         (SELECT id FROM usage_event WHERE created_at < $1 {})",
        limit(max)
    );
    let r = db
        .execute_raw(stmt(db.get_database_backend(), &sql, [cutoff.into()]))
        .await?;
    Ok(r.rows_affected())
}

/// Writes one audit row through the write pipeline: with the other audit rows of the group
/// it joins, in one statement, committed with that group.
pub async fn record_through(
    writes: &crate::store::commit::Writes,
    row: UsageRow,
    now: DateTime<Utc>,
) -> Result<(), crate::error::ApiError> {
    writes.audit(row, now).await
}
