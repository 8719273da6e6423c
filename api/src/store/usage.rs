//! `usage_event`: the audit of customer calls, one row per call (or per minute of refused
//! strangers' calls, with a count), and `usage_rollup`, its per account, UTC day, key and outcome
//! summary, kept by the same statements' transaction as the rows are written. Reports read the
//! rollup (with `charge_rollup` for the credits charged): at most one row per day and outcome,
//! whatever the key's history, and still there after retention pruned the raw rows.
use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, NaiveDate, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DbErr};

use super::sql::{day_expr, day_of, limit, stmt, value_rows};
use crate::domain::ids::AccountId;
pub use crate::domain::usage::{CallCounts, DayUsage, UsageRow};

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
    user_agent, minute_bucket, latency_us, batch_id, items, credits, count, created_at, key_version, \
    account_id";
const N_COLUMNS: usize = 17;

/// Rows per multi-row insert: 17 values each, far below both stores' limits on bound values.
const INSERT_CHUNK: usize = 256;

/// Writes audit rows, each with the time it was written: one statement per chunk of rows, and
/// one upsert of the rollup rows they add to (see [`add_to_rollup`]).
pub async fn insert_many<C: ConnectionTrait>(
    db: &C,
    rows: &[(&UsageRow, DateTime<Utc>)],
) -> Result<(), DbErr> {
    let accounts = accounts_of_aggregated(db, rows).await?;
    let account_of = |row: &UsageRow| {
        row.account_id
            .or_else(|| row.api_key_id.and_then(|k| accounts.get(&k).copied()))
    };
    add_to_rollup(db, rows, &account_of).await?;
    for chunk in rows.chunks(INSERT_CHUNK) {
        let tuples = value_rows(db.get_database_backend(), chunk.len(), N_COLUMNS);
        let sql = format!("INSERT INTO usage_event ({COLUMNS}) VALUES {tuples}");
        let values = chunk
            .iter()
            .flat_map(|(row, now)| row_values(row, account_of(row), *now))
            .collect::<Vec<_>>();
        db.execute_raw(stmt(db.get_database_backend(), &sql, values))
            .await?;
    }
    Ok(())
}

/// The accounts of the keys of rows that name a key and no account (a key's refused calls
/// aggregated per minute by the audit layer, which counts them per key): one read, only when
/// there are such rows.
async fn accounts_of_aggregated<C: ConnectionTrait>(
    db: &C,
    rows: &[(&UsageRow, DateTime<Utc>)],
) -> Result<std::collections::HashMap<i64, i64>, DbErr> {
    let mut keys: Vec<i64> = rows
        .iter()
        .filter(|(r, _)| r.account_id.is_none())
        .filter_map(|(r, _)| r.api_key_id)
        .collect();
    if keys.is_empty() {
        return Ok(Default::default());
    }
    keys.sort_unstable();
    keys.dedup();
    let sql = format!(
        "SELECT id, account_id FROM api_key WHERE id IN ({})",
        super::sql::id_list(&keys)
    );
    let mut out = std::collections::HashMap::new();
    for r in db
        .query_all_raw(stmt(db.get_database_backend(), &sql, []))
        .await?
    {
        let id: i64 = r.try_get("", "id")?;
        let account: Option<i64> = r.try_get("", "account_id")?;
        out.insert(id, account.unwrap_or(id));
    }
    Ok(out)
}

fn row_values(
    row: &UsageRow,
    account: Option<i64>,
    now: DateTime<Utc>,
) -> [sea_orm::Value; N_COLUMNS] {
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
        account.into(),
    ]
}

/// A rollup row's key: account id, key id, UTC day (`YYYY-MM-DD`), status class, error code
/// (empty: none).
type Outcome = (i64, i64, String, i32, String);

/// What audit rows add to their rollup rows: calls, calls answered 429, batches created, items.
#[derive(Clone, Copy, Default)]
struct Sums {
    calls: i64,
    rate_limited: i64,
    batches: i64,
    items: i64,
}

/// Rollup rows per upsert: 9 values each.
const ROLLUP_CHUNK: usize = 256;

