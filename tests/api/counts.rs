//! The item counts kept on batch rows stay equal to a recount of the items through a random
//! mix of every transition (create, claim, requeue, heartbeat, lease expiry, complete, fail,
//! cancel, window expiry, reaper), on two nodes where the store allows it.
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(batch_counts_equal_a_recount_of_items_after_random_transitions);

/// A small deterministic generator (xorshift64*), seeded per run and printed, so that a
/// failing mix can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One transition the test asks for.
#[derive(Clone, Debug)]
enum Op {
    Create { items: usize, short_window: bool },
    Claim { max: u32, lease_seconds: u32 },
    Complete(Value),
    Fail { item: Value, retryable: bool },
    Heartbeat(Value),
    Cancel(String),
    Reap,
}

/// Runs one transition on `app`; returns the items a claim leased.
async fn run(app: &TestApp, key: &str, op: Op, n: usize) -> Vec<Value> {
    match op {
        Op::Create {
            items,
            short_window,
        } => {
            let mut body = TestApp::batch_body(Some(&format!("mix-{n}")), items);
            if short_window {
                body["completion_window"] = json!("2s");
            }
            let r = app.create_batch(key, &body).await;
            assert_eq!(r.status(), 201, "create");
        }
        Op::Claim { max, lease_seconds } => {
            let r = app
                .worker_post(
                    "/claim",
                    &json!({ "worker_id": format!("w{n}"), "max_items": max,
                             "lease_seconds": lease_seconds }),
                )
                .await;
            assert_eq!(r.status(), 200, "claim");
            let v: Value = r.json().await.unwrap();
            return v["items"].as_array().cloned().unwrap_or_default();
        }
        Op::Complete(item) => {
            let s = app.complete(&item).await.status().as_u16();
            assert!(matches!(s, 200 | 409), "complete: {s}");
        }
        Op::Fail { item, retryable } => {
            let s = app.fail(&item, retryable).await.status().as_u16();
            assert!(matches!(s, 200 | 409), "fail: {s}");
        }
        Op::Heartbeat(item) => {
            let s = app
                .worker_post(
                    &format!("/items/{}/heartbeat", item["item_id"].as_str().unwrap()),
                    &json!({ "lease_token": item["lease_token"], "lease_seconds": 60 }),
                )
                .await
                .status()
                .as_u16();
            assert!(matches!(s, 200 | 409), "heartbeat: {s}");
        }
        Op::Cancel(id) => {
            let s = app.cancel_batch(key, &id).await.status().as_u16();
            assert_eq!(s, 200, "cancel");
        }
        Op::Reap => reap(app).await,
    }
    Vec::new()
}

/// One pass of the lease reaper and of the completion windows, as the background task runs it.
async fn reap(app: &TestApp) {
    let state = app.state();
    let runtime = state.runtime();
    api::service::leases::reap_expired(&state.db, &state.writes, &runtime)
        .await
        .expect("reap");
    api::service::windows::expire_due(&state.db, &state.writes, &runtime)
        .await
        .expect("windows");
}

/// The status of a claimed item, as its batch's item pages show it.
async fn item_status(app: &TestApp, key: &str, item: &Value) -> String {
    let page: Value = app
        .client
        .get(format!(
            "{}/api/enterprise/video-batch/{}/items?limit=100",
            app.base,
            item["batch_id"].as_str().unwrap()
        ))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = page["data"].as_array().unwrap();
    let found = data.iter().find(|i| i["item_id"] == item["item_id"]);
    found.unwrap()["status"].as_str().unwrap().to_string()
}

