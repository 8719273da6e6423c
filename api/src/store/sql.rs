//! The few rules every statement of the store follows, in one place.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, QueryResult, Statement, Value};

/// A statement with `$n` placeholders (understood by both SQLite and PostgreSQL).
pub fn stmt<I>(backend: DbBackend, sql: &str, values: I) -> Statement
where
    I: IntoIterator<Item = Value>,
{
    Statement::from_sql_and_values(backend, sql, values)
}

/// Leads a statement whose rows tell whether it changed anything although it is not a plain
/// `INSERT`/`UPDATE`/`DELETE … RETURNING` (a `WITH` whose steps each need the one before):
/// when it returns no row, it changed nothing. A unit's transaction reads it so (see
/// `unit::Txn`); anything else that is not a plain read or a plain `RETURNING` counts as a
/// change.
pub const NO_ROW_NO_CHANGE: &str = "/* no row, no change */ ";

/// Runs `parts`, statements that share one list of bound values (`$n` is the n-th value in
/// each of them), and returns the rows they return, in order. Statements that return rows
/// name themselves in a column `part` (`RETURNING 'batch' AS part, …`), so that the caller
/// can tell whose rows are whose.
///
/// On SQLite they are one call: the driver runs each SQLite connection on a thread of its
/// own, and every call is a hand-off to that thread and back (two context switches on a busy
/// core), which costs more than the statements themselves. So a statement that must only run
/// when the one before it changed a row says so in SQL (`WHERE changes() > 0`) instead of
/// waiting for its answer. Elsewhere they run one after the other, each with the values up to
/// the largest `$n` it names.
pub async fn run_together<C: ConnectionTrait>(
    db: &C,
    parts: &[&str],
    values: Vec<Value>,
) -> Result<Vec<QueryResult>, DbErr> {
    let backend = db.get_database_backend();
    if backend == DbBackend::Sqlite {
        return db
            .query_all_raw(stmt(backend, &parts.join(";\n"), values))
            .await;
    }
    let mut rows = Vec::new();
    for sql in parts {
        let n = highest_placeholder(sql).min(values.len());
        rows.extend(
            db.query_all_raw(stmt(backend, sql, values[..n].iter().cloned()))
                .await?,
        );
    }
    Ok(rows)
}

/// The largest `n` of the `$n` placeholders in `sql` (0 when there is none).
fn highest_placeholder(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
            if let Ok(n) = sql[start..end].parse::<usize>() {
                max = max.max(n);
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    max
}

/// The `part` a row of [`run_together`] came from.
pub fn part_of(row: &QueryResult) -> Option<String> {
    row.try_get::<String>("", "part").ok()
}

/// ` FOR UPDATE SKIP LOCKED` where the store has it, for the inner `SELECT` of a claim: rows
/// another transaction holds are skipped instead of waited for, so a claim never waits on a
/// lock. SQLite has one writer, so there is nothing to skip.
pub fn skip_locked(backend: DbBackend) -> &'static str {
    if backend == DbBackend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    }
}

/// ` FOR NO KEY UPDATE SKIP LOCKED` where the store has it: a claim takes a key's row to
/// count and lease its items alone (per-key running caps) without waiting for, or blocking,
/// the `KEY SHARE` locks that inserts referring to the key take. Empty on SQLite (one writer).
pub fn skip_locked_no_key(backend: DbBackend) -> &'static str {
    if backend == DbBackend::Postgres {
        " FOR NO KEY UPDATE SKIP LOCKED"
    } else {
        ""
    }
}

/// `$first, $first+1, …`: `n` placeholders for the values bound after the first `first - 1`.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(…), (…)`: the `VALUES` of a multi-row insert of `rows` rows of `cols` values each, every
/// value of the statement bound in order. SQLite gets anonymous `?`s: the driver looks up the
/// name of every numbered parameter each time it binds, a scan of the statement's parameter
/// list, so numbered parameters cost a multi-row insert time that grows with the square of its
/// size. PostgreSQL gets `$1…` (it has no anonymous form).
pub fn value_rows(backend: DbBackend, rows: usize, cols: usize) -> String {
    let row = |i: usize| match backend {
        DbBackend::Postgres => format!("({})", placeholders(cols * i + 1, cols)),
        _ => format!("({})", vec!["?"; cols].join(", ")),
    };
    (0..rows).map(row).collect::<Vec<_>>().join(", ")
}

/// `a, b, c` of integers, for an `IN (...)` list (ids we hold, never client text).
pub fn id_list(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest `LIMIT` written (callers bound their pages far below it; a page asks for one
/// row more than it returns, to know whether another follows).
pub const MAX_LIMIT: u64 = 10_000;

/// `LIMIT n` written into the SQL, clamped to `1..=MAX_LIMIT`. A `LIMIT` is never a bound
/// parameter on a hot statement: SQLite re-prepares a statement whose `LIMIT` is bound every
/// time it runs. The number is an integer we clamp, so writing it is safe.
pub fn limit(n: u64) -> String {
    format!("LIMIT {}", n.clamp(1, MAX_LIMIT))
}

/// The UTC day of `t` as the rollups key it.
pub fn day_of(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
}

/// The UTC date (`YYYY-MM-DD`) of a timestamp column, as SQL.
pub fn day_expr(backend: DbBackend, col: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
        _ => format!("substr({col}, 1, 10)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_the_values_after_the_first_ones() {
        assert_eq!(placeholders(5, 3), "$5, $6, $7");
        assert_eq!(placeholders(2, 1), "$2");
    }

    #[test]
    fn value_rows_bind_every_value_in_order() {
        assert_eq!(value_rows(DbBackend::Postgres, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(value_rows(DbBackend::Sqlite, 2, 2), "(?, ?), (?, ?)");
    }

    #[test]
    fn the_highest_placeholder_is_found() {
        assert_eq!(highest_placeholder("SELECT 1"), 0);
        assert_eq!(
            highest_placeholder("UPDATE t SET a = $2 WHERE id = $1 OR b = $12"),
            12
        );
    }

    #[test]
    fn limits_are_clamped_literals() {
        assert_eq!(limit(0), "LIMIT 1");
        assert_eq!(limit(10), "LIMIT 10");
        assert_eq!(limit(1001), "LIMIT 1001");
        assert_eq!(limit(u64::MAX), "LIMIT 10000");
    }

    #[test]
    fn skip_locked_only_where_rows_can_be_held() {
        assert_eq!(skip_locked(DbBackend::Sqlite), "");
        assert_eq!(skip_locked(DbBackend::Postgres), " FOR UPDATE SKIP LOCKED");
    }
}
