//! What a lane receives and answers: units of work, rate-limit hits and audit rows, the
//! group they are gathered into, and what the lanes of a process count.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use crate::domain::usage::UsageRow;
use crate::error::ApiError;
use crate::store::unit::Txn;

/// A unit's future, borrowing the transaction it runs in.
pub type UnitFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// Called once the group's commit is known: `Ok` when committed.
pub(super) type Completion = Box<dyn FnOnce(Result<(), ApiError>) + Send>;

/// Work erased of its output type, runnable again after a transient conflict.
pub(super) type Work = Box<dyn for<'a> FnMut(&'a Txn<'a>) -> UnitFuture<'a, Completion> + Send>;

/// What a lane receives.
pub(super) enum Job {
    Unit(Unit),
    Hit(Hit),
    Audit(Audit),
}

pub(super) struct Unit {
    /// Units of a group run ordered by key id (unkeyed work last).
    pub(super) order: i64,
    /// Times this unit met a transient conflict.
    pub(super) conflicts: u32,
    pub(super) work: Work,
    pub(super) fail: Box<dyn FnOnce(ApiError) + Send>,
}

/// One call counted against a rate-limit window; answered with the window's count after it.
pub(super) struct Hit {
    pub(super) key: i64,
    pub(super) scope: &'static str,
    pub(super) window_start: i64,
    pub(super) conflicts: u32,
    /// Counted in a statement of its own (after the group's one statement failed).
    pub(super) alone: bool,
    /// The call's audit row, written in the same group once the count is known.
    pub(super) then_audit: Option<AuditAfter>,
    /// The call's work and its quota: run in the same group when the count is within it.
    pub(super) then_unit: Option<(i64, Unit)>,
    pub(super) reply: oneshot::Sender<Result<i64, ApiError>>,
}

/// A rate-limit window: key id, scope, start.
pub(super) type Window = (i64, &'static str, i64);

impl Hit {
    pub(super) fn window(&self) -> Window {
        (self.key, self.scope, self.window_start)
    }

    /// What the call does once counted: its audit row, and its work if within the limit (a
    /// call over it is answered with the count alone, its work never run).
    pub(super) fn follow_up(&mut self, count: i64, units: &mut Vec<Unit>, audits: &mut Vec<Audit>) {
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
pub(super) struct AuditAfter {
    /// Builds the row from the count (called again if the group runs again).
    pub(super) row: Box<dyn Fn(i64) -> UsageRow + Send>,
    pub(super) at: DateTime<Utc>,
    pub(super) reply: oneshot::Sender<Result<(), ApiError>>,
}

impl AuditAfter {
    /// The audit job of this row, once the call's count is known.
    pub(super) fn into_audit(self, count: i64) -> Audit {
        Audit {
            row: (self.row)(count),
            at: self.at,
            conflicts: 0,
            reply: self.reply,
        }
    }
}

/// One audit row to write.
pub(super) struct Audit {
    pub(super) row: UsageRow,
    pub(super) at: DateTime<Utc>,
    pub(super) conflicts: u32,
    pub(super) reply: oneshot::Sender<Result<(), ApiError>>,
}

/// Jobs gathered into one transaction at most.
pub(super) const MAX_GROUP: usize = 256;
/// Times a job is run again after a transient conflict (each time in a later group).
pub(super) const MAX_RETRIES: u32 = 8;

/// What a lane counts, shared by the lanes of a process.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) commits: AtomicU64,
    pub(super) conflicts: AtomicU64,
    pub(super) isolated: AtomicU64,
    /// When a group last failed by a store failure (ms since the epoch; 0: never).
    pub(super) last_fault_ms: AtomicI64,
    /// Calls of each key handed to a lane whose outcome has not come back yet.
    pub(super) waiting: std::sync::Mutex<std::collections::HashMap<i64, usize>>,
}

/// How long after a group failed by a store failure writes count as failing.
pub const FAILING_FOR: std::time::Duration = std::time::Duration::from_secs(3);

impl Counters {
    pub(super) fn conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("write_conflicts_total").increment(1);
    }
}

/// A group's jobs by kind, each kind in arrival order.
#[derive(Default)]
pub(super) struct Group {
    pub(super) hits: Vec<Hit>,
    pub(super) units: Vec<Unit>,
    pub(super) audits: Vec<Audit>,
}

impl Group {
    pub(super) fn of(jobs: Vec<Job>) -> Self {
        let mut g = Group::default();
        for job in jobs {
            g.push(job);
        }
        g
    }

    pub(super) fn push(&mut self, job: Job) {
        match job {
            Job::Hit(h) => self.hits.push(h),
            Job::Unit(u) => self.units.push(u),
            Job::Audit(a) => self.audits.push(a),
        }
    }

    pub(super) fn fail(self, e: &ApiError) {
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
