//! Group commit. Every write of a request is handed to a lane; a lane runs the writes that
//! arrived while its previous group was committing as one transaction and answers every
//! request only after that one commit. So a burst of requests costs one durable commit (one
//! fsync) instead of one each.
//!
//! A group runs, in this order:
//! 1. every rate-limit hit of the group as **one** multi-row upsert: the hits of one (key,
//!    scope, window) add `n` to its row at once and are admitted in arrival order (the i-th
//!    of them sees the count before the statement plus i), rows listed by key id;
//! 2. the other units of work (creates, cancels, claims, reports, grants...), ordered by key
//!    id (arrival order within a key);
//! 3. the rows the units appended to the append-only tables (ledger, audit) and every audit
//!    row of the group, one multi-row insert per table.
//!
//! **Fast path.** A group first runs its units without savepoints, straight in the group's
//! transaction. A unit that fails having changed nothing (its [`Txn`] saw no statement change a
//! row: a create refused for want of credits, a report of an unknown item) needs no rollback
//! and is answered with its error once the group is committed. When anything else fails — a
//! unit after changing rows, a statement error, the group's inserts — the transaction is rolled
//! back before anyone was answered and the group runs again on the isolated path.
//!
//! **Isolated path.** Each unit runs in a savepoint of its own and writes its appended rows
//! there: a unit that fails rolls back to its savepoint without failing the others; audit rows
//! are one insert, and one by one after a failure, so that a bad row fails alone.
//!
//! A hit may carry what its call does next, so that the call waits for one commit: a create's
//! work, run in step 2 of the same group only when its count is within the limit
//! ([`Writes::run_counted`]), or a read's audit row, written in step 3 as admitted or refused
//! ([`Writes::hit_and_audit`]).
//!
//! Invariants stay exact because nothing changes about *what* is decided: the rate-limit
//! count, the conditional wallet update and the idempotency insert are the same statements,
//! under the same row locks. Every group takes its locks in one order (quota rows by key,
//! then the other rows by key), so groups of different nodes cannot deadlock on them. A unit
//! that still meets a deadlock or a serialization failure (rarer shapes, such as a cancel and
//! a report of one batch on two nodes) is rolled back to its savepoint; the units of the group
//! not yet run are not started, the group commits what it has, which releases its locks, and
//! the rest runs again at once.
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use super::unit::{Appended, GroupMemo, Txn};
use crate::domain::usage::UsageRow;
use crate::error::ApiError;

/// A unit's future, borrowing the transaction it runs in.
pub type UnitFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// Called once the group's commit is known: `Ok` when committed.
type Completion = Box<dyn FnOnce(Result<(), ApiError>) + Send>;

/// Work erased of its output type, runnable again after a transient conflict.
type Work = Box<dyn for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, Completion> + Send>;

/// What a lane receives.
enum Job {
    Unit(Unit),
    Hit(Hit),
    Audit(Audit),
}

struct Unit {
    /// Units of a group run ordered by key id (unkeyed work last).
    order: i64,
    /// Times this unit met a transient conflict.
    conflicts: u32,
    work: Work,
    fail: Box<dyn FnOnce(ApiError) + Send>,
}

/// One call counted against a rate-limit window; answered with the window's count after it.
struct Hit {
    key: i64,
    scope: &'static str,
    window_start: i64,
    conflicts: u32,
    /// Counted in a statement of its own (after the group's one statement failed).
    alone: bool,
    /// The call's audit row, written in the same group once the count is known.
    then_audit: Option<AuditAfter>,
    /// The call's work and its quota: run in the same group when the count is within it.
    then_unit: Option<(i64, Unit)>,
    reply: oneshot::Sender<Result<i64, ApiError>>,
}

