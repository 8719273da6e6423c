//! Connecting to SQLite or PostgreSQL, migrating safely with many nodes, write transactions.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, Statement, TransactionOptions, TransactionTrait,
};

use crate::settings::{DatabaseSettings, SqliteSynchronous, StoreTimeouts};

/// Arbitrary constant naming the migration advisory lock on PostgreSQL.
const MIGRATION_LOCK_ID: i64 = 0x7669_6465_6f62; // "videob"

/// Opens a pool for `settings.url` (SQLite: WAL, NORMAL sync, busy timeout, foreign keys).
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<DatabaseConnection> {
    PoolSpec::new(settings.url.expose(), settings.max_connections.max(2))
        .timeouts(settings.timeouts)
        .cache_kib(settings.sqlite_cache_kib)
        .open()
        .await
}

/// The connection writes go through. SQLite has one writer at a time: a dedicated pool of one
/// connection queues writers in the application (first come, first served) instead of letting
/// them sleep in SQLite's busy handler. PostgreSQL writes concurrently: the main pool is used.
pub async fn writer_for(
    db: &DatabaseConnection,
    settings: &DatabaseSettings,
    page_limit: &PageLimit,
) -> anyhow::Result<DatabaseConnection> {
    if db.get_database_backend() == DbBackend::Sqlite
        && sqlite_file(settings.url.expose()).is_some()
    {
        page_limit
            .0
            .store(settings.sqlite_max_page_count, Ordering::Relaxed);
        PoolSpec::new(settings.url.expose(), 1)
            .synchronous(settings.sqlite_synchronous)
            .timeouts(settings.timeouts)
            .cache_kib(settings.sqlite_cache_kib)
            .page_limit(page_limit)
            .open()
            .await
    } else {
        Ok(db.clone())
    }
}

/// Opens a pool with an optional PostgreSQL schema search path (used by tests) and the default
/// timeouts. SQLite connections opened here run `synchronous=NORMAL`: they read (and tests write
/// through them); the writer that acknowledges requests is opened by [`writer_for`] with the
/// configured level.
pub async fn connect_url(
    url: &str,
    max_connections: u32,
    schema: Option<&str>,
) -> anyhow::Result<DatabaseConnection> {
    let mut spec = PoolSpec::new(url, max_connections);
    spec.schema = schema;
    spec.open().await
}

/// Like [`connect_url`], with the store's timeouts.
pub async fn connect_url_with(
    url: &str,
    max_connections: u32,
    schema: Option<&str>,
    timeouts: StoreTimeouts,
) -> anyhow::Result<DatabaseConnection> {
    let mut spec = PoolSpec::new(url, max_connections).timeouts(timeouts);
    spec.schema = schema;
    spec.open().await
}

/// SQLite's own page cache per connection, KiB (what `config/base.toml` ships).
const DEFAULT_SQLITE_CACHE_KIB: u32 = 2000;

/// SQLite's `max_page_count` of a writer, shared with the pool so that every connection it
/// opens (again, after a failure) applies it. 0: no limit of ours. Tests make a store "full"
/// with it.
#[derive(Clone, Debug, Default)]
pub struct PageLimit(Arc<AtomicU64>);

impl PageLimit {
    /// Sets the limit for connections opened from now on and on the open writer connection.
    pub async fn set(&self, writer: &DatabaseConnection, pages: u64) -> Result<(), DbErr> {
        self.0.store(pages, Ordering::Relaxed);
        let pages = if pages == 0 {
            u64::from(u32::MAX)
        } else {
            pages
        };
        writer
            .execute_unprepared(&format!("PRAGMA max_page_count = {pages}"))
            .await
            .map(|_| ())
    }
}

/// How to open one pool.
pub(crate) struct PoolSpec<'a> {
    url: &'a str,
    max_connections: u32,
    schema: Option<&'a str>,
    synchronous: SqliteSynchronous,
    timeouts: StoreTimeouts,
    page_limit: Option<PageLimit>,
    cache_kib: u32,
}

impl<'a> PoolSpec<'a> {
    pub(crate) fn new(url: &'a str, max_connections: u32) -> Self {
        Self {
            url,
            max_connections,
            schema: None,
            synchronous: SqliteSynchronous::Normal,
            timeouts: StoreTimeouts::default(),
            page_limit: None,
            cache_kib: DEFAULT_SQLITE_CACHE_KIB,
        }
    }

    pub(crate) fn cache_kib(mut self, kib: u32) -> Self {
        self.cache_kib = kib;
        self
    }