/// Adds audit rows to the rollup, summed per (account, key, day, outcome) first: one multi-row
/// upsert that adds to existing rows, listed in account order (the order every group locks rows
/// in). Rows without a key (strangers' calls) belong to no account's report and are not rolled
/// up.
async fn add_to_rollup<C: ConnectionTrait>(
    db: &C,
    rows: &[(&UsageRow, DateTime<Utc>)],
    account_of: &(dyn Fn(&UsageRow) -> Option<i64> + Sync),
) -> Result<(), DbErr> {
    let mut sums: BTreeMap<Outcome, Sums> = BTreeMap::new();
    for (row, at) in rows {
        let Some(key) = row.api_key_id else { continue };
        let Some(account) = account_of(row) else {
            continue;
        };
        let outcome = (
            account,
            key,
            day_of(minute_bucket(*at)),
            i32::from(row.status / 100),
            row.error_code.clone().unwrap_or_default(),
        );
        let calls = row.count.max(1);
        let created = row.status == 201;
        let s = sums.entry(outcome).or_default();
        s.calls += calls;
        s.rate_limited += if row.status == 429 { calls } else { 0 };
        s.batches += i64::from(created && row.batch_id.is_some());
        s.items += if created { i64::from(row.items) } else { 0 };
    }
    let backend = db.get_database_backend();
    let sums: Vec<(Outcome, Sums)> = sums.into_iter().collect();
    for chunk in sums.chunks(ROLLUP_CHUNK) {
        let tuples = value_rows(backend, chunk.len(), 9);
        let sql = format!(
            "INSERT INTO usage_rollup (account_id, api_key_id, day, status_class, error_code, \
             calls, rate_limited, batches, items) VALUES {tuples} \
             ON CONFLICT (account_id, api_key_id, day, status_class, error_code) DO UPDATE SET \
             calls = usage_rollup.calls + excluded.calls, \
             rate_limited = usage_rollup.rate_limited + excluded.rate_limited, \
             batches = usage_rollup.batches + excluded.batches, \
             items = usage_rollup.items + excluded.items"
        );
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 9);
        for ((account, key, day, class, code), s) in chunk {
            values.extend([
                (*account).into(),
                (*key).into(),
                day.clone().into(),
                (*class).into(),
                code.clone().into(),
                s.calls.into(),
                s.rate_limited.into(),
                s.batches.into(),
                s.items.into(),
            ]);
        }
        db.execute_raw(stmt(backend, &sql, values)).await?;
    }
    Ok(())
}

/// Per-day usage of a key in `[from, to)` (UTC day boundaries), oldest first, as reports
/// serve it: read from the rollups, at most one row per day and outcome (and one per day for
/// the credits charged) through their primary keys.
pub async fn daily<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<DayUsage>, DbErr> {
    let backend = db.get_database_backend();
    let (from_day, to_day) = (day_of(from), day_of(to));
    let values = || {
        [
            account.into(),
            from_day.clone().into(),
            to_day.clone().into(),
        ]
    };
    let rows = db
        .query_all_raw(stmt(backend, &ROLLUP_DAYS, values()))
        .await?;
    let mut days = days_of(rows)?;
    let charged = db
        .query_all_raw(stmt(backend, CHARGED_DAYS, values()))
        .await?;
    for r in charged {
        add_charged(&mut days, r.try_get("", "day")?, r.try_get("", "credits")?);
    }
    Ok(days.into_values().collect())
}

/// The sums of a usage query, over the rollup rows of its group (`calls`, `c2`, `c4`, `c5`,
/// `rl`, `batches`, `items`; read by [`counts_of`]).
const ROLLUP_SUMS: &str = "CAST(SUM(calls) AS BIGINT) AS calls, \
     CAST(SUM(CASE WHEN status_class = 2 THEN calls ELSE 0 END) AS BIGINT) AS c2, \
     CAST(SUM(CASE WHEN status_class = 4 THEN calls ELSE 0 END) AS BIGINT) AS c4, \
     CAST(SUM(CASE WHEN status_class >= 5 THEN calls ELSE 0 END) AS BIGINT) AS c5, \
     CAST(SUM(rate_limited) AS BIGINT) AS rl, CAST(SUM(batches) AS BIGINT) AS batches, \
     CAST(SUM(items) AS BIGINT) AS items";

/// The rows of an account's days `[$2, $3)`, a range of the rollup's primary key, summed per
/// `group` (`day`, or `api_key_id`).
fn rollup_query(group: &str) -> String {
    format!(
        "SELECT {group}, {ROLLUP_SUMS} FROM usage_rollup \
         WHERE account_id = $1 AND day >= $2 AND day < $3 GROUP BY {group} ORDER BY {group}"
    )
}

/// The calls of an account's days, summed per day over the day's outcomes.
static ROLLUP_DAYS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| rollup_query("day"));

/// The calls of an account's days per key.
static ROLLUP_KEYS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| rollup_query("api_key_id"));

/// The sums of one row of a usage query (see [`ROLLUP_SUMS`]).
fn counts_of(r: &sea_orm::QueryResult) -> Result<CallCounts, DbErr> {
    let n = |c: &str| -> Result<i64, DbErr> { Ok(r.try_get::<Option<i64>>("", c)?.unwrap_or(0)) };
    Ok(CallCounts {
        calls: n("calls")?,
        calls_2xx: n("c2")?,
        calls_4xx: n("c4")?,
        calls_5xx: n("c5")?,
        rate_limited: n("rl")?,
        batches: n("batches")?,
        items: n("items")?,
    })
}

/// Calls per key of an account in `[from, to)` (UTC day boundaries), by key id: at most one row
/// per key, day and outcome read.
pub async fn per_key<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(i64, CallCounts)>, DbErr> {
    let backend = db.get_database_backend();
    let values = [account.into(), day_of(from).into(), day_of(to).into()];
    let rows = db
        .query_all_raw(stmt(backend, &ROLLUP_KEYS, values))
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("", "api_key_id")?, counts_of(r)?)))
        .collect()
}

