//! A group's first step: all its rate-limit hits as one multi-row upsert.
use std::collections::{BTreeMap, HashMap};

use sea_orm::DatabaseTransaction;

use super::jobs::*;
use crate::error::ApiError;

/// Runs the hits of a group as one upsert; the count each hit sees, in the order of `hits`.
pub(super) async fn count_hits(
    txn: &DatabaseTransaction,
    hits: &[Window],
) -> Result<Vec<i64>, ApiError> {
    // Hits per window, the windows by key id (the lock order of every group).
    let mut per_window: BTreeMap<Window, i64> = BTreeMap::new();
    for &w in hits {
        *per_window.entry(w).or_default() += 1;
    }
    let windows: Vec<(i64, &str, i64, i64)> = per_window
        .iter()
        .map(|(&(key, scope, start), &n)| (key, scope, start, n))
        .collect();
    let after = crate::store::rate_limits::add_many(txn, &windows).await?;
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
