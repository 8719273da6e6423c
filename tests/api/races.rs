//! Money under races, every call sent at once: grants with one Idempotency-Key grant once, an
//! adjust racing a create's hold never lets the wallet hold more than it has, and a cancel
//! racing a complete, a fail and the reaper settles every item with exactly one charge or one
//! release.
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    grants_with_one_idempotency_key_sent_at_once_grant_once,
    an_adjust_racing_a_creates_hold_never_overdraws,
    cancel_racing_complete_fail_and_the_reaper_settles_each_item_once,
);

/// 16 grants of 50 with the same Idempotency-Key, at once: every answer is 200 with the same
/// wallet, and the balance grows by 50 once, in one ledger row.
async fn grants_with_one_idempotency_key_sent_at_once_grant_once(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    for round in 0..3 {
        let idem = format!("invoice-{round}");
        let answers = join_all((0..16).map(|_| async {
            let r = app
                .admin_post(
                    "/keys/acme/credits/grant",
                    &json!({ "amount": 50, "note": "invoice" }),
                    Some(&idem),
                )
                .await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }))
        .await;
        let want = 100 + 50 * (round + 1);
        for (status, body) in &answers {
            assert_eq!(*status, 200, "{body}");
            assert_eq!(
                body["balance"], want,
                "every answer shows the one grant: {body}"
            );
        }
        assert_eq!(app.wallet(app.key("acme")).await.balance, want);
        assert_eq!(
            app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'grant'")
                .await,
            // The initial credits, then one per round.
            1 + round + 1,
            "one grant row per Idempotency-Key"
        );
    }
    app.assert_ledger_invariant().await;
}

/// Eight wallets of 100, each raced by a create that holds 100 and an adjust of -50 sent at
/// once: exactly one of the two wins, and the wallet shows exactly that one.
async fn an_adjust_racing_a_creates_hold_never_overdraws(backend: Backend) {
    let names: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let mut builder = TestApp::builder(backend);
    for n in &names {
        builder = builder.key(n, "initial_credits = 100\nrate_limit_per_min = 1000");
    }
    let app = builder.build().await;
    let races = names.iter().map(|n| {
        let app = &app;
        async move {
            let create = async {
                app.create_batch(app.key(n), &TestApp::batch_body(Some("all"), 10))
                    .await
                    .status()
                    .as_u16()
            };
            let adjust = async {
                app.admin_post(
                    &format!("/keys/{n}/credits/adjust"),
                    &json!({ "amount": -50 }),
                    None,
                )
                .await
                .status()
                .as_u16()
            };
            let (created, adjusted) = futures::join!(create, adjust);
            (n, created, adjusted)
        }
    });
    for (n, created, adjusted) in join_all(races).await {
        let w = app.wallet(app.key(n)).await;
        match (created, adjusted) {
            (201, 409) => assert_eq!((w.balance, w.held), (100, 100), "{n}: the hold won"),
            (402, 200) => assert_eq!((w.balance, w.held), (50, 0), "{n}: the adjust won"),
            other => panic!("{n}: create and adjust answered {other:?}: one must win"),
        }
    }
    app.assert_ledger_invariant().await;
}