/// A rate-limit window: key id, scope, start.
type Window = (i64, &'static str, i64);

impl Hit {
    fn window(&self) -> Window {
        (self.key, self.scope, self.window_start)
    }

    /// What the call does once counted: its audit row, and its work if within the limit (a
    /// call over it is answered with the count alone, its work never run).
    fn follow_up(&mut self, count: i64, units: &mut Vec<Unit>, audits: &mut Vec<Audit>) {
        if let Some(then) = self.then_audit.take() {
            audits.push(then.into_audit(count));
        }
        if let Some((limit, unit)) = self.then_unit.take()
            && count <= limit
        {
            units.push(unit);
        }
    }
}

/// The audit row of a counted call whose row depends on the count (admitted or refused).
struct AuditAfter {
    /// Builds the row from the count (called again if the group runs again).
    row: Box<dyn Fn(i64) -> UsageRow + Send>,
    at: DateTime<Utc>,
    reply: oneshot::Sender<Result<(), ApiError>>,
}

impl AuditAfter {
    /// The audit job of this row, once the call's count is known.
    fn into_audit(self, count: i64) -> Audit {
        Audit {
            row: (self.row)(count),
            at: self.at,
            conflicts: 0,
            reply: self.reply,
        }
    }
}

/// One audit row to write.
struct Audit {
    row: UsageRow,
    at: DateTime<Utc>,
    conflicts: u32,
    reply: oneshot::Sender<Result<(), ApiError>>,
}

/// Jobs gathered into one transaction at most.
const MAX_GROUP: usize = 256;
/// Times a job is run again after a transient conflict (each time in a later group).
const MAX_RETRIES: u32 = 8;

/// The write lanes of this process.
#[derive(Clone)]
pub struct Writes {
    lanes: Arc<Vec<mpsc::Sender<Job>>>,
    counters: Arc<Counters>,
    /// Whether groups take row locks that other processes also take (PostgreSQL), so that
    /// the order of a group's units (by key id) matters.
    row_locks: bool,
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

    /// Groups failed as a whole by a store failure (disk full, I/O error, connection lost,
    /// timeout); every job of such a group was answered `503`, none committed.
    pub fn store_faults(&self) -> u64 {
        self.counters.faults.load(Ordering::Relaxed)
    }

    /// True when a group failed by a store failure within [`FAILING_FOR`]: writes are failing.
    pub fn failing(&self) -> bool {
        let last = self.counters.last_fault_ms.load(Ordering::Relaxed);
        last != 0 && epoch_ms() - last < FAILING_FOR.as_millis() as i64
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

/// What a lane counts, shared by the lanes of a process.
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    conflicts: AtomicU64,
    isolated: AtomicU64,
    /// Groups failed by a store failure.
    faults: AtomicU64,
    /// When a group last failed by a store failure (ms since the epoch; 0: never).
    last_fault_ms: AtomicI64,
}

/// How long after a group failed by a store failure writes count as failing.
pub const FAILING_FOR: std::time::Duration = std::time::Duration::from_secs(3);

fn epoch_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Counters {
    fn conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("write_conflicts_total").increment(1);
    }
}

async fn run_lane(db: DatabaseConnection, mut rx: mpsc::Receiver<Job>, counters: Arc<Counters>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(u) => group.push(u),
                Err(_) => break,
            }
        }
        metrics::histogram!("write_group_size").record(group.len() as f64);
        let (mut deferred, mut failure) = run_group(&db, group, &counters).await;
        // Jobs that met a deadlock or a serialization failure, and the units of their group
        // not yet run, run again in a group of their own, after this group's commit has
        // released every lock it held.
        while failure.is_none() && !deferred.is_empty() {
            (deferred, failure) = run_group(&db, deferred, &counters).await;
        }
        if let Some(e) = failure {
            // The store failed: every job already waiting would wait for the same failure, one
            // group after another. They are answered at once; later jobs try the store again.
            let mut waiting = Group::of(deferred);
            while let Ok(job) = rx.try_recv() {
                waiting.push(job);
            }
            waiting.fail(&e);
        }
    }
}

/// A group's jobs by kind, each kind in arrival order.
#[derive(Default)]
struct Group {
    hits: Vec<Hit>,
    units: Vec<Unit>,
    audits: Vec<Audit>,
}

impl Group {
    fn of(jobs: Vec<Job>) -> Self {
        let mut g = Group::default();
        for job in jobs {
            g.push(job);
        }
        g
    }

    fn push(&mut self, job: Job) {
        match job {
            Job::Hit(h) => self.hits.push(h),
            Job::Unit(u) => self.units.push(u),
            Job::Audit(a) => self.audits.push(a),
        }
    }

    fn fail(self, e: &ApiError) {
        for h in self.hits {
            let _ = h.reply.send(Err(e.clone()));
        }
        for u in self.units {
            (u.fail)(e.clone());
        }
        for a in self.audits {
            let _ = a.reply.send(Err(e.clone()));
        }
    }
}

/// Runs one group; returns the jobs to run again after a transient conflict, and the store
/// failure that failed the whole group, if one did (then every job of it was answered with it).
async fn run_group(
    db: &DatabaseConnection,
    jobs: Vec<Job>,
    counters: &Counters,
) -> (Vec<Job>, Option<ApiError>) {
    let mut group = Group::of(jobs);
    // A hit marked `alone` failed the group's count statement before: its group goes the
    // isolated way at once.
    let outcome = if group.hits.iter().any(|h| h.alone) {
        Fast::Isolate
    } else {
        run_fast(db, &mut group, counters).await
    };
    let outcome = match outcome {
        Fast::Done(done) => {
            done.deliver(group);
            Ok(Vec::new())
        }
        Fast::Failed(e) => {
            group.fail(&e);
            Err(e)
        }
        Fast::Isolate => {
            counters.isolated.fetch_add(1, Ordering::Relaxed);
            run_isolated(db, group, counters).await
        }
    };
    match outcome {
        Ok(again) => (again, None),
        Err(e) => {
            if e.fault.is_some() {
                counters.faults.fetch_add(1, Ordering::Relaxed);
                counters.last_fault_ms.store(epoch_ms(), Ordering::Relaxed);
            }
            tracing::error!(error = %e, "group commit failed: every call of the group was answered with the error");
            (Vec::new(), Some(e))
        }
    }
}

/// Begins a group's transaction. A pooled connection the database dropped (a restart) fails
/// at once, before anything ran: the group tries once more, on a connection checked first.
async fn begin(db: &DatabaseConnection) -> Result<DatabaseTransaction, ApiError> {
    match crate::db::begin_write(db).await {
        Ok(txn) => Ok(txn),
        Err(e) => {
            let e = ApiError::from(e);
            match e.fault {
                Some(f) if f.kind == crate::fault::FaultKind::Unavailable => {
                    crate::db::begin_write(db).await.map_err(ApiError::from)
                }
                _ => Err(e),
            }
        }
    }
}

/// Rolls a failed group back; the connection decides on release whether it can be reused.
async fn roll_back(txn: DatabaseTransaction) {
    if let Err(e) = txn.rollback().await {
        tracing::warn!(error = %e, "rolling a failed group back failed; its connection is closed");
    }
}

/// How a fast attempt ended.
enum Fast {
    /// It reached its commit, which succeeded: the group is answered from it.
    Done(FastDone),
    /// The store failed, or the commit did: every job of the group is answered with this
    /// error, and nothing of it runs again.
    Failed(ApiError),
    /// Rolled back before anyone was answered (a job failed after changing rows, or a
    /// statement of the group failed): run it again on the isolated path.
    Isolate,
}

