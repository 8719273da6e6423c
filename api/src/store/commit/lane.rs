//! A lane: gathers the jobs that arrived while its previous group committed into the next
//! group, runs it (fast path, else isolated path), and fails fast behind a store failure.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;

use super::fast_path::{Fast, run_fast};
use super::isolated_path::run_isolated;
use super::jobs::*;
use crate::error::ApiError;

pub(super) async fn run_lane(
    db: DatabaseConnection,
    mut rx: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
) {
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

/// Runs one group; returns the jobs to run again after a transient conflict, and the store
/// failure that failed the whole group, if one did (then every job of it was answered with it).
pub(super) async fn run_group(
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
                counters
                    .last_fault_ms
                    .store(crate::fault::now_ms(), Ordering::Relaxed);
            }
            tracing::error!(error = %e, "group commit failed: every call of the group was answered with the error");
            (Vec::new(), Some(e))
        }
    }
}
