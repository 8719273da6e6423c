//! A group run one savepoint per job, so that a failing job fails alone.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};

use super::jobs::*;
use super::quota_step::count_hits;
use super::transaction::{begin, roll_back};
use crate::domain::usage::UsageRow;
use crate::error::ApiError;
use crate::store::unit::{Appended, GroupMemo, Txn};

/// Runs one group one savepoint per job; returns the jobs to run again after a transient
/// conflict, or the error that failed the whole group (every job of it answered with it: a store
/// failure, a savepoint that could not be released or rolled back, or the commit).
pub(super) async fn run_isolated(
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
            Box::pin(async move { crate::store::rate_limits::add_many(sp, &window).await })
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
            Ok(completion) => match crate::store::appended::write(&sp, &appended).await {
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
pub(super) enum Savepoint {
    /// The statement failed and was rolled back alone: the transaction goes on.
    Failed(ApiError),
    /// The store failed, or the savepoint could not be released or rolled back: the
    /// transaction cannot be trusted any more.
    Broken(ApiError),
}

/// Runs `f` in a savepoint of `txn`: released when it succeeds, rolled back alone when it
/// fails, unless the store failed (then nothing more is sent on the transaction).
pub(super) async fn in_savepoint<T>(
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

/// Writes a group's audit rows in one statement; when that fails, one by one in savepoints,
/// so that only a row that cannot be written fails. `Err`: the transaction cannot be trusted
/// any more (a store failure, a savepoint that could not be released or rolled back); the rows
/// not yet answered are then failed by the caller with the group.
pub(super) async fn write_audits(
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
            crate::store::usage::insert_many(sp, &rows).await
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
            Box::pin(async move { crate::store::usage::insert(sp, &row, at).await })
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
