//! Per-key policies: key rotation with overlap, low-credit alerts, completion windows and the
//! fair share of the fleet (`max_running_items`), each on two nodes where nodes matter.
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp, key_plaintext, sha256};
use crate::webhooks::{Receiver, SECRET, verify};

both_backends!(
    old_and_new_keys_work_during_the_overlap_and_the_old_one_stops_after_it,
    one_credits_low_event_per_crossing_under_concurrent_creates_on_two_nodes,
    a_batch_whose_window_ends_expires_its_queued_items_and_lets_running_ones_finish,
    a_capped_key_never_runs_more_than_its_cap_and_claims_fill_from_other_keys,
    a_negative_adjust_crosses_the_threshold_and_a_release_re_arms_it,
    an_overlap_added_by_reload_shares_limits_wallet_and_batches,
);

/// The key a rotated test key replaced.
const OLD_KEY: &str = "vb_test_rot_old_secret_value";

/// A key's TOML `lines` plus the receiver as its signed webhook target.
fn hooked(lines: &str, receiver: &Receiver) -> String {
    format!(
        "{lines}\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
        receiver.url()
    )
}

async fn status_with(app: &TestApp, key: &str) -> u16 {
    app.client
        .get(format!("{}/api/enterprise/credits", app.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Key rotation: during the overlap both keys authenticate as the same key on every node and
/// the usage rows say which was used; once the overlap ends the old key is refused on every
/// node without a reload, and the new one keeps working.
async fn old_and_new_keys_work_during_the_overlap_and_the_old_one_stops_after_it(backend: Backend) {
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let app = TestApp::builder(backend)
        .key(
            "rot",
            &format!(
                "initial_credits = 100\nprevious_key_sha256 = \"{}\"\nprevious_key_expires_at = \"{}\"",
                sha256(OLD_KEY),
                until.to_rfc3339()
            ),
        )
        .build()
        .await;
    let peer = app.peer().await;
    let new_key = key_plaintext("rot");
    for node in [&app, &peer] {
        assert_eq!(status_with(node, &new_key).await, 200, "new key");
        assert_eq!(
            status_with(node, OLD_KEY).await,
            200,
            "old key in the overlap"
        );
    }
    assert_eq!(
        app.wallet(OLD_KEY).await.balance,
        100,
        "the old key is the same key"
    );
    let previous = app
        .scalar("SELECT COUNT(*) AS v FROM usage_event WHERE key_version = 'previous'")
        .await;
    let current = app
        .scalar("SELECT COUNT(*) AS v FROM usage_event WHERE key_version = 'current'")
        .await;
    assert_eq!(previous, 3, "usage rows of the old key");
    assert_eq!(current, 2, "usage rows of the new key");

    for node in [&app, &peer] {
        node.freeze_clock_at(until + chrono::Duration::seconds(1));
    }
    for node in [&app, &peer] {
        assert_eq!(
            status_with(node, OLD_KEY).await,
            401,
            "old key after the overlap"
        );
        assert_eq!(
            status_with(node, &new_key).await,
            200,
            "new key after the overlap"
        );
    }
}

/// `credits.low`: 40 concurrent creates on two nodes take the wallet across the threshold
/// once, so exactly one event is sent, signed as every webhook is; a grant takes it back
/// above (re-armed) and the next crossing sends exactly one more.
async fn one_credits_low_event_per_crossing_under_concurrent_creates_on_two_nodes(
    backend: Backend,
) {
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "low",
            &hooked(
                "initial_credits = 1000\nrate_limit_per_min = 1000\nlow_credit_threshold = 500",
                &receiver,
            ),
        )
        .build()
        .await;
    let peer = app.peer().await;
    let key = app.key("low").to_string();
    let burst = |round: &'static str| {
        let key = key.clone();
        let nodes = [&app, &peer];
        join_all((0..40).map(move |i| {
            let node = nodes[i % 2];
            let key = key.clone();
            async move {
                node.create_batch(&key, &TestApp::batch_body(Some(&format!("{round}-{i}")), 2))
                    .await
                    .status()
                    .as_u16()
            }
        }))
    };
    // 40 × 2 items × 10 credits: 1000 → 200 available.
    assert!(burst("a").await.iter().all(|s| *s == 201));
    // Each create commits its event with it: once they are answered the outbox holds all
    // there will be.
    let events = || async {
        crate::helpers::wait_outbox_final(&app.db(), 1)
            .await
            .into_iter()
            .map(|r| (r.event_type, r.status, r.attempt_count))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        events().await,
        [("credits.low".to_string(), "succeeded".to_string(), 1)],
        "one event for one crossing"
    );
    let got = receiver.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(receiver.got().len(), 1, "one event for one crossing");
    assert!(verify(SECRET, &got[0]), "signed with the key's secret");
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "credits.low");
    assert_eq!(body["data"]["key"], "low");
    assert_eq!(body["data"]["threshold"], 500);
    assert!(body["data"]["available"].as_i64().unwrap() < 500);

    // Back above the threshold (re-armed), then across it again.
    let r = app
        .admin_post("/keys/low/credits/grant", &json!({ "amount": 800 }), None)
        .await;
    assert_eq!(r.status(), 200);
    assert!(burst("b").await.iter().all(|s| *s == 201));
    assert_eq!(
        events().await,
        [
            ("credits.low".to_string(), "succeeded".to_string(), 1),
            ("credits.low".to_string(), "succeeded".to_string(), 1)
        ],
        "one more event for the second crossing"
    );
    receiver.wait_for(2, Duration::from_secs(15)).await;
    let all = receiver.got();
    assert_eq!(all.len(), 2, "one more event for the second crossing");
    assert_ne!(all[0].id, all[1].id, "two distinct events");
    app.assert_ledger_invariant().await;
}