/// Every batch's stored counts beside a recount of its items, read in one statement (one
/// snapshot) through a connection of its own.
async fn stored_and_recounted(app: &TestApp) -> Vec<(String, [i64; 7], [i64; 7])> {
    let db = app.fresh_db().await;
    let recount = |status: &str| {
        format!(
            "CAST((SELECT COUNT(*) FROM batch_item i WHERE i.batch_id = j.id \
             AND i.status = '{status}') AS BIGINT) AS n_{status}"
        )
    };
    let statuses = [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "expired",
    ];
    let sql = format!(
        "SELECT j.request_id, \
         CAST(j.queued_count AS BIGINT) AS queued, CAST(j.running_count AS BIGINT) AS running, \
         CAST(j.succeeded_count AS BIGINT) AS succeeded, CAST(j.failed_count AS BIGINT) AS failed, \
         CAST(j.cancelled_count AS BIGINT) AS cancelled, CAST(j.expired_count AS BIGINT) AS expired, \
         CAST(j.total_count AS BIGINT) AS total, \
         CAST((SELECT COUNT(*) FROM batch_item i WHERE i.batch_id = j.id) AS BIGINT) AS n_total, {} \
         FROM batch_job j ORDER BY j.request_id",
        statuses.map(recount).join(", ")
    );
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap();
    db.close().await.unwrap();
    rows.iter()
        .map(|r| {
            let get = |c: &str| r.try_get::<i64>("", c).unwrap();
            let mut stored = [0; 7];
            let mut counted = [0; 7];
            for (i, s) in statuses.iter().chain(&["total"]).enumerate() {
                stored[i] = get(s);
                counted[i] = get(&format!("n_{s}"));
            }
            (r.try_get("", "request_id").unwrap(), stored, counted)
        })
        .collect()
}