/// The credits charged on a key's days `[$2, $3)`: a range of the primary key.
const CHARGED_DAYS: &str = "SELECT day, credits FROM charge_rollup \
     WHERE api_key_id = $1 AND day >= $2 AND day < $3";

/// The days of a usage query's rows (`day` and the sums of [`ROLLUP_SUMS`]), by day.
fn days_of(rows: Vec<sea_orm::QueryResult>) -> Result<BTreeMap<String, DayUsage>, DbErr> {
    let mut days = BTreeMap::new();
    for r in rows {
        let d: String = r.try_get("", "day")?;
        let date = NaiveDate::parse_from_str(&d, "%Y-%m-%d").unwrap_or_default();
        let counts = counts_of(&r)?;
        days.insert(
            d,
            DayUsage {
                date,
                counts,
                credits_charged: 0,
            },
        );
    }
    Ok(days)
}

/// Sets the credits charged on day `d`, adding the day when it had no call.
fn add_charged(days: &mut BTreeMap<String, DayUsage>, d: String, charged: i64) {
    let date = NaiveDate::parse_from_str(&d, "%Y-%m-%d").unwrap_or_default();
    days.entry(d)
        .or_insert_with(|| DayUsage {
            date,
            ..Default::default()
        })
        .credits_charged = charged;
}

/// [`daily`] computed from the raw audit and ledger rows instead of the rollups: what the
/// rollups must always agree with while the raw rows are kept (their cost grows with the key's
/// history; reports never call it).
pub async fn daily_from_raw_rows<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
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
         CAST(SUM(CASE WHEN status = 201 AND batch_id IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT) AS batches, \
         CAST(SUM(CASE WHEN status = 201 THEN items ELSE 0 END) AS BIGINT) AS items \
         FROM usage_event WHERE COALESCE(account_id, api_key_id) = $1 \
         AND minute_bucket >= $2 AND minute_bucket < $3 \
         GROUP BY {day} ORDER BY {day}"
    );
    let rows = db
        .query_all_raw(stmt(
            backend,
            &sql,
            [account.into(), from.into(), to.into()],
        ))
        .await?;
    let mut days = days_of(rows)?;
    for (d, charged) in super::ledger::charged_per_day(db, account, from, to).await? {
        add_charged(&mut days, d, charged);
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

/// Deletes up to `max` rollup rows (calls and credits charged) of days before `cutoff`'s
/// (UTC): how many.
pub async fn delete_rollup_older_than<C: ConnectionTrait>(
    db: &C,
    cutoff: DateTime<Utc>,
    max: u64,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let mut n = 0;
    for (table, key) in [
        (
            "usage_rollup",
            "account_id, api_key_id, day, status_class, error_code",
        ),
        ("charge_rollup", "api_key_id, day"),
    ] {
        let sql = format!(
            "DELETE FROM {table} WHERE ({key}) IN \
             (SELECT {key} FROM {table} WHERE day < $1 {})",
            limit(max)
        );
        n += db
            .execute_raw(stmt(backend, &sql, [day_of(cutoff).into()]))
            .await?
            .rows_affected();
    }
    Ok(n)
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

/// Reading query plans on a migrated SQLite store (the statements' plans are part of their
/// contract: a report or a page must not grow with history).
#[cfg(test)]
pub(crate) mod plans {
    use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, Value};

    /// A migrated SQLite store in a temporary folder.
    pub async fn migrated() -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/plans.db?mode=rwc", dir.path().display());
        let db = crate::db::connect_url(&url, 1, None).await.unwrap();
        crate::db::migrate(&db).await.unwrap();
        (dir, db)
    }

    /// SQLite's plan of `sql`, one step per line.
    pub async fn plan(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> String {
        db.query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            format!("EXPLAIN QUERY PLAN {sql}"),
            values,
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "detail").unwrap())
        .collect::<Vec<_>>()
        .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::plans::{migrated, plan};
    use super::*;

    /// A usage report reads a range of each rollup's primary key: its days' rows, no more.
    #[tokio::test]
    async fn a_usage_report_reads_a_key_range_of_the_rollups() {
        let (_dir, db) = migrated().await;
        let values = || vec![1i64.into(), "2026-01-01".into(), "2026-02-01".into()];
        for (sql, index) in [
            (
                ROLLUP_DAYS.as_str(),
                "sqlite_autoindex_usage_rollup_1 (account_id",
            ),
            (
                ROLLUP_KEYS.as_str(),
                "sqlite_autoindex_usage_rollup_1 (account_id",
            ),
            (CHARGED_DAYS, "sqlite_autoindex_charge_rollup_1 (api_key_id"),
        ] {
            let p = plan(&db, sql, values()).await;
            assert!(
                p.contains(&format!("USING INDEX {index}=? AND day>? AND day<?)")),
                "{p}"
            );
        }
    }
}
