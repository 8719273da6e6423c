//! Connecting to SQLite or PostgreSQL, migrating safely with many nodes, write transactions.
use std::time::Duration;

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, Statement, TransactionOptions, TransactionTrait,
};

use crate::settings::{DatabaseSettings, SqliteSynchronous};

/// Arbitrary constant naming the migration advisory lock on PostgreSQL.
const MIGRATION_LOCK_ID: i64 = 0x7669_6465_6f62; // "videob"

/// Opens a pool for `settings.url` (SQLite: WAL, NORMAL sync, busy timeout, foreign keys).
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<DatabaseConnection> {
    connect_url(settings.url.expose(), settings.max_connections.max(2), None).await
}

/// The connection writes go through. SQLite has one writer at a time: a dedicated pool of one
/// connection queues writers in the application (first come, first served) instead of letting
/// them sleep in SQLite's busy handler. PostgreSQL writes concurrently: the main pool is used.
pub async fn writer_for(
    db: &DatabaseConnection,
    settings: &DatabaseSettings,
) -> anyhow::Result<DatabaseConnection> {
    if db.get_database_backend() == DbBackend::Sqlite
        && sqlite_file(settings.url.expose()).is_some()
    {
        connect_url_with(settings.url.expose(), 1, None, settings.sqlite_synchronous).await
    } else {
        Ok(db.clone())
    }
}

/// Opens a pool with an optional PostgreSQL schema search path (used by tests). SQLite
/// connections opened here run `synchronous=NORMAL`: they read (and tests write through them);
/// the writer that acknowledges requests is opened by [`writer_for`] with the configured level.
pub async fn connect_url(
    url: &str,
    max_connections: u32,
    schema: Option<&str>,
) -> anyhow::Result<DatabaseConnection> {
    connect_url_with(url, max_connections, schema, SqliteSynchronous::Normal).await
}

/// Like [`connect_url`], with SQLite's `synchronous` level.
pub async fn connect_url_with(
    url: &str,
    max_connections: u32,
    schema: Option<&str>,
    synchronous: SqliteSynchronous,
) -> anyhow::Result<DatabaseConnection> {
    if let Some(path) = sqlite_file(url)
        && let Some(parent) = std::path::Path::new(&path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating database folder {}", parent.display()))?;
    }
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(max_connections.max(1))
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    if url.starts_with("sqlite:") {
        // A file on the local disk does not drop connections: no ping before each use (on
        // SQLite every statement, the ping too, is a hand-off to the connection's thread).
        opts.test_before_acquire(false);
    } else {
        // A ping is a round trip to the server: only for connections idle long enough that
        // the server, a proxy or a firewall may have dropped them, not before every use.
        opts.test_before_acquire_if_idle_for(Duration::from_secs(30));
    }
    if let Some(schema) = schema {
        opts.set_schema_search_path(schema.to_string());
    }
    if url.starts_with("sqlite:") {
        opts.map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(match synchronous {
                    SqliteSynchronous::Full => sea_orm::sqlx::sqlite::SqliteSynchronous::Full,
                    SqliteSynchronous::Normal => sea_orm::sqlx::sqlite::SqliteSynchronous::Normal,
                })
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true)
                // Takes effect on new databases: pruned pages go back to the file system.
                .auto_vacuum(sea_orm::sqlx::sqlite::SqliteAutoVacuum::Incremental)
        });
    }
    Database::connect(opts)
        .await
        .with_context(|| format!("connecting to {}", crate::settings::redact_url(url)))
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

/// True when every migration is applied (for `/readyz`).
pub async fn migrations_applied(db: &DatabaseConnection) -> Result<bool, DbErr> {
    Ok(Migrator::get_pending_migrations(db).await?.is_empty())
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