/// A random mix of every item transition, run a few at a time on both nodes (PostgreSQL: two
/// nodes on one database; SQLite: one), then a closing round that makes sure each kind of
/// transition happened at least once (a lease that ends and is requeued by the reaper, a
/// window that ends). Afterwards every batch's stored counts equal a recount of its items, and
/// the API shows the stored counts.
async fn batch_counts_equal_a_recount_of_items_after_random_transitions(backend: Backend) {
    let postgres = backend.is_postgres();
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 1000000\nrate_limit_per_min = 100000\n\
             max_batch_items = 100\ncompletion_window = \"1h\"",
        )
        .settings(|s| s.worker.max_attempts = 2)
        .build()
        .await;
    let peer = if postgres {
        Some(app.peer().await)
    } else {
        None
    };
    let nodes: Vec<&TestApp> = std::iter::once(&app).chain(peer.as_ref()).collect();
    let key = app.key("acme").to_string();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("counts mix seed: {seed}");
    let mut rng = Rng(seed);
    let mut held: Vec<Value> = Vec::new();
    let mut batches: Vec<String> = Vec::new();
    let mut n = 0;

    for _round in 0..40 {
        let mut ops = Vec::new();
        for _ in 0..4 {
            let op = match rng.below(10) {
                0 | 1 => Op::Create {
                    items: 1 + rng.below(12),
                    short_window: rng.below(4) == 0,
                },
                2 | 3 => Op::Claim {
                    max: 1 + rng.below(6) as u32,
                    lease_seconds: if rng.below(2) == 0 { 1 } else { 60 },
                },
                4 if !held.is_empty() => Op::Complete(held.swap_remove(rng.below(held.len()))),
                5 if !held.is_empty() => Op::Fail {
                    item: held.swap_remove(rng.below(held.len())),
                    retryable: rng.below(2) == 0,
                },
                6 if !held.is_empty() => Op::Heartbeat(held[rng.below(held.len())].clone()),
                7 if !batches.is_empty() && rng.below(3) == 0 => {
                    Op::Cancel(batches[rng.below(batches.len())].clone())
                }
                _ => Op::Reap,
            };
            n += 1;
            let node = nodes[rng.below(nodes.len())];
            ops.push(run(node, &key, op, n));
        }
        for claimed in futures::future::join_all(ops).await {
            for item in claimed {
                let id = item["batch_id"].as_str().unwrap().to_string();
                if !batches.contains(&id) {
                    batches.push(id);
                }
                held.push(item);
            }
        }
    }

    // Closing round: each kind of transition at least once, whatever the mix did.
    let last = nodes[nodes.len() - 1];
    let short = Op::Create {
        items: 30,
        short_window: true,
    };
    run(&app, &key, short, 1000).await;
    let mut claimed = Vec::new();
    while claimed.len() < 5 {
        let lease = Op::Claim {
            max: 5 - claimed.len() as u32,
            lease_seconds: 1,
        };
        let got = run(last, &key, lease, 1001).await;
        assert!(!got.is_empty(), "items are queued");
        claimed.extend(got);
    }
    run(&app, &key, Op::Complete(claimed[0].clone()), 0).await;
    let fail = |i: usize, retryable| Op::Fail {
        item: claimed[i].clone(),
        retryable,
    };
    run(last, &key, fail(1, false), 0).await;
    // A first attempt fails retryably and is claimed again (requeued items go first), so an
    // item is retried whatever the mix did.
    let retry_i = (2..claimed.len())
        .find(|&i| claimed[i]["attempt"].as_i64() == Some(1))
        .unwrap_or(2);
    let retried_id = claimed[retry_i]["item_id"].clone();
    run(&app, &key, fail(retry_i, true), 0).await;
    let mut claimed_again = false;
    for _ in 0..5 {
        let again = Op::Claim {
            max: 1,
            lease_seconds: 1,
        };
        let got = run(last, &key, again, 0).await;
        claimed_again |= got.iter().any(|i| i["item_id"] == retried_id);
        claimed.extend(got);
        if claimed_again {
            break;
        }
    }
    assert!(
        claimed_again,
        "the requeued item {retried_id} is claimed again"
    );
    let queued = Op::Create {
        items: 4,
        short_window: false,
    };
    run(last, &key, queued, 1002).await;
    let newest: Value = app
        .list_batches(&key, "limit=1")
        .await
        .json()
        .await
        .unwrap();
    let newest = newest["data"][0]["batch_id"].as_str().unwrap().to_string();
    run(&app, &key, Op::Cancel(newest), 0).await;
    // The last two leases end and the reaper settles them; the short window ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        reap(last).await;
        let expired = app
            .scalar("SELECT COUNT(*) AS v FROM batch_item WHERE status = 'expired'")
            .await;
        let mut leases_ended = true;
        for item in &claimed[3..] {
            leases_ended &= item_status(&app, &key, item).await != "running";
        }
        if expired > 0 && leases_ended {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leases or the window never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let rows = stored_and_recounted(&app).await;
    for (rid, stored, counted) in &rows {
        assert_eq!(
            stored, counted,
            "batch {rid}: stored [queued, running, succeeded, failed, cancelled, expired, total] \
             {stored:?}, items {counted:?} (seed {seed})"
        );
    }
    let sum = |i: usize| rows.iter().map(|(_, _, c)| c[i]).sum::<i64>();
    for (i, what) in ["succeeded", "failed", "cancelled", "expired"]
        .iter()
        .enumerate()
    {
        assert!(
            sum(i + 2) > 0,
            "no item {what}: the mix missed a transition"
        );
    }
    let retried = app
        .scalar("SELECT COUNT(*) AS v FROM batch_item WHERE attempts > 1")
        .await;
    assert!(retried > 0, "no item was claimed again after a requeue");

    // The API answers the stored counts (final batches: nothing moves them any more). A batch
    // still open above may have become final since (its short window ended in the background),
    // so the stored counts are read again after the listing: a batch final when listed has not
    // moved since.
    let listed: Value = app
        .list_batches(&key, "limit=100")
        .await
        .json()
        .await
        .unwrap();
    let rows = stored_and_recounted(&app).await;
    let mut checked = 0;
    for b in listed["data"].as_array().unwrap() {
        if matches!(b["status"].as_str(), Some("queued" | "processing")) {
            continue;
        }
        let (_, stored, _) = rows
            .iter()
            .find(|(rid, _, _)| b["request_id"] == rid.as_str())
            .unwrap();
        let c = &b["counts"];
        let shown = [
            "queued",
            "running",
            "succeeded",
            "failed",
            "cancelled",
            "expired",
            "total",
        ]
        .map(|k| c[k].as_i64().unwrap());
        assert_eq!(&shown, stored, "listed counts of {}", b["request_id"]);
        let one: Value = app
            .get_batch(&key, b["batch_id"].as_str().unwrap())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(one["counts"], *c, "polled counts of {}", b["request_id"]);
        checked += 1;
    }
    assert!(checked > 0, "no batch ended");
    app.assert_ledger_invariant().await;
}