/// A completion window ends: the queued items become `expired` and their holds are released
/// at once, the running item may still finish and is charged, and the batch ends `expired`
/// with a `batch.expired` event that verifies with the Standard Webhooks algorithm.
async fn a_batch_whose_window_ends_expires_its_queued_items_and_lets_running_ones_finish(
    backend: Backend,
) {
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "win",
            &hooked(
                "initial_credits = 1000\ncompletion_window = \"1h\"",
                &receiver,
            ),
        )
        .build()
        .await;
    let key = app.key("win").to_string();
    let mut body = TestApp::batch_body(Some("win-1"), 3);
    body["completion_window"] = json!("2s");
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let batch_id = created["batch_id"].as_str().unwrap().to_string();
    let created_at =
        chrono::DateTime::parse_from_rfc3339(created["created_at"].as_str().unwrap()).unwrap();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(created["expires_at"].as_str().unwrap()).unwrap();
    let window = (expires_at - created_at).num_milliseconds();
    assert!(
        (1999..=2000).contains(&window),
        "the window asked for: {window} ms"
    );

    let running = app.claim("w1", 1).await;
    assert_eq!(running.len(), 1);
    // The reaper enforces the window within a second of its end.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let batch = loop {
        let b: Value = app.get_batch(&key, &batch_id).await.json().await.unwrap();
        if b["counts"]["expired"] == 2 {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "window not enforced: {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(batch["status"], "processing", "a running item is still out");
    assert_eq!(batch["expires_at"], created["expires_at"]);
    let credits = app.wallet(&key).await;
    assert_eq!(
        credits.held, 10,
        "the expired items' holds are released at once"
    );

    assert_eq!(app.complete(&running[0]).await.status(), 200);
    let b: Value = app.get_batch(&key, &batch_id).await.json().await.unwrap();
    assert_eq!(b["status"], "expired");
    assert_eq!(b["counts"]["succeeded"], 1);
    let credits = app.wallet(&key).await;
    assert_eq!(credits.balance, 990, "the running item is charged");
    assert_eq!(credits.held, 0);
    let items: Value = app
        .client
        .get(format!(
            "{}/api/enterprise/video-batch/{batch_id}/items?status=expired",
            app.base
        ))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(items["data"].as_array().unwrap().len(), 2);
    let listed: Value = app
        .list_batches(&key, "status=expired")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["batch_id"], batch_id.as_str());

    let got = receiver.wait_for(1, Duration::from_secs(15)).await;
    assert!(verify(SECRET, &got[0]));
    let event: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(event["type"], "batch.expired");
    assert_eq!(event["data"]["batch_id"], batch_id.as_str());
    assert_eq!(event["data"]["counts"]["expired"], 2);
    app.assert_ledger_invariant().await;

    // A request may shorten the key's window, never lengthen it.
    for (window, why) in [("2h", "longer than the key's"), ("soon", "not a duration")] {
        let mut body = TestApp::batch_body(None, 1);
        body["completion_window"] = json!(window);
        let r = app.create_batch(&key, &body).await;
        assert_eq!(r.status(), 422, "{why}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"], "VALIDATION_ERROR");
        assert!(e["message"].as_str().unwrap().contains("completion_window"));
    }
}

async fn running_of(app: &TestApp, key: &str) -> i64 {
    app.scalar(&format!(
        "SELECT COUNT(*) AS v FROM batch_item WHERE status = 'running' \
         AND api_key_id = (SELECT account_id FROM api_key WHERE name = '{key}')"
    ))
    .await
}