/// Where a unit of the fast path comes from.
#[derive(Clone, Copy)]
enum Source {
    /// `Group::units[i]`.
    Direct(usize),
    /// The unit a counted call carries, `Group::hits[i].then_unit`.
    Counted(usize),
}

/// A unit's result on the fast path.
enum Ran {
    /// Done: its answer once the commit is known.
    Done(Completion),
    /// Failed having changed nothing: answered with its error.
    Refused(ApiError),
}

/// A fast attempt that committed; the group is answered from it.
struct FastDone {
    outcome: Result<(), ApiError>,
    /// The count of each hit, in the order of `Group::hits`.
    counts: Vec<i64>,
    /// What each unit did, by where it came from.
    ran: Vec<(Source, Ran)>,
}

impl FastDone {
    /// Answers every job of `group` with the group's outcome.
    fn deliver(self, group: Group) {
        let FastDone {
            outcome,
            counts,
            ran,
        } = self;
        let mut direct: Vec<Option<Unit>> = group.units.into_iter().map(Some).collect();
        let mut counted: Vec<Option<Unit>> = Vec::with_capacity(group.hits.len());
        for (hit, count) in group.hits.into_iter().zip(counts) {
            let Hit {
                then_audit,
                then_unit,
                reply,
                ..
            } = hit;
            let _ = reply.send(outcome.clone().map(|()| count));
            if let Some(then) = then_audit {
                let _ = then.reply.send(outcome.clone());
            }
            counted.push(then_unit.map(|(_, u)| u));
        }
        for (source, ran) in ran {
            let unit = match source {
                Source::Direct(i) => direct[i].take(),
                Source::Counted(i) => counted[i].take(),
            };
            let Some(unit) = unit else { continue };
            match ran {
                Ran::Done(completion) => completion(outcome.clone()),
                Ran::Refused(e) => (unit.fail)(e),
            }
        }
        for a in group.audits {
            let _ = a.reply.send(outcome.clone());
        }
    }
}

/// Runs a group without savepoints. A store failure fails the whole group: no savepoint or
/// retry runs on a transaction the store may already have rolled back.
async fn run_fast(db: &DatabaseConnection, group: &mut Group, counters: &Counters) -> Fast {
    let txn = match begin(db).await {
        Ok(txn) => txn,
        Err(e) => return Fast::Failed(e),
    };
    // A failed statement: the store's failure fails the group, any other sends it to the
    // isolated path.
    let abandon = |txn: DatabaseTransaction, e: ApiError| async move {
        roll_back(txn).await;
        if e.fault.is_some() {
            Fast::Failed(e)
        } else {
            Fast::Isolate
        }
    };

    // 1. The rate-limit hits, first: every group locks quota rows before any other row.
    let counts = if group.hits.is_empty() {
        Vec::new()
    } else {
        let windows: Vec<Window> = group.hits.iter().map(Hit::window).collect();
        match count_hits(&txn, &windows).await {
            Ok(counts) => counts,
            Err(e) => return abandon(txn, e).await,
        }
    };

    // 2. The units, by key id (stable: the units of one key keep their arrival order); a
    //    counted call's unit joins them when its count is within its limit.
    let mut order: Vec<(i64, Source)> = group
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.order, Source::Direct(i)))
        .collect();
    for (i, (hit, &count)) in group.hits.iter().zip(&counts).enumerate() {
        if let Some((limit, unit)) = &hit.then_unit
            && count <= *limit
        {
            order.push((unit.order, Source::Counted(i)));
        }
    }
    order.sort_by_key(|(o, _)| *o);
    let memo = GroupMemo::default();
    let mut appended = Appended::default();
    let mut ran = Vec::with_capacity(order.len());
    for (_, source) in order {
        let unit = match source {
            Source::Direct(i) => &mut group.units[i],
            Source::Counted(i) => match group.hits[i].then_unit.as_mut() {
                Some((_, u)) => u,
                None => continue,
            },
        };
        let t = Txn::new(&txn, &memo);
        let result = (unit.work)(&t).await;
        match result {
            Ok(completion) => {
                let mut rows = t.take_appended();
                // Later units of the group that read this wallet settle these first.
                memo.defer_wallets(std::mem::take(&mut rows.wallets));
                appended.extend(rows);
                ran.push((source, Ran::Done(completion)));
            }
            Err(e) if t.changed_nothing() && !e.transient && e.fault.is_none() => {
                ran.push((source, Ran::Refused(e)));
            }
            Err(e) => {
                if e.transient {
                    counters.conflict();
                }
                drop(t);
                return abandon(txn, e).await;
            }
        }
    }

    // 3. The appended rows and the audit rows, one statement per table.
    for (hit, &count) in group.hits.iter().zip(&counts) {
        if let Some(then) = &hit.then_audit {
            appended.usage.push(((then.row)(count), then.at));
        }
    }
    for a in &group.audits {
        appended.usage.push((a.row.clone(), a.at));
    }
    appended.wallets = memo.take_wallets();
    if let Err(e) = appended.write(&txn).await {
        return abandon(txn, e.into()).await;
    }

    // Answered only once COMMIT returned Ok on the connection that ran every statement above.
    let committed = txn.commit().await;
    counters.commits.fetch_add(1, Ordering::Relaxed);
    match committed {
        Ok(()) => {
            appended.count_committed();
            Fast::Done(FastDone {
                outcome: Ok(()),
                counts,
                ran,
            })
        }
        // Not known to be committed: nobody is answered success (a store failure is 503, safe to
        // retry with the same request id).
        Err(e) => Fast::Failed(e.into()),
    }
}