    pub(crate) fn synchronous(mut self, synchronous: SqliteSynchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    pub(crate) fn timeouts(mut self, timeouts: StoreTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub(crate) fn page_limit(mut self, limit: &PageLimit) -> Self {
        self.page_limit = Some(limit.clone());
        self
    }

    pub(crate) async fn open(self) -> anyhow::Result<DatabaseConnection> {
        let url = self.url;
        if let Some(path) = sqlite_file(url)
            && let Some(parent) = std::path::Path::new(&path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating database folder {}", parent.display()))?;
        }
        let t = self.timeouts;
        let mut opts = ConnectOptions::new(url.to_string());
        opts.max_connections(self.max_connections.max(1))
            .min_connections(1)
            .acquire_timeout(t.acquire)
            .sqlx_logging(false);
        if let Some(schema) = self.schema {
            opts.set_schema_search_path(schema.to_string());
        }
        if url.starts_with("sqlite:") {
            // A file on the local disk does not drop connections: no ping before each use (on
            // SQLite every statement, the ping too, is a hand-off to the connection's thread).
            opts.test_before_acquire(false);
            let synchronous = self.synchronous;
            let busy = t.busy;
            let cache = format!("-{}", self.cache_kib);
            opts.map_sqlx_sqlite_opts(move |o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(match synchronous {
                        SqliteSynchronous::Full => sea_orm::sqlx::sqlite::SqliteSynchronous::Full,
                        SqliteSynchronous::Normal => {
                            sea_orm::sqlx::sqlite::SqliteSynchronous::Normal
                        }
                    })
                    .busy_timeout(busy)
                    // Negative: KiB, per connection (see `database.sqlite_cache_kib`).
                    .pragma("cache_size", cache.clone())
                    .foreign_keys(true)
                    // Takes effect on new databases: pruned pages go back to the file system.
                    .auto_vacuum(sea_orm::sqlx::sqlite::SqliteAutoVacuum::Incremental)
            });
            let page_limit = self.page_limit.clone();
            opts.map_sqlx_sqlite_pool_opts(move |p| {
                let page_limit = page_limit.clone();
                p.after_connect(move |conn, _| {
                    let pages = page_limit
                        .as_ref()
                        .map_or(0, |l| l.0.load(Ordering::Relaxed));
                    Box::pin(async move {
                        if pages > 0 {
                            use sea_orm::sqlx::Executor;
                            conn.execute(sea_orm::sqlx::AssertSqlSafe(format!(
                                "PRAGMA max_page_count = {pages}"
                            )))
                            .await?;
                        }
                        Ok(())
                    })
                })
                .after_release(|conn, _| Box::pin(sqlite_connection_is_clean(conn)))
            });
        } else {
            // A ping is a round trip to the server: only for connections idle long enough that
            // the server, a proxy or a firewall may have dropped them, and for every connection
            // shortly after a store failure (the database may have restarted and dropped them
            // all), not before every use.
            opts.test_before_acquire_if_idle_for(Duration::from_secs(1));
            opts.map_sqlx_postgres_before_acquire(|conn, _| {
                Box::pin(async move {
                    if crate::fault::recently_failed() {
                        use sea_orm::sqlx::Connection;
                        Ok(conn.ping().await.is_ok())
                    } else {
                        Ok(true)
                    }
                })
            });
            let (statement, lock) = (t.statement.as_millis(), t.lock.as_millis());
            opts.map_sqlx_postgres_opts(move |o| {
                o.options([
                    ("statement_timeout", statement.to_string()),
                    ("lock_timeout", lock.to_string()),
                ])
            });
        }
        Database::connect(opts)
            .await
            .with_context(|| format!("connecting to {}", crate::settings::redact_url(url)))
    }
}

/// Whether a SQLite connection going back to its pool may be handed out again: only when it is
/// outside any transaction, as SQLite itself and sqlx both see it. After `FULL`, `IOERR` or
/// `NOMEM` SQLite may roll a transaction back by itself while sqlx still counts it open (the next
/// `BEGIN` would become a `SAVEPOINT` inside nothing, and every later "commit" would write
/// nothing); or a failed `ROLLBACK` may leave one open. Such a connection is closed instead.
async fn sqlite_connection_is_clean(
    conn: &mut sea_orm::sqlx::SqliteConnection,
) -> Result<bool, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::Connection;
    if conn.is_in_transaction() {
        tracing::warn!("closing a SQLite connection released inside a transaction");
        return Ok(false);
    }
    let mut handle = conn.lock_handle().await?;
    // SAFETY: the handle is locked out of the connection's worker for the duration of the call,
    // and `sqlite3_get_autocommit` only reads the connection's state.
    let autocommit =
        unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) };
    if autocommit == 0 {
        tracing::warn!("closing a SQLite connection left inside a transaction");
        return Ok(false);
    }
    Ok(true)
}

fn sqlite_file(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        None
    } else {
        Some(path.to_string())
    }
}

/// Applies pending migrations; on PostgreSQL under an advisory lock so that several nodes
/// starting at once all succeed.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let txn = db.begin().await?;
            // Waiting for another node's migration, and migrating, may take longer than the
            // API's statements are allowed.
            txn.execute_unprepared("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
                .await
                .context("lifting timeouts for migrations")?;
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [MIGRATION_LOCK_ID.into()],
            ))
            .await
            .context("taking the migration lock")?;
            Migrator::up(&txn, None)
                .await
                .context("applying migrations")?;
            txn.commit().await?;
        }
        _ => Migrator::up(db, None)
            .await
            .context("applying migrations")?,
    }
    Ok(())
}

/// True when every migration is applied (for `/readyz`). A plain read of the migrations table
/// (sea-orm-migration's own check first creates the table if it is missing, which would wait
/// for the write lock on SQLite).
pub async fn migrations_applied(db: &DatabaseConnection) -> Result<bool, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT version FROM seaql_migrations",
        ))
        .await?;
    let applied: std::collections::HashSet<String> = rows
        .iter()
        .filter_map(|r| r.try_get::<String>("", "version").ok())
        .collect();
    Ok(Migrator::migrations()
        .iter()
        .all(|m| applied.contains(m.name())))
}

/// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite, so that concurrent writers queue on
/// the busy timeout instead of failing when a read turns into a write.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    if db.get_database_backend() == DbBackend::Sqlite {
        db.begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await
    } else {
        db.begin().await
    }
}