/// `max_running_items = 3`: 8 workers on two nodes claim and report concurrently until all
/// work is done; the capped key never has more than 3 items running, the first concurrent
/// round hands out every item of the uncapped key (no worker waits while other work is
/// queued), and every item is claimed exactly once.
async fn a_capped_key_never_runs_more_than_its_cap_and_claims_fill_from_other_keys(
    backend: Backend,
) {
    let app = TestApp::builder(backend)
        .key(
            "big",
            "initial_credits = 1000\nrate_limit_per_min = 1000\nmax_running_items = 3",
        )
        .key("small", "initial_credits = 1000\nrate_limit_per_min = 1000")
        .build()
        .await;
    let peer = app.peer().await;
    for (key, rid) in [("big", "big-1"), ("small", "small-1")] {
        let r = app
            .create_batch(app.key(key), &TestApp::batch_body(Some(rid), 20))
            .await;
        assert_eq!(r.status(), 201);
    }
    let nodes = [&app, &peer];

    // One concurrent round: 8 claims of 4.
    let first: Vec<Vec<Value>> = join_all(
        (0..8).map(|w| async move { nodes[w % 2].claim_retrying(&format!("w{w}"), 4).await }),
    )
    .await;
    assert!(running_of(&app, "big").await <= 3);
    assert_eq!(
        running_of(&app, "big").await,
        3,
        "the claims took the capped key up to its cap"
    );
    let small_queued = app
        .scalar(
            "SELECT COUNT(*) AS v FROM batch_item WHERE status = 'queued' \
             AND api_key_id = (SELECT account_id FROM api_key WHERE name = 'small')",
        )
        .await;
    assert_eq!(
        small_queued, 0,
        "the claims filled up with the other key's items"
    );

    // Then every worker reports and claims until all 40 items are done.
    let done = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let workers = first.into_iter().enumerate().map(|(w, mut items)| {
        let node = nodes[w % 2];
        let (done, seen, max_seen) = (done.clone(), seen.clone(), max_seen.clone());
        async move {
            loop {
                for item in items.drain(..) {
                    assert!(
                        seen.lock()
                            .unwrap()
                            .insert(item["item_id"].as_str().unwrap().to_string()),
                        "an item was claimed twice"
                    );
                    assert_eq!(node.complete_retrying(&item).await, 200);
                    done.fetch_add(1, Ordering::SeqCst);
                }
                if done.load(Ordering::SeqCst) >= 40 {
                    return;
                }
                items = node.claim_retrying(&format!("w{w}"), 4).await;
                let big = running_of(node, "big").await as usize;
                max_seen.fetch_max(big, Ordering::SeqCst);
                assert!(big <= 3, "{big} items of the capped key running");
                if items.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(120), join_all(workers))
        .await
        .expect("all work done");
    assert_eq!(seen.lock().unwrap().len(), 40, "every item claimed once");
    assert!(max_seen.load(Ordering::SeqCst) <= 3);
    app.assert_ledger_invariant().await;
    let charged = app
        .scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'charge'")
        .await;
    assert_eq!(charged, 40, "every item charged once");
}

/// `credits.low` from the other movements: a create's hold crosses, a cancel's release
/// re-arms, a negative adjust crosses again, and movements below the threshold send nothing.
async fn a_negative_adjust_crosses_the_threshold_and_a_release_re_arms_it(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "low",
            &hooked(
                "initial_credits = 1000\nlow_credit_threshold = 500",
                &receiver,
            ),
        )
        .build()
        .await;
    let key = app.key("low").to_string();
    let low_events = || async {
        crate::helpers::outbox_rows(&app.db())
            .await
            .into_iter()
            .filter(|r| r.event_type == "credits.low")
            .count()
    };
    // A hold: 1000 -> 400 available, crossing.
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("big"), 60))
        .await;
    assert_eq!(r.status(), 201);
    let batch = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(low_events().await, 1, "the hold crossed");
    // Below already: another movement down sends nothing.
    let r = app
        .admin_post("/keys/low/credits/adjust", &json!({ "amount": -10 }), None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(low_events().await, 1, "no crossing while below");
    // The release of the cancel: 390 -> 990 available, re-armed, no event.
    assert_eq!(app.cancel_batch(&key, &batch).await.status(), 200);
    assert_eq!(app.wallet(&key).await.available, 990);
    assert_eq!(low_events().await, 1, "crossing up sends nothing");
    // A negative adjust crosses again: 990 -> 390.
    let r = app
        .admin_post("/keys/low/credits/adjust", &json!({ "amount": -600 }), None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        low_events().await,
        2,
        "the adjust crossed after the release re-armed"
    );
    let rows = crate::helpers::wait_outbox_final(&app.db(), 3).await;
    assert!(rows.iter().all(|r| r.status == "succeeded"), "{rows:?}");
    let got = receiver.wait_for(3, Duration::from_secs(15)).await;
    let available: Vec<i64> = got
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap())
        .filter(|b| b["type"] == "credits.low")
        .map(|b| b["data"]["available"].as_i64().unwrap())
        .collect();
    assert_eq!(available, [400, 390], "each event says what was available");
    app.assert_ledger_invariant().await;
}