/// Runs one group one savepoint per job; returns the jobs to run again after a transient
/// conflict, or the error that failed the whole group (every job of it answered with it: a store
/// failure, a savepoint that could not be released or rolled back, or the commit).
async fn run_isolated(
    db: &DatabaseConnection,
    group: Group,
    counters: &Counters,
) -> Result<Vec<Job>, ApiError> {
    let Group {
        hits,
        mut units,
        mut audits,
    } = group;
    let txn = match begin(db).await {
        Ok(t) => t,
        Err(e) => {
            Group {
                hits,
                units,
                audits,
            }
            .fail(&e);
            return Err(e);
        }
    };
    // What succeeded so far, answered once the commit is known; and the jobs to run again.
    let mut done: Vec<Completion> = Vec::with_capacity(hits.len() + units.len() + audits.len());
    let mut again: Vec<Job> = Vec::new();
    // Fails the whole group: nothing of it is committed, and nothing of it runs again.
    macro_rules! fail_group {
        ($e:expr, $($rest:expr),* $(,)?) => {{
            let e: ApiError = $e;
            roll_back(txn).await;
            for d in done {
                d(Err(e.clone()));
            }
            #[allow(unused_mut)]
            let mut rest = Group::of(again);
            $( for job in $rest { rest.push(job); } )*
            rest.fail(&e);
            return Err(e);
        }};
    }

    // 1. The rate-limit hits, first: every group locks quota rows before any other row. The
    //    statement is the first of the transaction, so it needs no savepoint: when it fails,
    //    nothing else is lost by rolling the whole transaction back.
    let (hits, alone): (Vec<Hit>, Vec<Hit>) = hits.into_iter().partition(|h| !h.alone);
    if !hits.is_empty() {
        let windows: Vec<Window> = hits.iter().map(Hit::window).collect();
        match count_hits(&txn, &windows).await {
            Ok(counts) => {
                for (mut hit, count) in hits.into_iter().zip(counts) {
                    hit.follow_up(count, &mut units, &mut audits);
                    done.push(Box::new(move |outcome| {
                        let _ = hit.reply.send(outcome.map(|()| count));
                    }));
                }
            }
            Err(e) if e.fault.is_some() => fail_group!(
                e,
                hits.into_iter().map(Job::Hit),
                alone.into_iter().map(Job::Hit),
                units.into_iter().map(Job::Unit),
                audits.into_iter().map(Job::Audit),
            ),
            Err(e) => {
                roll_back(txn).await;
                if e.transient {
                    counters.conflict();
                }
                let mut retry = Vec::new();
                for mut h in hits {
                    if e.transient {
                        h.conflicts += 1;
                        if h.conflicts > MAX_RETRIES {
                            let _ = h.reply.send(Err(e.clone()));
                            continue;
                        }
                    } else {
                        // One of them cannot be counted: each is counted on its own next, so
                        // that only that one fails.
                        h.alone = true;
                    }
                    retry.push(Job::Hit(h));
                }
                // The rest of the group runs at once, in a transaction of its own.
                retry.extend(alone.into_iter().map(Job::Hit));
                retry.extend(units.into_iter().map(Job::Unit));
                retry.extend(audits.into_iter().map(Job::Audit));
                return Ok(retry);
            }
        }
    }
    let mut alone = alone.into_iter();
    while let Some(mut hit) = alone.next() {
        let window = [(hit.key, hit.scope, hit.window_start, 1)];
        let counted = in_savepoint(&txn, |sp| {
            Box::pin(async move { super::rate_limits::add_many(sp, &window).await })
        })
        .await;
        match counted {
            Ok(after) => {
                let count = after[0];
                hit.follow_up(count, &mut units, &mut audits);
                done.push(Box::new(move |outcome| {
                    let _ = hit.reply.send(outcome.map(|()| count));
                }))
            }
            Err(Savepoint::Failed(e)) => {
                let _ = hit.reply.send(Err(e));
            }
            Err(Savepoint::Broken(e)) => fail_group!(
                e,
                std::iter::once(Job::Hit(hit)),
                alone.map(Job::Hit),
                units.into_iter().map(Job::Unit),
                audits.into_iter().map(Job::Audit),
            ),
        }
    }

    // 2. The units of work, each in its savepoint, by key id (counted calls' work has joined
    //    them; stable: the units of one key keep their arrival order).
    units.sort_by_key(|u| u.order);
    let memo = GroupMemo::default();
    let mut committed = Appended::default();
    let mut units = units.into_iter();
    while let Some(mut unit) = units.next() {
        let sp = match txn.begin().await {
            Ok(sp) => sp,
            Err(e) => fail_group!(
                e.into(),
                std::iter::once(Job::Unit(unit)),
                units.map(Job::Unit),
                audits.into_iter().map(Job::Audit),
            ),
        };
        let t = Txn::new(&sp, &memo);
        let result = (unit.work)(&t).await;
        // The unit's appended rows are written in its savepoint, so that they fail with it.
        let appended = t.take_appended();
        let result = match result {
            Ok(completion) => match appended.write(&sp).await {
                Ok(()) => Ok(completion),
                Err(e) => Err(ApiError::from(e)),
            },
            Err(e) => Err(e),
        };
        drop(t);
        match result {
            Err(e) if e.fault.is_some() => {
                // The store may have rolled the whole transaction back: no ROLLBACK TO.
                drop(sp);
                fail_group!(
                    e,
                    std::iter::once(Job::Unit(unit)),
                    units.map(Job::Unit),
                    audits.into_iter().map(Job::Audit),
                )
            }
            Ok(completion) => match sp.commit().await {
                Ok(()) => {
                    committed.extend(appended);
                    done.push(completion);
                }
                Err(e) => fail_group!(
                    e.into(),
                    std::iter::once(Job::Unit(unit)),
                    units.map(Job::Unit),
                    audits.into_iter().map(Job::Audit),
                ),
            },
            Err(e) => {
                if let Err(rollback) = sp.rollback().await {
                    fail_group!(
                        rollback.into(),
                        std::iter::once(Job::Unit(unit)),
                        units.map(Job::Unit),
                        audits.into_iter().map(Job::Audit),
                    )
                }
                if e.transient && unit.conflicts < MAX_RETRIES {
                    unit.conflicts += 1;
                    counters.conflict();
                    again.push(Job::Unit(unit));
                    // The group still holds the locks its earlier units took, so the units
                    // after this one would meet the same conflict (and wait for its detection)
                    // one by one. They run after this group's commit instead.
                    again.extend(units.by_ref().map(Job::Unit));
                    break;
                }
                // Nothing of this unit is written: it may be answered now.
                (unit.fail)(e);
            }
        }
    }

    // 3. The audit rows: inserts that wait for no lock of another group.
    if !audits.is_empty()
        && let Err(e) = write_audits(&txn, audits, &mut done, &mut again, counters).await
    {
        fail_group!(e,)
    }

    // Answered only once COMMIT returned Ok; otherwise nothing of the group runs again.
    let outcome = txn.commit().await;
    counters.commits.fetch_add(1, Ordering::Relaxed);
    match outcome {
        Ok(()) => {
            committed.count_committed();
            for d in done {
                d(Ok(()));
            }
            Ok(again)
        }
        Err(e) => {
            let e = ApiError::from(e);
            for d in done {
                d(Err(e.clone()));
            }
            Group::of(again).fail(&e);
            Err(e)
        }
    }
}

