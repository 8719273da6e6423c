//! Group commit. Every write of a request is a unit of work handed to a lane; a lane runs the
//! work that arrived while its previous group was committing as one transaction, each unit in a
//! savepoint of its own, and answers every request only after that one commit. So a burst of
//! requests costs one durable commit (one fsync) instead of one each, and a unit that fails
//! rolls back to its savepoint without failing the others of its group.
//!
//! Invariants stay exact because nothing changes about *what* each unit does: the rate-limit
//! upsert, the conditional wallet update and the idempotency insert are the same statements,
//! now run one after the other inside the group's transaction (arrival order per key). Units
//! of one group are run ordered by key id and, within a key, rate-limit hits before every other
//! write of the key (each kind keeps its arrival order), so groups of different nodes take row
//! locks in the same order: quota row, then wallet. A unit that still meets a deadlock or a
//! serialization failure (rarer shapes, such as a cancel and a report of one batch on two
//! nodes) is rolled back to its savepoint; the units of the group not yet run are not started,
//! the group commits what it has, which releases its locks, and the rest runs again at once.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

/// A unit's future, borrowing the transaction it runs in.
pub type UnitFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// Called once the group's commit is known: `Ok` when committed.
type Completion = Box<dyn FnOnce(Result<(), ApiError>) + Send>;

/// Work erased of its output type, runnable again after a transient conflict.
type Work = Box<dyn for<'a> FnMut(&'a DatabaseTransaction) -> UnitFuture<'a, Completion> + Send>;

struct Unit {
    /// Units of a group run in this order: the key id (unkeyed work last), then the rank of
    /// the unit's kind within its key ([`RANK_QUOTA`] before [`RANK_KEY`]).
    order: (i64, u8),
    /// Times this unit met a transient conflict.
    conflicts: u32,
    work: Work,
    fail: Box<dyn FnOnce(ApiError) + Send>,
}

/// Rate-limit hits: the first row lock a key's units take.
const RANK_QUOTA: u8 = 0;
/// Every other write of a key (wallet, batches, items, usage rows).
const RANK_KEY: u8 = 1;

/// Units gathered into one transaction at most.
const MAX_GROUP: usize = 256;
/// Times a unit is run again after a transient conflict (each time in a later group).
const MAX_RETRIES: u32 = 8;

/// The write lanes of this process.
#[derive(Clone)]
pub struct Writes {
    lanes: Arc<Vec<mpsc::Sender<Unit>>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

impl Writes {
    /// Starts `lanes` lanes committing on `db` (SQLite: one lane on the one writer connection).
    pub fn start(db: DatabaseConnection, lanes: usize) -> Self {
        let counters = Arc::new(Counters::default());
        let lanes = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel::<Unit>(4096);
                tokio::spawn(run_lane(db.clone(), rx, Arc::clone(&counters)));
                tx
            })
            .collect();
        Self {
            lanes: Arc::new(lanes),
            counters,
        }
    }

    /// Transient conflicts (deadlocks, serialization failures) met by units so far; each
    /// unit that met one was rolled back to its savepoint and run again.
    pub fn conflicts(&self) -> u64 {
        self.counters.conflicts.load(Ordering::Relaxed)
    }

    /// Group transactions committed so far (one per group, however many units it held).
    pub fn commits(&self) -> u64 {
        self.counters.commits.load(Ordering::Relaxed)
    }

    /// Runs `work` in the next group of the lane of `key` (units of one key always share a
    /// lane, so they are decided in arrival order) and returns its output once the group is
    /// committed. `work` may run more than once if it meets a transient conflict, always in a
    /// savepoint that was rolled back.
    pub async fn run<T, F>(&self, key: Option<i64>, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: for<'a> FnMut(&'a DatabaseTransaction) -> UnitFuture<'a, T> + Send + 'static,
    {
        self.run_ranked(key, RANK_KEY, work).await
    }

    /// Like [`Writes::run`] for a unit that takes only the key's rate-limit row: it runs
    /// before the key's other units of its group, so every group locks a key's quota row
    /// before its wallet row and groups of different nodes cannot deadlock on the pair.
    pub async fn run_quota<T, F>(&self, key: i64, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: for<'a> FnMut(&'a DatabaseTransaction) -> UnitFuture<'a, T> + Send + 'static,
    {
        self.run_ranked(Some(key), RANK_QUOTA, work).await
    }

    async fn run_ranked<T, F>(&self, key: Option<i64>, rank: u8, mut work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: for<'a> FnMut(&'a DatabaseTransaction) -> UnitFuture<'a, T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, ApiError>>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let send = {
            let tx = Arc::clone(&tx);
            move |r: Result<T, ApiError>| {
                if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(r);
                }
            }
        };
        let send = Arc::new(Mutex::new(Some(send)));
        let fail = {
            let send = Arc::clone(&send);
            move |e: ApiError| {
                if let Some(s) = send.lock().ok().and_then(|mut s| s.take()) {
                    s(Err(e));
                }
            }
        };
        let erased: Work = Box::new(move |txn| {
            let fut = work(txn);
            let send = Arc::clone(&send);
            Box::pin(async move {
                let value = fut.await?;
                let done: Completion = Box::new(move |outcome| {
                    if let Some(s) = send.lock().ok().and_then(|mut s| s.take()) {
                        s(outcome.map(|()| value));
                    }
                });
                Ok(done)
            })
        });
        let lane = match key {
            Some(k) => k.rem_euclid(self.lanes.len() as i64) as usize,
            None => rand::random_range(0..self.lanes.len()),
        };
        let unit = Unit {
            order: (key.unwrap_or(i64::MAX), rank),
            conflicts: 0,
            work: erased,
            fail: Box::new(fail),
        };
        if self.lanes[lane].send(unit).await.is_err() {
            return Err(ApiError::internal("the write pipeline has stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("a write unit was dropped")))
    }
}

/// What a lane counts, shared by the lanes of a process.
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    conflicts: AtomicU64,
}

