//! Fair share of the fleet: claims that keep every key with a `max_running_items` cap at or
//! below it on any number of nodes, and fill the rest of the claim from other keys.
use std::collections::{HashMap, HashSet};

use crate::store::unit::Txn;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ApiError;
use crate::store::items;

/// Leases up to `want` items in fair order while keeping every key with a `max_running_items`
/// cap at or below it, on any number of nodes: the claim first takes the rows of the capped
/// keys that no other claim holds (never waiting: a key another claim holds is left out of
/// this one), counts their running items, and hands out at most the room each has left. The
/// rest of the claim is filled from the other keys, so no worker waits while work is queued.
pub async fn lease_capped(
    txn: &Txn<'_>,
    lease: items::Lease<'_>,
    want: u64,
    caps: &HashMap<i64, u32>,
    now: DateTime<Utc>,
) -> Result<Vec<items::Leased>, ApiError> {
    let mut capped: Vec<i64> = caps.keys().copied().collect();
    capped.sort_unstable();
    let mine = crate::store::keys::lock_for_claim(txn, &capped).await?;
    let running = items::running_counts(txn, &mine).await?;
    let mut room: HashMap<i64, i64> = mine
        .iter()
        .map(|k| {
            (
                *k,
                i64::from(caps[k]) - running.get(k).copied().unwrap_or(0),
            )
        })
        .collect();
    let mut out: Vec<items::Leased> = Vec::new();
    // Items another claim holds (read as queued, not leased): not tried again.
    let mut taken: HashSet<Uuid> = HashSet::new();
    // A few rounds: items another claim took since we read the head are skipped, and keys
    // that filled up are left out of the next read.
    for _ in 0..4 {
        let left = want - out.len() as u64;
        if left == 0 {
            break;
        }
        let exclude: Vec<i64> = capped
            .iter()
            .copied()
            .filter(|k| room.get(k).is_none_or(|r| *r <= 0))
            .collect();
        let window = left * 2 + 16 + taken.len() as u64;
        let head = items::queued_head(txn, &exclude, window).await?;
        let mut pick = Vec::new();
        for (id, key) in &head {
            if pick.len() as u64 == left {
                break;
            }
            if taken.contains(id) {
                continue;
            }
            if let Some(r) = room.get_mut(key) {
                if *r <= 0 {
                    continue;
                }
                *r -= 1;
            }
            pick.push((*id, *key));
        }
        let ids: Vec<Uuid> = pick.iter().map(|(id, _)| *id).collect();
        let got = items::lease_ids(txn, lease, &ids, now).await?;
        for (id, key) in &pick {
            if !got.iter().any(|g| g.id == *id) {
                taken.insert(*id);
                if let Some(r) = room.get_mut(key) {
                    *r += 1;
                }
            }
        }
        let short = got.len() < pick.len();
        out.extend(got);
        if (head.len() as u64) < window && !short {
            break;
        }
    }
    Ok(out)
}
