//! The write lanes' public face: `Writes` hands a request's writes to its key's lane and
//! answers once the group that carried them is committed.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};

use super::jobs::*;
use super::lane::run_lane;
use crate::domain::usage::UsageRow;
use crate::error::ApiError;
use crate::store::unit::Txn;

/// The write lanes of this process.
#[derive(Clone)]
pub struct Writes {
    pub(super) lanes: Arc<Vec<mpsc::Sender<Job>>>,
    pub(super) counters: Arc<Counters>,
    /// Whether groups take row locks that other processes also take (PostgreSQL), so that
    /// the order of a group's units (by key id) matters.
    pub(super) row_locks: bool,
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
                let (tx, rx) = mpsc::channel::<Job>(4096);
                tokio::spawn(run_lane(db.clone(), rx, Arc::clone(&counters)));
                tx
            })
            .collect();
        Self {
            row_locks: db.get_database_backend() == sea_orm::DbBackend::Postgres,
            lanes: Arc::new(lanes),
            counters,
        }
    }

    /// Whether a unit's key decides anything beyond its lane: on PostgreSQL every group runs
    /// its units by key id, the lock order that keeps nodes from deadlocking; SQLite has one
    /// writer and one lane, where every unit runs in arrival order and takes no lock another
    /// process could hold.
    pub fn orders_by_key(&self) -> bool {
        self.row_locks || self.lanes.len() > 1
    }

    /// Transient conflicts (deadlocks, serialization failures) met so far; each job that met
    /// one was rolled back and run again.
    pub fn conflicts(&self) -> u64 {
        self.counters.conflicts.load(Ordering::Relaxed)
    }

    /// Group transactions committed so far (one per group, however many jobs it held).
    pub fn commits(&self) -> u64 {
        self.counters.commits.load(Ordering::Relaxed)
    }

    /// Groups that left the fast path for the isolated one (one savepoint per job) because a
    /// job failed after changing rows.
    pub fn isolated_groups(&self) -> u64 {
        self.counters.isolated.load(Ordering::Relaxed)
    }

    /// True when a group failed by a store failure within [`FAILING_FOR`]: writes are failing.
    pub fn failing(&self) -> bool {
        let last = self.counters.last_fault_ms.load(Ordering::Relaxed);
        last != 0 && crate::fault::now_ms() - last < FAILING_FOR.as_millis() as i64
    }

    /// Calls of `key` handed to a lane whose outcome has not come back yet (they wait for
    /// their group to commit, or for the store).
    pub fn waiting_for(&self, key: i64) -> usize {
        let waiting = self
            .counters
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        waiting.get(&key).copied().unwrap_or(0)
    }

    /// Counts a call of `key` as waiting until the returned guard is dropped.
    fn wait_of(&self, key: Option<i64>) -> Option<Waiting> {
        let key = key?;
        let mut waiting = self
            .counters
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *waiting.entry(key).or_default() += 1;
        Some(Waiting {
            key,
            counters: Arc::clone(&self.counters),
        })
    }

    fn lane(&self, key: Option<i64>) -> &mpsc::Sender<Job> {
        let i = match key {
            Some(k) => k.rem_euclid(self.lanes.len() as i64) as usize,
            None => rand::random_range(0..self.lanes.len()),
        };
        &self.lanes[i]
    }

    async fn send(&self, key: Option<i64>, job: Job) -> Result<(), ApiError> {
        self.lane(key)
            .send(job)
            .await
            .map_err(|_| ApiError::internal("the write pipeline has stopped"))
    }

    /// Counts one call of `key` in the rate-limit window `(scope, window_start)` and returns
    /// the window's count after it, once committed. The hits of a group are one statement;
    /// hits of one key keep their arrival order (they share a lane).
    pub async fn hit(
        &self,
        key: i64,
        scope: &'static str,
        window_start: i64,
    ) -> Result<i64, ApiError> {
        self.count((key, scope, window_start), None, None).await
    }

    /// Sends one hit, with what its call does next, and returns its count once committed.
    async fn count(
        &self,
        (key, scope, window_start): Window,
        then_audit: Option<AuditAfter>,
        then_unit: Option<(i64, Unit)>,
    ) -> Result<i64, ApiError> {
        let _waiting = self.wait_of(Some(key));
        let (reply, rx) = oneshot::channel();
        let hit = Hit {
            key,
            scope,
            window_start,
            conflicts: 0,
            alone: false,
            then_audit,
            then_unit,
            reply,
        };
        self.send(Some(key), Job::Hit(hit)).await?;
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("a rate-limit hit was dropped")))
    }

    /// Counts one call like [`Writes::hit`] and writes its audit row in the same group, built
    /// by `row` from the window's count after the call (so the row can say whether the call
    /// was admitted): one commit for both. Returns the count and, apart, whether the row was
    /// written; both are known only once committed.
    pub async fn hit_and_audit(
        &self,
        key: i64,
        scope: &'static str,
        window_start: i64,
        row: impl Fn(i64) -> UsageRow + Send + 'static,
        at: DateTime<Utc>,
    ) -> Result<(i64, Result<(), ApiError>), ApiError> {
        let (reply, audit_rx) = oneshot::channel();
        let then = AuditAfter {
            row: Box::new(row),
            at,
            reply,
        };
        let count = self
            .count((key, scope, window_start), Some(then), None)
            .await?;
        let audited = audit_rx
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("an audit row was dropped")));
        Ok((count, audited))
    }

    /// Writes one audit row with the next group (one statement for the group's rows) and
    /// returns once it is committed.
    pub async fn audit(&self, row: UsageRow, at: DateTime<Utc>) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        let key = row.api_key_id;
        let _waiting = self.wait_of(key);
        let audit = Audit {
            row,
            at,
            conflicts: 0,
            reply,
        };
        self.send(key, Job::Audit(audit)).await?;
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("an audit row was dropped")))
    }

    /// Runs `work` in the next group of the lane of `key` (units of one key always share a
    /// lane, so they are decided in arrival order) and returns its output once the group is
    /// committed. `work` may run more than once: after a transient conflict, or when its group
    /// runs again on the isolated path; what an earlier run wrote was always rolled back.
    pub async fn run<T, F>(&self, key: Option<i64>, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, T> + Send + 'static,
    {
        let _waiting = self.wait_of(key);
        let (unit, rx) = unit(key, work);
        self.send(key, Job::Unit(unit)).await?;
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("a write unit was dropped")))
    }

    /// Counts one call of `key` like [`Writes::hit`] and, in the same group, runs `work` as
    /// [`Writes::run`] does when the window's count after the call is at most `limit`: a call
    /// that writes waits for one commit, not one for its count and one for its work. Returns
    /// the count, and the work's output when it ran (`None`: over the limit, nothing ran).
    pub async fn run_counted<T, F>(
        &self,
        key: i64,
        scope: &'static str,
        window_start: i64,
        limit: u32,
        work: F,
    ) -> Result<(i64, Option<T>), ApiError>
    where
        T: Send + 'static,
        F: for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, T> + Send + 'static,
    {
        let _waiting = self.wait_of(Some(key));
        let (work, rx) = unit(Some(key), work);
        let then = (i64::from(limit), work);
        let count = self
            .count((key, scope, window_start), None, Some(then))
            .await?;
        if count > i64::from(limit) {
            return Ok((count, None));
        }
        let out = rx
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("a write unit was dropped")))?;
        Ok((count, Some(out)))
    }
}

/// `f` as it is: names a unit's work before it is handed over (a closure kept in a variable
/// is only seen as taking a transaction of any lifetime when it meets this bound).
pub fn work<T, F>(f: F) -> F
where
    F: for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, T> + Send + 'static,
{
    f
}

/// `work` as a unit of the lane of `key`, and where its output arrives once committed.
fn unit<T, F>(key: Option<i64>, mut work: F) -> (Unit, oneshot::Receiver<Result<T, ApiError>>)
where
    T: Send + 'static,
    F: for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, T> + Send + 'static,
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
    let unit = Unit {
        order: key.unwrap_or(i64::MAX),
        conflicts: 0,
        work: erased,
        fail: Box::new(fail),
    };
    (unit, rx)
}

/// One call of a key counted as waiting (see [`Writes::waiting_for`]) while it lives.
struct Waiting {
    key: i64,
    counters: Arc<Counters>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self
            .counters
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = waiting.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.key);
            }
        }
    }
}