/// A rotation applied by reload: the new key works at once, the old one keeps working as the
/// same key (one wallet, one batch list, one rate limit) until the overlap ends.
async fn an_overlap_added_by_reload_shares_limits_wallet_and_batches(backend: Backend) {
    let old = key_plaintext("rot");
    let new = "vb_test_rot_new_secret_value";
    let limits = "initial_credits = 100\nrate_limit_per_min = 4";
    let app = TestApp::builder(backend).key("rot", limits).build().await;
    app.freeze_clock();
    let create = |key: &str, rid: &str| {
        let (app, key, rid) = (&app, key.to_string(), rid.to_string());
        async move {
            app.create_batch(&key, &TestApp::batch_body(Some(&rid), 1))
                .await
        }
    };
    let r = create(&old, "by-old").await;
    assert_eq!(r.status(), 201);
    let batch = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(status_with(&app, new).await, 401, "not yet rotated");

    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    app.write_config(
        &[(
            "rot".into(),
            format!(
                "key_sha256 = \"{}\"\nprevious_key_sha256 = \"{}\"\n\
                 previous_key_expires_at = \"{}\"\n{limits}",
                sha256(new),
                sha256(&old),
                until.to_rfc3339()
            ),
        )],
        "",
    );
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 200);
    for key in [new, old.as_str()] {
        let b = app.get_batch(key, &batch).await;
        assert_eq!(b.status(), 200, "one batch list for both keys");
        let listed: Value = app.list_batches(key, "").await.json().await.unwrap();
        assert_eq!(listed["data"][0]["batch_id"], batch.as_str());
    }
    // One rate limit: 1 create by the old key, then 2 by the new and 1 by the old make 4.
    assert_eq!(create(new, "by-new-1").await.status(), 201);
    assert_eq!(create(new, "by-new-2").await.status(), 201);
    assert_eq!(create(&old, "by-old-2").await.status(), 201);
    assert_eq!(
        create(new, "by-new-3").await.status(),
        429,
        "the shared limit"
    );
    assert_eq!(
        create(&old, "by-old-3").await.status(),
        429,
        "the shared limit"
    );
    // One wallet: four batches of one item held, seen through either key.
    for key in [new, old.as_str()] {
        let w = app.wallet(key).await;
        assert_eq!((w.balance, w.held), (100, 40));
    }
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key").await,
        1,
        "still one key"
    );
}

/// A capped key whose account row another claim holds is left out of a claim, never waited for:
/// with the row locked for the whole call, the claim still answers, filled from the other key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_postgres_a_capped_key_held_by_another_claim_is_skipped_never_waited_for() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let app = TestApp::builder(backend)
        .key("capped", "initial_credits = 1000\nmax_running_items = 2")
        .key("free", "initial_credits = 1000")
        .build()
        .await;
    for key in ["capped", "free"] {
        let r = app
            .create_batch(app.key(key), &TestApp::batch_body(Some(key), 3))
            .await;
        assert_eq!(r.status(), 201);
    }
    let db = app.db();
    let holder = db.begin().await.unwrap();
    holder
        .execute_unprepared("SELECT id FROM account WHERE name = 'capped' FOR NO KEY UPDATE")
        .await
        .unwrap();
    // Held until after the claim: a claim that waited for it would never answer.
    let claimed = tokio::time::timeout(Duration::from_secs(20), app.claim("w", 4))
        .await
        .expect("the claim waited for the held key");
    let free_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'free'")
        .await;
    let keys: Vec<Value> = claimed.iter().map(|i| i["batch_id"].clone()).collect();
    assert_eq!(claimed.len(), 3, "filled from the other key: {keys:?}");
    assert_eq!(
        running_of(&app, "capped").await,
        0,
        "the held key was left out"
    );
    assert_eq!(running_of(&app, "free").await, 3, "key {free_id}");
    holder.rollback().await.unwrap();
    // Released: the capped key is served again, up to its cap.
    assert_eq!(app.claim("w", 4).await.len(), 2);
    assert_eq!(running_of(&app, "capped").await, 2);
}