/// Six batches of four items, three of them leased, one queued: for each batch, at once, the batch is
/// cancelled, one item completed, one failed for good, and one's lease ends for the reaper.
/// Whatever the order, every item ends with exactly one charge (succeeded) or one release, and
/// each batch's charges and releases add up to its hold.
async fn cancel_racing_complete_fail_and_the_reaper_settles_each_item_once(backend: Backend) {
    // One key per batch, each capped at three running items: the claims lease three of every
    // batch and leave its fourth queued.
    let names: Vec<String> = (0..6).map(|b| format!("k{b}")).collect();
    let mut builder = TestApp::builder(backend).settings(|s| s.worker.max_attempts = 1);
    for n in &names {
        builder = builder.key(n, "initial_credits = 10000\nmax_running_items = 3");
    }
    let app = builder.build().await;
    let mut ids = Vec::new();
    for n in &names {
        let r = app
            .create_batch(app.key(n), &TestApp::batch_body(Some("race"), 4))
            .await;
        assert_eq!(r.status(), 201);
        ids.push(
            r.json::<Value>().await.unwrap()["batch_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut leased_all = Vec::new();
    while leased_all.len() < 18 {
        let got = app.claim("w", 18).await;
        assert!(!got.is_empty(), "only {} items leased", leased_all.len());
        leased_all.extend(got);
    }
    assert!(
        app.claim("w", 18).await.is_empty(),
        "the caps hold the fourth items"
    );
    let batches: Vec<(String, String, Vec<Value>)> = names
        .iter()
        .zip(&ids)
        .map(|(n, id)| {
            let leased: Vec<Value> = leased_all
                .iter()
                .filter(|i| i["batch_id"] == id.as_str())
                .cloned()
                .collect();
            assert_eq!(leased.len(), 3, "{n}");
            (app.key(n).to_string(), id.clone(), leased)
        })
        .collect();
    let races = batches.iter().map(|(key, id, leased)| {
        let app = &app;
        async move {
            let cancel = async { app.cancel_batch(key, id).await.status().as_u16() };
            let complete = async { app.complete(&leased[0]).await.status().as_u16() };
            let fail = async { app.fail(&leased[1], false).await.status().as_u16() };
            let expire = app.expire_lease(leased[2]["item_id"].as_str().unwrap());
            let (cancelled, completed, failed, ()) = futures::join!(cancel, complete, fail, expire);
            assert_eq!(cancelled, 200);
            // A running item may finish after a cancel; its report is accepted either way.
            assert_eq!((completed, failed), (200, 200));
        }
    });
    join_all(races).await;
    // The reaper settles the ended leases.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app
        .scalar("SELECT COUNT(*) AS v FROM batch_item WHERE status IN ('queued', 'running')")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "items left open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (key, id, leased) in &batches {
        let v: Value = app.get_batch(key, id).await.json().await.unwrap();
        assert_eq!(v["status"], "cancelled", "{v}");
        let status_of = |item: &Value| {
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["item_id"] == item["item_id"])
                .unwrap()["status"]
                .clone()
        };
        assert_eq!(status_of(&leased[0]), "succeeded", "{v}");
        assert_eq!(status_of(&leased[1]), "failed", "{v}");
        let reaped = status_of(&leased[2]);
        assert!(reaped == "failed" || reaped == "cancelled", "{v}");
    }
    let zero = |sql: &'static str, what: &'static str| {
        let app = &app;
        async move { assert_eq!(app.scalar(sql).await, 0, "{what}") }
    };
    zero(
        "SELECT COUNT(*) AS v FROM (SELECT item_id FROM credit_ledger WHERE item_id IS NOT NULL \
         AND kind IN ('charge', 'release') GROUP BY item_id HAVING COUNT(*) > 1) t",
        "an item charged or released twice",
    )
    .await;
    zero(
        "SELECT COUNT(*) AS v FROM batch_item i WHERE i.status IN ('succeeded', 'failed') \
         AND (SELECT COUNT(*) FROM credit_ledger l WHERE l.item_id = i.id \
              AND l.kind IN ('charge', 'release')) <> 1",
        "a reported item without its one charge or release",
    )
    .await;
    zero(
        "SELECT COUNT(*) AS v FROM batch_item i WHERE i.status = 'succeeded' AND NOT EXISTS \
         (SELECT 1 FROM credit_ledger l WHERE l.item_id = i.id AND l.kind = 'charge')",
        "a succeeded item not charged",
    )
    .await;
    zero(
        "SELECT COUNT(*) AS v FROM credit_ledger l JOIN batch_item i ON i.id = l.item_id \
         WHERE l.kind = 'charge' AND i.status <> 'succeeded'",
        "an item charged without succeeding",
    )
    .await;
    zero(
        "SELECT COUNT(*) AS v FROM batch_job b WHERE \
         (SELECT COALESCE(SUM(l.amount), 0) FROM credit_ledger l WHERE l.batch_id = b.id AND l.kind = 'charge') \
           <> b.cost_per_video * b.succeeded_count \
         OR (SELECT COALESCE(SUM(l.amount), 0) FROM credit_ledger l WHERE l.batch_id = b.id AND l.kind = 'release') \
           <> b.cost_per_video * (b.failed_count + b.cancelled_count) \
         OR (SELECT COALESCE(SUM(l.amount), 0) FROM credit_ledger l WHERE l.batch_id = b.id AND l.kind = 'hold') \
           <> b.cost_per_video * b.total_count \
         OR b.succeeded_count + b.failed_count + b.cancelled_count <> b.total_count",
        "a batch whose charges and releases do not add up to its hold",
    )
    .await;
    for (key, _, _) in &batches {
        let w = app.wallet(key).await;
        assert_eq!(w.held, 0);
        assert_eq!(w.balance, 10000 - 10, "one charge: the completed item");
    }
    app.assert_ledger_invariant().await;
}
