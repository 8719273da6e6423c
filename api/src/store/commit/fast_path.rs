//! A group run straight in its transaction, without savepoints (see the module doc).
use std::sync::atomic::Ordering;

use sea_orm::{DatabaseConnection, DatabaseTransaction};

use super::jobs::*;
use super::quota_step::count_hits;
use super::transaction::{begin, roll_back};
use crate::error::ApiError;
use crate::store::unit::{Appended, GroupMemo, Txn};

/// How a fast attempt ended.
pub(super) enum Fast {
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
pub(super) enum Source {
    /// `Group::units[i]`.
    Direct(usize),
    /// The unit a counted call carries, `Group::hits[i].then_unit`.
    Counted(usize),
}

/// A unit's result on the fast path.
pub(super) enum Ran {
    /// Done: its answer once the commit is known.
    Done(Completion),
    /// Failed having changed nothing: answered with its error.
    Refused(ApiError),
}

/// A fast attempt that committed; the group is answered from it.
pub(super) struct FastDone {
    /// The count of each hit, in the order of `Group::hits`.
    counts: Vec<i64>,
    /// What each unit did, by where it came from.
    ran: Vec<(Source, Ran)>,
}

impl FastDone {
    /// Answers every job of `group`: its group committed.
    pub(super) fn deliver(self, group: Group) {
        let FastDone { counts, ran } = self;
        let mut direct: Vec<Option<Unit>> = group.units.into_iter().map(Some).collect();
        let mut counted: Vec<Option<Unit>> = Vec::with_capacity(group.hits.len());
        for (hit, count) in group.hits.into_iter().zip(counts) {
            let Hit {
                then_audit,
                then_unit,
                reply,
                ..
            } = hit;
            let _ = reply.send(Ok(count));
            if let Some(then) = then_audit {
                let _ = then.reply.send(Ok(()));
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
                Ran::Done(completion) => completion(Ok(())),
                Ran::Refused(e) => (unit.fail)(e),
            }
        }
        for a in group.audits {
            let _ = a.reply.send(Ok(()));
        }
    }
}

/// Runs a group without savepoints. A store failure fails the whole group: no savepoint or
/// retry runs on a transaction the store may already have rolled back.
pub(super) async fn run_fast(
    db: &DatabaseConnection,
    group: &mut Group,
    counters: &Counters,
) -> Fast {
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
    if let Err(e) = crate::store::appended::write(&txn, &appended).await {
        return abandon(txn, e.into()).await;
    }

    // Answered only once COMMIT returned Ok on the connection that ran every statement above.
    let committed = txn.commit().await;
    counters.commits.fetch_add(1, Ordering::Relaxed);
    match committed {
        Ok(()) => {
            appended.count_committed();
            Fast::Done(FastDone { counts, ran })
        }
        // Not known to be committed: nobody is answered success (a store failure is 503, safe to
        // retry with the same request id).
        Err(e) => Fast::Failed(e.into()),
    }
}
