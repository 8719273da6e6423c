//! The few rules every statement of the store follows, in one place.
use sea_orm::{DbBackend, Statement, Value};

/// A statement with `$n` placeholders (understood by both SQLite and PostgreSQL).
pub fn stmt<I>(backend: DbBackend, sql: &str, values: I) -> Statement
where
    I: IntoIterator<Item = Value>,
{
    Statement::from_sql_and_values(backend, sql, values)
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
