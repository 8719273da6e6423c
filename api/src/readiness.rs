//! What `/readyz` reports: a background probe's latest finding, so that the answer never waits
//! for the store. The probe reads through the read pool every [`PROBE_INTERVAL`] (bounded by
//! [`PROBE_TIMEOUT`]); the store is not ready while groups of writes fail by a store failure
//! (within `commit::FAILING_FOR` of the last), and meanwhile the probe writes one row through
//! the write pipeline, so that a store that still fails is seen failing without traffic.
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use sea_orm::{ConnectionTrait, Statement};

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

use crate::store::commit::Writes;

/// How often the probe runs.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long one probe may take before the store counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The store as the probe last found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreState {
    /// Reads and writes work and every migration is applied.
    Ready,
    /// Not probed yet.
    Starting,
    /// Reads fail or time out.
    Unreachable,
    /// Reads work, writes fail (a full disk, an I/O error).
    WritesFailing,
    /// Migrations are pending.
    MigrationsPending,
}

impl StoreState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => StoreState::Ready,
            2 => StoreState::Unreachable,
            3 => StoreState::WritesFailing,
            4 => StoreState::MigrationsPending,
            _ => StoreState::Starting,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            StoreState::Ready => 0,
            StoreState::Starting => 1,
            StoreState::Unreachable => 2,
            StoreState::WritesFailing => 3,
            StoreState::MigrationsPending => 4,
        }
    }

    /// The `database` field of `/readyz`.
    pub fn database(self) -> &'static str {
        match self {
            StoreState::Ready | StoreState::MigrationsPending => "ok",
            StoreState::Starting => "starting",
            StoreState::Unreachable => "unreachable",
            StoreState::WritesFailing => "writes_failing",
        }
    }

    /// The `migrations` field of `/readyz`.
    pub fn migrations(self) -> &'static str {
        match self {
            StoreState::Ready | StoreState::WritesFailing => "applied",
            StoreState::MigrationsPending => "pending",
            StoreState::Starting | StoreState::Unreachable => "unknown",
        }
    }
}

/// The probe's latest finding.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    /// What the probe found last.
    pub fn get(&self) -> StoreState {
        StoreState::from_u8(self.0.load(Ordering::Relaxed))
    }

    /// Records what a probe found.
    pub fn set(&self, s: StoreState) {
        if s != self.get() {
            tracing::info!(store = s.database(), "store readiness changed");
        }
        self.0.store(s.as_u8(), Ordering::Relaxed);
        metrics::gauge!("store_up").set(if s == StoreState::Ready { 1.0 } else { 0.0 });
    }
}

/// One probe: read, then (while writes fail) write.
pub async fn probe(db: &DatabaseConnection, writes: &Writes, now: DateTime<Utc>) -> StoreState {
    let read = async {
        db.query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT 1 AS v",
        ))
        .await?;
        crate::db::migrations_applied(db).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return StoreState::MigrationsPending,
        Ok(Err(_)) | Err(_) => return StoreState::Unreachable,
    }
    if !writes.failing() {
        return StoreState::Ready;
    }
    // Writes failed lately: a write of the probe's own, which fails as long as the store does
    // (and keeps it counted as failing); ready again once no write has failed for a while.
    let write = writes.run(None, move |txn| {
        Box::pin(async move { Ok(crate::store::probe::touch(txn, now).await?) })
    });
    let _ = tokio::time::timeout(PROBE_TIMEOUT, write).await;
    if writes.failing() {
        StoreState::WritesFailing
    } else {
        StoreState::Ready
    }
}