async fn run_lane(db: DatabaseConnection, mut rx: mpsc::Receiver<Unit>, counters: Arc<Counters>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(u) => group.push(u),
                Err(_) => break,
            }
        }
        // Stable: the units of one key and rank keep their arrival order.
        group.sort_by_key(|u| u.order);
        metrics::histogram!("write_group_size").record(group.len() as f64);
        let mut deferred = run_group(&db, group, &counters).await;
        // Units that met a deadlock or a serialization failure, and the units of their group
        // not yet run, run again in a group of their own, after this group's commit has
        // released every lock it held.
        while !deferred.is_empty() {
            deferred = run_group(&db, deferred, &counters).await;
        }
    }
}

/// Runs one group; returns the units to run again after a transient conflict.
async fn run_group(db: &DatabaseConnection, group: Vec<Unit>, counters: &Counters) -> Vec<Unit> {
    let txn = match crate::db::begin_write(db).await {
        Ok(t) => t,
        Err(e) => {
            let e = ApiError::from(e);
            for u in group {
                (u.fail)(e.clone());
            }
            return Vec::new();
        }
    };
    let mut done: Vec<Completion> = Vec::with_capacity(group.len());
    let mut again = Vec::new();
    let mut units = group.into_iter();
    while let Some(mut unit) = units.next() {
        let sp = match txn.begin().await {
            Ok(sp) => sp,
            Err(e) => {
                (unit.fail)(e.into());
                continue;
            }
        };
        match (unit.work)(&sp).await {
            Ok(completion) => match sp.commit().await {
                Ok(()) => done.push(completion),
                Err(e) => (unit.fail)(e.into()),
            },
            Err(e) if e.transient && unit.conflicts < MAX_RETRIES => {
                let _ = sp.rollback().await;
                unit.conflicts += 1;
                counters.conflicts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("write_conflicts_total").increment(1);
                again.push(unit);
                // The group still holds the locks its earlier units took, so the units after
                // this one would meet the same conflict (and wait for its detection) one by
                // one. They run after this group's commit instead.
                again.extend(units.by_ref());
                break;
            }
            Err(e) => {
                let _ = sp.rollback().await;
                // Nothing of this unit is written: it may be answered now.
                (unit.fail)(e);
            }
        }
    }
    let outcome = txn.commit().await.map_err(ApiError::from);
    counters.commits.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, units = done.len(), "group commit failed");
    }
    for d in done {
        d(outcome.clone());
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Statement};

    async fn sqlite() -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/p.db?mode=rwc", dir.path().display());
        let db = crate::db::connect_url(&url, 1, None).await.unwrap();
        db.execute_unprepared(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL CHECK (v >= 0))",
        )
        .await
        .unwrap();
        (dir, db)
    }

    async fn rows(db: &DatabaseConnection) -> i64 {
        db.query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM t".to_string(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
    }

    async fn insert(writes: &Writes, id: i64, v: i64) -> Result<i64, ApiError> {
        writes
            .run(Some(id), move |txn| {
                Box::pin(async move {
                    txn.execute_raw(Statement::from_sql_and_values(
                        txn.get_database_backend(),
                        "INSERT INTO t (id, v) VALUES ($1, $2)",
                        [id.into(), v.into()],
                    ))
                    .await?;
                    Ok(id)
                })
            })
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_unit_does_not_fail_its_group() {
        let (_dir, db) = sqlite().await;
        let writes = Writes::start(db.clone(), 1);
        // 200 concurrent units, every tenth breaks a CHECK constraint.
        let calls = (0..200).map(|i| {
            let writes = writes.clone();
            async move { insert(&writes, i, if i % 10 == 0 { -1 } else { i }).await }
        });
        let results = futures::future::join_all(calls).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(failed, 20);
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.is_ok(), i % 10 != 0, "unit {i}");
        }
        let n = rows(&db).await;
        assert_eq!(n, 180, "every other unit is committed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_units_share_commits() {
        let (_dir, db) = sqlite().await;
        let writes = Writes::start(db.clone(), 1);
        let calls = (1000..1400).map(|i| {
            let writes = writes.clone();
            async move { insert(&writes, i, 1).await }
        });
        assert!(
            futures::future::join_all(calls)
                .await
                .iter()
                .all(Result::is_ok)
        );
        assert!(
            writes.commits() < 100,
            "400 concurrent units took {} commits",
            writes.commits()
        );
        let n = rows(&db).await;
        assert_eq!(n, 400);
    }
}