/// How a statement run in a savepoint of its own failed.
enum Savepoint {
    /// The statement failed and was rolled back alone: the transaction goes on.
    Failed(ApiError),
    /// The store failed, or the savepoint could not be released or rolled back: the
    /// transaction cannot be trusted any more.
    Broken(ApiError),
}

/// Runs `f` in a savepoint of `txn`: released when it succeeds, rolled back alone when it
/// fails, unless the store failed (then nothing more is sent on the transaction).
async fn in_savepoint<T>(
    txn: &DatabaseTransaction,
    f: impl for<'s> FnOnce(
        &'s DatabaseTransaction,
    ) -> Pin<Box<dyn Future<Output = Result<T, sea_orm::DbErr>> + Send + 's>>,
) -> Result<T, Savepoint> {
    let sp = txn.begin().await.map_err(|e| Savepoint::Broken(e.into()))?;
    match f(&sp).await {
        Ok(v) => match sp.commit().await {
            Ok(()) => Ok(v),
            Err(e) => Err(Savepoint::Broken(e.into())),
        },
        Err(e) => {
            let e = ApiError::from(e);
            if e.fault.is_some() {
                drop(sp);
                return Err(Savepoint::Broken(e));
            }
            match sp.rollback().await {
                Ok(()) => Err(Savepoint::Failed(e)),
                Err(rollback) => Err(Savepoint::Broken(rollback.into())),
            }
        }
    }
}

/// Runs the hits of a group as one upsert; the count each hit sees, in the order of `hits`.
async fn count_hits(txn: &DatabaseTransaction, hits: &[Window]) -> Result<Vec<i64>, ApiError> {
    // Hits per window, the windows by key id (the lock order of every group).
    let mut per_window: BTreeMap<Window, i64> = BTreeMap::new();
    for &w in hits {
        *per_window.entry(w).or_default() += 1;
    }
    let windows: Vec<(i64, &str, i64, i64)> = per_window
        .iter()
        .map(|(&(key, scope, start), &n)| (key, scope, start, n))
        .collect();
    let after = super::rate_limits::add_many(txn, &windows).await?;
    // The i-th hit of a window, in arrival order, sees the count before the statement plus i.
    let mut next: HashMap<Window, i64> = per_window
        .keys()
        .zip(&after)
        .map(|(w, count)| (*w, count - per_window[w]))
        .collect();
    Ok(hits
        .iter()
        .map(|w| {
            let c = next.get_mut(w).expect("every hit's window was counted");
            *c += 1;
            *c
        })
        .collect())
}

