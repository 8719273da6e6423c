//! Store failures, classified by code (never by message text): which kind a failure is, whether
//! the transaction it hit may be gone, and when this process last saw one.
//!
//! A store failure — the disk full, an I/O error, the database unreachable, a pool, lock or
//! statement timeout — is answered `503 STORE_UNAVAILABLE`: the call was not stored and a retry
//! with the same request id is safe. Nothing after such a failure trusts the connection it
//! happened on (see `db`: such connections are closed, never handed out again).
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sea_orm::{DbErr, RuntimeErr};

/// The kinds of store failure, as `store_errors_total{kind}` counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// No space left: SQLite `FULL`, PostgreSQL class 53 (disk full, out of memory).
    Full,
    /// The storage failed: SQLite `IOERR`, `CORRUPT`, `NOTADB`, `NOMEM`, `CANTOPEN`.
    Io,
    /// The database cannot be reached or dropped the connection (PostgreSQL class 08, 57P01-03).
    Unavailable,
    /// A pool, lock or statement timeout (SQLite `BUSY`/`LOCKED` after its busy timeout).
    Timeout,
}

impl FaultKind {
    /// Every kind, for registering the counter's series at zero.
    pub const ALL: [FaultKind; 4] = [
        FaultKind::Full,
        FaultKind::Io,
        FaultKind::Unavailable,
        FaultKind::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Full => "full",
            FaultKind::Io => "io",
            FaultKind::Unavailable => "unavailable",
            FaultKind::Timeout => "timeout",
        }
    }
}

/// A store failure: its kind, and whether the transaction it happened in may already be rolled
/// back by the database itself or its connection be in an unknown state (the group that met it
/// must fail as a whole, and its connection must not be reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The kind.
    pub kind: FaultKind,
    /// The transaction or the connection may be gone.
    pub critical: bool,
}

/// SQLite primary result codes (the low byte of an extended code).
mod sqlite {
    pub const BUSY: i64 = 5;
    pub const LOCKED: i64 = 6;
    pub const NOMEM: i64 = 7;
    pub const IOERR: i64 = 10;
    pub const CORRUPT: i64 = 11;
    pub const FULL: i64 = 13;
    pub const CANTOPEN: i64 = 14;
    pub const NOTADB: i64 = 26;
}

/// The store failure `e` is, if it is one; `None` for errors of the request or of our code
/// (constraint violations, decoding, a missing row).
pub fn classify(e: &DbErr) -> Option<Fault> {
    let fault = |kind, critical| Some(Fault { kind, critical });
    let runtime = match e {
        DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout) => {
            return fault(FaultKind::Timeout, false);
        }
        DbErr::ConnectionAcquire(_) => return fault(FaultKind::Unavailable, false),
        DbErr::Conn(r) | DbErr::Exec(r) | DbErr::Query(r) => r,
        _ => return None,
    };
    let RuntimeErr::SqlxError(sqlx) = runtime else {
        return None;
    };
    use sea_orm::sqlx::Error as S;
    match sqlx.as_ref() {
        S::PoolTimedOut => fault(FaultKind::Timeout, false),
        S::PoolClosed | S::WorkerCrashed => fault(FaultKind::Unavailable, true),
        S::Io(_) | S::Tls(_) | S::Protocol(_) => fault(FaultKind::Unavailable, true),
        S::Database(db) => {
            let code = db.code()?;
            if let Ok(extended) = code.parse::<i64>() {
                sqlite_fault(extended & 0xff)
            } else {
                postgres_fault(&code)
            }
        }
        _ => None,
    }
}

fn sqlite_fault(primary: i64) -> Option<Fault> {
    let (kind, critical) = match primary {
        sqlite::FULL => (FaultKind::Full, true),
        sqlite::IOERR | sqlite::CORRUPT | sqlite::NOTADB | sqlite::NOMEM | sqlite::CANTOPEN => {
            (FaultKind::Io, true)
        }
        // Waited the whole busy timeout for another connection's lock. Outside `COMMIT` the
        // transaction is intact; a `COMMIT` that meets it is handled as critical by its caller.
        sqlite::BUSY | sqlite::LOCKED => (FaultKind::Timeout, false),
        _ => return None,
    };
    Some(Fault { kind, critical })
}

fn postgres_fault(sqlstate: &str) -> Option<Fault> {
    let class = sqlstate.get(..2)?;
    let (kind, critical) = match (class, sqlstate) {
        // connection_exception
        ("08", _) => (FaultKind::Unavailable, true),
        // admin_shutdown, crash_shutdown, cannot_connect_now
        (_, "57P01" | "57P02" | "57P03") => (FaultKind::Unavailable, true),
        // insufficient_resources: disk_full, out_of_memory, too_many_connections
        ("53", "53300") => (FaultKind::Unavailable, false),
        ("53", _) => (FaultKind::Full, false),
        // query_canceled (statement_timeout), lock_not_available (lock_timeout)
        (_, "57014" | "55P03") => (FaultKind::Timeout, false),
        // system_error (I/O), internal_error, data_corrupted, index_corrupted
        ("58", _) | (_, "XX000" | "XX001" | "XX002") => (FaultKind::Io, false),
        _ => return None,
    };
    Some(Fault { kind, critical })
}

/// Milliseconds since the epoch of the last store failure this process saw (0: none).
static LAST_FAULT_MS: AtomicI64 = AtomicI64::new(0);

/// How long after a store failure pooled connections are checked before use.
pub const SUSPECT_FOR_MS: i64 = 10_000;

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Counts a store failure and notes its time.
pub fn record(fault: Fault) {
    LAST_FAULT_MS.store(now_ms(), Ordering::Relaxed);
    metrics::counter!("store_errors_total", "kind" => fault.kind.as_str()).increment(1);
}

/// True within [`SUSPECT_FOR_MS`] of the last store failure: a pooled connection may be one the
/// database dropped, so it is pinged before it is handed out.
pub fn recently_failed() -> bool {
    let last = LAST_FAULT_MS.load(Ordering::Relaxed);
    last != 0 && now_ms() - last < SUSPECT_FOR_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_codes_are_classified_by_their_primary_code() {
        // SQLITE_IOERR_WRITE (778) and SQLITE_FULL (13) both leave the transaction unknown.
        assert_eq!(
            sqlite_fault(778 & 0xff),
            Some(Fault {
                kind: FaultKind::Io,
                critical: true
            })
        );
        assert_eq!(sqlite_fault(13).map(|f| f.kind), Some(FaultKind::Full));
        assert_eq!(sqlite_fault(5).map(|f| f.critical), Some(false));
        // A constraint violation (19) is the request's, not the store's.
        assert_eq!(sqlite_fault(19), None);
    }

    #[test]
    fn postgres_states_are_classified_by_class() {
        assert_eq!(
            postgres_fault("08006").map(|f| f.kind),
            Some(FaultKind::Unavailable)
        );
        assert_eq!(postgres_fault("57P01").map(|f| f.critical), Some(true));
        assert_eq!(
            postgres_fault("53100").map(|f| f.kind),
            Some(FaultKind::Full)
        );
        assert_eq!(
            postgres_fault("57014").map(|f| f.kind),
            Some(FaultKind::Timeout)
        );
        // unique_violation and serialization_failure are not store failures.
        assert_eq!(postgres_fault("23505"), None);
        assert_eq!(postgres_fault("40001"), None);
    }
}