/// Writes a group's audit rows in one statement; when that fails, one by one in savepoints,
/// so that only a row that cannot be written fails. `Err`: the transaction cannot be trusted
/// any more (a store failure, a savepoint that could not be released or rolled back); the rows
/// not yet answered are then failed by the caller with the group.
async fn write_audits(
    txn: &DatabaseTransaction,
    audits: Vec<Audit>,
    done: &mut Vec<Completion>,
    again: &mut Vec<Job>,
    counters: &Counters,
) -> Result<(), ApiError> {
    let rows: Vec<(UsageRow, DateTime<Utc>)> =
        audits.iter().map(|a| (a.row.clone(), a.at)).collect();
    let all = in_savepoint(txn, move |sp| {
        Box::pin(async move {
            let rows: Vec<(&UsageRow, DateTime<Utc>)> =
                rows.iter().map(|(r, at)| (r, *at)).collect();
            super::usage::insert_many(sp, &rows).await
        })
    })
    .await;
    let failure = match all {
        Ok(()) => {
            for a in audits {
                done.push(Box::new(move |outcome| {
                    let _ = a.reply.send(outcome);
                }));
            }
            return Ok(());
        }
        Err(Savepoint::Broken(e)) => {
            again.extend(audits.into_iter().map(Job::Audit));
            return Err(e);
        }
        Err(Savepoint::Failed(e)) => e,
    };
    if failure.transient {
        counters.conflict();
        for mut a in audits {
            a.conflicts += 1;
            if a.conflicts > MAX_RETRIES {
                let _ = a.reply.send(Err(failure.clone()));
            } else {
                again.push(Job::Audit(a));
            }
        }
        return Ok(());
    }
    let mut audits = audits.into_iter();
    while let Some(a) = audits.next() {
        let (row, at) = (a.row.clone(), a.at);
        let one = in_savepoint(txn, move |sp| {
            Box::pin(async move { super::usage::insert(sp, &row, at).await })
        })
        .await;
        match one {
            Ok(()) => done.push(Box::new(move |outcome| {
                let _ = a.reply.send(outcome);
            })),
            Err(Savepoint::Failed(e)) => {
                let _ = a.reply.send(Err(e));
            }
            Err(Savepoint::Broken(e)) => {
                again.push(Job::Audit(a));
                again.extend(audits.map(Job::Audit));
                return Err(e);
            }
        }
    }
    Ok(())
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

    /// Rows of table `t`.
    async fn rows(db: &DatabaseConnection) -> i64 {
        rows_of(db, "t").await
    }

    async fn rows_of(db: &DatabaseConnection, table: &str) -> i64 {
        db.query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
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

    /// When a unit of [`insert_then`] says no: before it writes, after it writes, or never.
    #[derive(Clone, Copy)]
    enum Refuse {
        Before,
        After,
        Never,
    }

    /// A unit that inserts row `i` of table `t`, refusing as `refuse` says (a refusal before
    /// writing reads the table first).
    async fn insert_then(writes: &Writes, i: i64, refuse: Refuse) -> Result<i64, ApiError> {
        writes
            .run(Some(1), move |txn| {
                Box::pin(async move {
                    let no = || ApiError::new(crate::error::ErrorCode::Conflict, "no");
                    if let Refuse::Before = refuse {
                        txn.query_one_raw(Statement::from_string(
                            txn.get_database_backend(),
                            "SELECT COUNT(*) AS n FROM t",
                        ))
                        .await?;
                        return Err(no());
                    }
                    txn.execute_raw(Statement::from_sql_and_values(
                        txn.get_database_backend(),
                        "INSERT INTO t (id, v) VALUES ($1, 1)",
                        [i.into()],
                    ))
                    .await?;
                    if let Refuse::After = refuse {
                        return Err(no());
                    }
                    Ok(i)
                })
            })
            .await
    }

    /// A unit that reads and refuses (a create without the credits, a report of an unknown
    /// item) changed nothing: its group stays on the fast path, without a savepoint, and the
    /// refusal is answered with the others once the group is committed.
    #[tokio::test(flavor = "current_thread")]
    async fn a_unit_refused_before_writing_keeps_its_group_on_the_fast_path() {
        let (_dir, db) = sqlite().await;
        let writes = Writes::start(db.clone(), 1);
        let tasks = spawn_each(&writes, 100, |writes, i| async move {
            let refuse = if i % 5 == 0 {
                Refuse::Before
            } else {
                Refuse::Never
            };
            insert_then(&writes, i as i64, refuse).await
        });
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert_eq!(r.is_err(), i % 5 == 0, "unit {i}: {r:?}");
        }
        assert_eq!(rows(&db).await, 80);
        assert_eq!(writes.isolated_groups(), 0, "no group needed savepoints");
        assert!(writes.commits() < 50, "{} commits", writes.commits());
    }

    /// A unit that fails after changing rows (without a statement error: its own rule says
    /// no) takes its group to the isolated path: what it wrote is rolled back, every other unit
    /// of the group is committed, each answered once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_unit_that_fails_after_writing_is_rolled_back_alone() {
        let (_dir, db) = sqlite().await;
        let writes = Writes::start(db.clone(), 1);
        let tasks = spawn_each(&writes, 100, |writes, i| async move {
            let refuse = if i % 7 == 0 {
                Refuse::After
            } else {
                Refuse::Never
            };
            insert_then(&writes, i as i64, refuse).await
        });
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert_eq!(r.is_err(), i % 7 == 0, "unit {i}: {r:?}");
        }
        assert_eq!(
            rows(&db).await,
            100 - 15,
            "the 15 failing units wrote nothing"
        );
        let kept: i64 = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM t WHERE id % 7 = 0",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
        assert_eq!(kept, 0);
        assert!(writes.isolated_groups() > 0);
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

    /// A SQLite writer (one connection, `synchronous=FULL`) whose store is "full" at the page
    /// limit the returned handle sets, and table `big` whose rows each need about half a page.
    async fn limited_writer() -> (
        tempfile::TempDir,
        String,
        DatabaseConnection,
        crate::db::PageLimit,
    ) {
        let (dir, db) = sqlite().await;
        db.execute_unprepared("CREATE TABLE big (id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
            .await
            .unwrap();
        let url = format!("sqlite://{}/p.db?mode=rwc", dir.path().display());
        let limit = crate::db::PageLimit::default();
        let writer = crate::db::PoolSpec::new(&url, 1)
            .synchronous(crate::settings::SqliteSynchronous::Full)
            .page_limit(&limit)
            .open()
            .await
            .unwrap();
        (dir, url, writer, limit)
    }

    async fn insert_big(writes: &Writes, id: i64) -> Result<i64, ApiError> {
        writes
            .run(Some(1), move |txn| {
                Box::pin(async move {
                    txn.execute_raw(Statement::from_sql_and_values(
                        txn.get_database_backend(),
                        "INSERT INTO big (id, b) VALUES ($1, randomblob(2000))",
                        [id.into()],
                    ))
                    .await?;
                    Ok(id)
                })
            })
            .await
    }

    /// The ids in table `big`, read through a connection of its own (never the writer's).
    async fn committed_ids(url: &str) -> Vec<i64> {
        let fresh = crate::db::connect_url(url, 1, None).await.unwrap();
        let rows = fresh
            .query_all_raw(Statement::from_string(
                fresh.get_database_backend(),
                "SELECT id FROM big ORDER BY id",
            ))
            .await
            .unwrap();
        let ids = rows
            .iter()
            .map(|r| r.try_get::<i64>("", "id").unwrap())
            .collect();
        fresh.close().await.unwrap();
        ids
    }

    /// A full store (SQLite `FULL`, which may roll the whole transaction back by itself) fails
    /// the groups it hits as a whole: every unit answered success is committed (seen through a
    /// fresh connection), every unit answered with the failure is not, none is answered 500;
    /// once there is room again, writes succeed on the same pipeline without a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_store_answers_only_what_committed_and_recovers() {
        let (_dir, url, writer, limit) = limited_writer().await;
        let writes = Writes::start(writer.clone(), 1);
        let pages: u64 = writer
            .query_one_raw(Statement::from_string(
                writer.get_database_backend(),
                "PRAGMA page_count",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap() as u64;
        limit.set(&writer, pages + 20).await.unwrap();
        let mut acknowledged = Vec::new();
        let mut refused = 0;
        for wave in 0..6i64 {
            let calls = (0..40).map(|i| {
                let writes = writes.clone();
                async move { insert_big(&writes, wave * 1000 + i).await }
            });
            for r in futures::future::join_all(calls).await {
                match r {
                    Ok(id) => acknowledged.push(id),
                    Err(e) => {
                        assert_eq!(e.status.as_u16(), 503, "{e}");
                        assert_eq!(e.code, crate::error::ErrorCode::StoreUnavailable);
                        refused += 1;
                    }
                }
            }
        }
        assert!(refused > 0, "the store never filled up");
        assert!(!acknowledged.is_empty());
        assert!(writes.failing(), "the last groups failed");
        // The writer's connection is outside any transaction, as SQLite and sqlx both see it:
        // one that failed inside a group was closed, never handed out again.
        let mut conn = writer.get_sqlite_connection_pool().acquire().await.unwrap();
        {
            use sea_orm::sqlx::Connection;
            assert!(!conn.is_in_transaction(), "sqlx counts a transaction open");
        }
        let mut handle = conn.lock_handle().await.unwrap();
        // SAFETY: the handle is locked out of the connection's worker; the call only reads.
        let autocommit =
            unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) };
        assert_ne!(autocommit, 0, "SQLite has a transaction open");
        drop(handle);
        drop(conn);
        acknowledged.sort();
        assert_eq!(
            committed_ids(&url).await,
            acknowledged,
            "exactly the acknowledged rows are committed"
        );

        // Room again: the same pipeline commits, no restart.
        limit.set(&writer, 0).await.unwrap();
        for i in 0..20 {
            acknowledged.push(insert_big(&writes, 100_000 + i).await.unwrap());
        }
        acknowledged.sort();
        assert_eq!(committed_ids(&url).await, acknowledged);
    }

    /// A migrated SQLite database with one key (id 1) and a one-lane pipeline on it.
    async fn migrated() -> (tempfile::TempDir, DatabaseConnection, Writes) {
        let (dir, db) = sqlite().await;
        crate::db::migrate(&db).await.unwrap();
        db.execute_unprepared(
            "INSERT INTO api_key (id, name, key_sha256, created_at, updated_at) \
             VALUES (1, 'k', 'h', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
        )
        .await
        .unwrap();
        let writes = Writes::start(db.clone(), 1);
        (dir, db, writes)
    }

    /// `n` tasks running `f(i)`, spawned in index order. On one thread, tasks first run in
    /// the order they were spawned, so their writes reach a lane in index order.
    fn spawn_each<T, F, Fut>(writes: &Writes, n: usize, f: F) -> Vec<tokio::task::JoinHandle<T>>
    where
        T: Send + 'static,
        F: Fn(Writes, usize) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        (0..n).map(|i| tokio::spawn(f(writes.clone(), i))).collect()
    }

    /// A counted unit runs in the group that counts its call, and only within the limit: of
    /// 50 calls against a limit of 20 exactly the first 20 run (one of which fails alone,
    /// having used its place), the other 30 write nothing; far fewer commits than calls.
    #[tokio::test(flavor = "current_thread")]
    async fn counted_units_run_only_within_the_limit() {
        let (_dir, db, writes) = migrated().await;
        let tasks = spawn_each(&writes, 50, |writes, i| async move {
            let v: i64 = if i == 5 { -1 } else { 1 };
            writes
                .run_counted(1, "batch", 60, 20, move |txn| {
                    Box::pin(async move {
                        txn.execute_raw(Statement::from_sql_and_values(
                            txn.get_database_backend(),
                            "INSERT INTO t (id, v) VALUES ($1, $2)",
                            [(i as i64).into(), v.into()],
                        ))
                        .await?;
                        Ok(i)
                    })
                })
                .await
        });
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok((count, ran)) => {
                    assert_eq!(count, i as i64 + 1, "call {i} counted in arrival order");
                    assert_eq!(ran, (i < 20).then_some(i), "call {i}");
                }
                Err(_) => assert_eq!(i, 5, "only the broken unit fails"),
            }
        }
        assert_eq!(rows(&db).await, 19, "the 19 admitted units that hold");
        assert!(writes.commits() < 50, "{} commits", writes.commits());
    }

    /// Ledger rows a unit appends are written by its group in the group's transaction, and
    /// only for units that hold: a unit that fails after appending leaves no row, on the fast
    /// path (every unit holds) as on the isolated one.
    #[tokio::test(flavor = "current_thread")]
    async fn appended_rows_are_written_with_their_group_and_dropped_with_a_failing_unit() {
        use crate::domain::money::LedgerKind;
        use crate::store::ledger::NewEntry;
        let (_dir, db, writes) = migrated().await;
        let tasks = spawn_each(&writes, 60, |writes, i| async move {
            writes
                .run(Some(1), move |txn| {
                    Box::pin(async move {
                        txn.append_ledger(
                            NewEntry::new(1, LedgerKind::Grant, i as i64 + 1).row(Utc::now()),
                        );
                        if i % 6 == 5 {
                            return Err(ApiError::new(crate::error::ErrorCode::Conflict, "no"));
                        }
                        Ok(i)
                    })
                })
                .await
        });
        let mut held = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert_eq!(r.is_err(), i % 6 == 5, "unit {i}: {r:?}");
            if r.is_ok() {
                held += i as i64 + 1;
            }
        }
        let sum: i64 = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n, SUM(amount) AS s FROM credit_ledger",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "s")
            .unwrap();
        assert_eq!(rows_of(&db, "credit_ledger").await, 50);
        assert_eq!(sum, held, "exactly the rows of the units that held");
        assert!(writes.commits() < 60, "{} commits", writes.commits());
    }

    /// Charges of one key in a group move its wallet together (on SQLite, one update for the
    /// group) and each leaves its ledger row; a charge the wallet cannot take (more than is
    /// held) fails alone, and the wallet ends exact.
    #[tokio::test(flavor = "current_thread")]
    async fn charges_of_a_group_move_the_wallet_exactly_once_each() {
        use crate::domain::money::LedgerKind;
        use crate::store::ledger::{NewEntry, apply_in};
        let (_dir, db, writes) = migrated().await;
        db.execute_unprepared(
            "INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) \
             VALUES (1, 1000, 100, '2026-01-01T00:00:00Z')",
        )
        .await
        .unwrap();
        // Eleven charges of 10 against 100 held: ten fit, whichever order, one cannot.
        let tasks = spawn_each(&writes, 11, |writes, _| async move {
            writes
                .run(Some(1), move |txn| {
                    Box::pin(async move {
                        if apply_in(txn, NewEntry::new(1, LedgerKind::Charge, 10)).await? {
                            Ok(())
                        } else {
                            Err(ApiError::new(
                                crate::error::ErrorCode::Conflict,
                                "held too small",
                            ))
                        }
                    })
                })
                .await
        });
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap().is_ok());
        }
        assert_eq!(ok, 10);
        let w = crate::store::wallets::read(&db, 1).await.unwrap();
        assert_eq!((w.balance, w.held), (900, 0));
        assert_eq!(rows_of(&db, "credit_ledger").await, 10);
    }

    /// The hits below reach the lane in index order.
    #[tokio::test(flavor = "current_thread")]
    async fn hits_are_counted_once_each_in_arrival_order_per_key() {
        let (_dir, _db, writes) = migrated().await;
        // Three windows of one key, interleaved; most hits are queued before the lane runs,
        // so groups hold hits of several windows.
        let tasks = spawn_each(&writes, 300, |writes, i| async move {
            let (scope, start) = [("batch", 60), ("read", 60), ("batch", 120)][i % 3];
            (i % 3, writes.hit(1, scope, start).await.unwrap())
        });
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        for w in 0..3 {
            let seen: Vec<i64> = results
                .iter()
                .filter(|(k, _)| *k == w)
                .map(|(_, c)| *c)
                .collect();
            assert_eq!(seen, (1..=100).collect::<Vec<_>>(), "window {w}");
        }
        assert!(writes.commits() < 100, "{} commits", writes.commits());
    }

    fn audit_row(status: u16) -> UsageRow {
        UsageRow {
            api_key_id: Some(1),
            method: "GET".into(),
            path: "/api/enterprise/video-batch".into(),
            status,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_audit_row_that_cannot_be_written_fails_alone() {
        let (_dir, db, writes) = migrated().await;
        // A key id that does not exist breaks the foreign key: that row alone fails.
        let calls = (0..50).map(|i| {
            let writes = writes.clone();
            async move {
                let mut row = audit_row(200);
                if i == 25 {
                    row.api_key_id = Some(999);
                }
                writes.audit(row, chrono::Utc::now()).await
            }
        });
        let results = futures::future::join_all(calls).await;
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.is_ok(), i != 25, "row {i}: {r:?}");
        }
        assert_eq!(rows_of(&db, "usage_event").await, 49);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_hit_that_cannot_be_counted_fails_alone() {
        let (_dir, db, writes) = migrated().await;
        // Key 999 does not exist: its window breaks the foreign key, which fails the group's
        // one statement; every other hit and the unit of the group still commit.
        let tasks = spawn_each(&writes, 30, |writes, i| async move {
            let key = if i == 10 { 999 } else { 1 };
            writes.hit(key, "read", 60).await
        });
        let unit = tokio::spawn({
            let writes = writes.clone();
            async move { insert(&writes, 5, 5).await }
        });
        let mut counts = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert_eq!(r.is_ok(), i != 10, "hit {i}: {r:?}");
            counts.extend(r.ok());
        }
        assert_eq!(unit.await.unwrap().unwrap(), 5);
        counts.sort();
        assert_eq!(counts, (1..=29).collect::<Vec<_>>());
        assert_eq!(rows(&db).await, 1);
    }
}
