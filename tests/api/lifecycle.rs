//! Worker leases, charge and release, batch state, cancel, list, and the reference worker.
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::future::join_all;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    concurrent_workers_claim_each_item_once,
    stale_reports_change_nothing,
    a_customer_key_is_refused_by_the_worker_api,
    random_mix_keeps_the_ledger_exact,
    small_batch_is_not_starved_by_a_huge_one,
    cancel_releases_queued_items_and_is_idempotent,
    list_pages_every_batch_once,
    reference_worker_runs_a_batch_end_to_end,
    reference_worker_survives_a_server_restart,
    another_keys_batch_is_not_found,
    expired_last_attempt_fails_the_item_and_releases_it,
);

async fn create(app: &TestApp, key: &str, rid: &str, n: usize) -> String {
    let r = app
        .create_batch(key, &TestApp::batch_body(Some(rid), n))
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["batch_id"].as_str().unwrap().to_string()
}

async fn concurrent_workers_claim_each_item_once(backend: Backend) {
    let app = TestApp::builder(backend.clone())
        .key(
            "acme",
            "initial_credits = 100000\nrate_limit_per_min = 1000\nmax_batch_items = 500",
        )
        .build()
        .await;
    let peer = if backend.is_postgres() {
        Some(app.peer().await)
    } else {
        None
    };
    let key = app.key("acme").to_string();
    let mut batches = Vec::new();
    for i in 0..5 {
        batches.push(create(&app, &key, &format!("w-{i}"), 100).await);
    }
    let workers = (0..8).map(|w| {
        let node = match (&peer, w % 2) {
            (Some(p), 1) => p,
            _ => &app,
        };
        async move {
            let mut mine = Vec::new();
            loop {
                let items = node.claim_retrying(&format!("worker-{w}"), 10).await;
                if items.is_empty() {
                    break;
                }
                for item in items {
                    assert_eq!(node.complete_retrying(&item).await, 200);
                    mine.push(item["item_id"].as_str().unwrap().to_string());
                }
            }
            mine
        }
    });
    let all: Vec<String> = join_all(workers).await.into_iter().flatten().collect();
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 500, "every item claimed");
    assert_eq!(unique.len(), 500, "no item claimed twice");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'charge'")
            .await,
        500
    );
    let c = app.wallet(&key).await;
    assert_eq!(c.held, 0);
    assert_eq!(c.balance, 100000 - 500 * 10);
    for b in batches {
        let v: Value = app.get_batch(&key, &b).await.json().await.unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["counts"]["succeeded"], 100);
        assert!(v["completed_at"].is_string());
    }
    app.assert_ledger_invariant().await;
}

/// A report with a token that is no longer the item's (reported twice, re-leased after its
/// lease expired, or failed for good) is 409 `LEASE_LOST` and moves no credit.
async fn stale_reports_change_nothing(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    create(&app, &key, "s-1", 3).await;

    // Complete twice: the second report is stale.
    let a = app.claim("w1", 1).await.remove(0);
    assert_eq!(app.complete(&a).await.status(), 200);
    let r = app.complete(&a).await;
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "LEASE_LOST");

    // Expired lease re-claimed by another worker: the first worker's late report is stale.
    let r = app
        .worker_post(
            "/claim",
            &json!({ "worker_id": "slow", "max_items": 1, "lease_seconds": 1 }),
        )
        .await;
    let b = r.json::<Value>().await.unwrap()["items"][0].clone();
    app.expire_lease(b["item_id"].as_str().unwrap()).await;
    let b2 = app.claim("fast", 1).await.remove(0);
    assert_eq!(
        b2["item_id"], b["item_id"],
        "expired lease is claimable again"
    );
    assert_eq!(b2["attempt"], 2);
    assert_eq!(
        app.complete(&b).await.status(),
        409,
        "late report with the old token"
    );
    assert_eq!(app.complete(&b2).await.status(), 200);

    // Fail (final) then complete: the complete is stale.
    let c = app.claim("w1", 1).await.remove(0);
    assert_eq!(app.fail(&c, false).await.status(), 200);
    assert_eq!(app.complete(&c).await.status(), 409);
    let r = app
        .worker_post(
            &format!("/items/{}/heartbeat", c["item_id"].as_str().unwrap()),
            &json!({"lease_token": c["lease_token"]}),
        )
        .await;
    assert_eq!(r.status(), 409);

    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'charge'")
            .await,
        2
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'release'")
            .await,
        1
    );
    let cr = app.wallet(&key).await;
    assert_eq!(cr.balance, 980);
    assert_eq!(cr.held, 0);
    app.assert_ledger_invariant().await;
}

/// A customer key is not a worker secret: the worker API refuses it with 401.
async fn a_customer_key_is_refused_by_the_worker_api(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    create(&app, &key, "k-1", 1).await;
    let r = app
        .client
        .post(format!("{}/api/internal/worker/claim", app.base))
        .bearer_auth(&key)
        .json(&json!({"worker_id":"x","max_items":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "UNAUTHORIZED");
}

/// A key's wallet in amounts, read in one statement (one snapshot, so it holds at every
/// instant while other calls run): `balance == initial - cost * succeeded` and
/// `held == cost * (queued + running)`. Returns the number of succeeded items.
async fn assert_wallet_amounts(app: &TestApp, name: &str, initial: i64, cost: i64) -> i64 {
    use sea_orm::ConnectionTrait;
    let db = app.db();
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT CAST(w.balance AS BIGINT) AS balance, CAST(w.held AS BIGINT) AS held, \
                 CAST((SELECT COUNT(*) FROM batch_item i WHERE i.api_key_id = w.api_key_id \
                       AND i.status = 'succeeded') AS BIGINT) AS succeeded, \
                 CAST((SELECT COUNT(*) FROM batch_item i WHERE i.api_key_id = w.api_key_id \
                       AND i.status IN ('queued', 'running')) AS BIGINT) AS open \
                 FROM credit_wallet w JOIN api_key k ON k.id = w.api_key_id WHERE k.name = '{name}'"
            ),
        ))
        .await
        .unwrap()
        .expect("the key's wallet");
    let get = |c: &str| row.try_get::<i64>("", c).unwrap();
    let (balance, held, succeeded, open) =
        (get("balance"), get("held"), get("succeeded"), get("open"));
    assert_eq!(
        balance,
        initial - cost * succeeded,
        "{name}: balance after {succeeded} succeeded items"
    );
    assert_eq!(held, cost * open, "{name}: held for {open} open items");
    succeeded
}

/// Two customers create and cancel while three workers claim, complete, fail for good and fail
/// to retry, all at once; the amounts of both wallets are exact at every step (checked by the
/// workers after each report and by a watcher throughout), and nothing is held at the end.
async fn random_mix_keeps_the_ledger_exact(backend: Backend) {
    const INITIAL: i64 = 100_000;
    const COST: i64 = 10;
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100000\nrate_limit_per_min = 1000",
        )
        .key(
            "beta",
            "initial_credits = 100000\nrate_limit_per_min = 1000",
        )
        .config("")
        .build()
        .await;
    // A small deterministic generator per task.
    let rng = |seed: u64| {
        let mut seed = seed | 1;
        move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    };
    let names = ["acme", "beta"];
    let creating = Arc::new(AtomicUsize::new(names.len()));
    let done = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let app = &app;
    let customers = names.iter().enumerate().map(|(c, name)| {
        let creating = Arc::clone(&creating);
        let mut rnd = rng(0x9e37_79b9_7f4a_7c15 + c as u64);
        async move {
            let key = app.key(name).to_string();
            let mut batches = Vec::new();
            for i in 0..8 {
                batches
                    .push(create(app, &key, &format!("mix-{name}-{i}"), 1 + rnd(6) as usize).await);
                if rnd(3) == 0 {
                    let b = &batches[rnd(batches.len() as u64) as usize];
                    assert_eq!(app.cancel_batch(&key, b).await.status(), 200);
                }
                tokio::task::yield_now().await;
            }
            creating.fetch_sub(1, Ordering::SeqCst);
            (key, batches)
        }
    });
    let workers = (0..3u64).map(|w| {
        let (creating, checks) = (Arc::clone(&creating), Arc::clone(&checks));
        let mut rnd = rng(0x2545_f491_4f6c_dd1d + w);
        async move {
            let mut rounds = 0;
            loop {
                let items = app.claim(&format!("mixer-{w}"), 1 + rnd(5) as u32).await;
                if items.is_empty() {
                    // Whatever a last retry puts back is drained below.
                    if creating.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                rounds += 1;
                assert!(rounds < 500, "queue does not drain");
                for item in items {
                    match rnd(4) {
                        0 => assert_eq!(app.fail(&item, true).await.status(), 200),
                        1 => assert_eq!(app.fail(&item, false).await.status(), 200),
                        _ => assert_eq!(app.complete(&item).await.status(), 200),
                    }
                    for name in names {
                        assert_wallet_amounts(app, name, INITIAL, COST).await;
                    }
                    checks.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    let watcher = {
        let (done, checks) = (Arc::clone(&done), Arc::clone(&checks));
        async move {
            while !done.load(Ordering::SeqCst) {
                for name in names {
                    assert_wallet_amounts(app, name, INITIAL, COST).await;
                }
                checks.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        }
    };
    let mix = async {
        let (batches, _) = futures::join!(join_all(customers), join_all(workers));
        done.store(true, Ordering::SeqCst);
        batches
    };
    let (batches, ()) = futures::join!(mix, watcher);
    assert!(
        checks.load(Ordering::SeqCst) > 20,
        "amounts were checked along the way"
    );
    // A worker may have stopped while another still held an item: drain what is left.
    loop {
        let items = app.claim("last", 100).await;
        if items.is_empty() {
            break;
        }
        for item in items {
            assert_eq!(app.complete(&item).await.status(), 200);
        }
    }
    app.assert_ledger_invariant().await;
    let mut succeeded_total = 0;
    for name in names {
        succeeded_total += assert_wallet_amounts(app, name, INITIAL, COST).await;
        assert_eq!(
            app.wallet(app.key(name)).await.held,
            0,
            "nothing held once every batch is final"
        );
    }
    assert!(succeeded_total > 0, "items succeeded");
    for (k, b) in batches
        .iter()
        .flat_map(|(k, bs)| bs.iter().map(move |b| (k, b)))
    {
        let v: Value = app.get_batch(k, b).await.json().await.unwrap();
        assert!(
            v["status"] == "completed" || v["status"] == "cancelled",
            "{v}"
        );
        let c = &v["counts"];
        assert_eq!(
            c["succeeded"].as_i64().unwrap()
                + c["failed"].as_i64().unwrap()
                + c["cancelled"].as_i64().unwrap(),
            c["total"].as_i64().unwrap()
        );
    }
}

async fn small_batch_is_not_starved_by_a_huge_one(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("big", "initial_credits = 1000000\nmax_batch_items = 1000")
        .key("small", "initial_credits = 100")
        .build()
        .await;
    for i in 0..3 {
        create(&app, app.key("big"), &format!("huge-{i}"), 1000).await;
    }
    let small = create(&app, app.key("small"), "tiny", 2).await;
    let mut seen = 0;
    for _ in 0..2 {
        for item in app.claim("gpu", 2).await {
            if item["batch_id"] == small.as_str() {
                seen += 1;
            }
        }
    }
    assert_eq!(
        seen, 2,
        "the small batch's items come within the first claims"
    );
}

async fn cancel_releases_queued_items_and_is_idempotent(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let b = create(&app, &key, "c-1", 5).await;
    let running = app.claim("w", 2).await;
    assert_eq!(running.len(), 2);
    let v: Value = app.cancel_batch(&key, &b).await.json().await.unwrap();
    assert_eq!(v["counts"]["cancelled"], 3);
    assert_eq!(v["counts"]["running"], 2);
    assert_eq!(v["status"], "processing", "running items may finish");
    let c = app.wallet(&key).await;
    assert_eq!(c.held, 20, "3 queued items released at once");
    let again: Value = app.cancel_batch(&key, &b).await.json().await.unwrap();
    assert_eq!(again["counts"]["cancelled"], 3, "idempotent");
    assert_eq!(app.wallet(&key).await.held, 20);
    assert_eq!(app.complete(&running[0]).await.status(), 200);
    assert_eq!(app.fail(&running[1], true).await.status(), 200);
    let v: Value = app.get_batch(&key, &b).await.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["counts"]["succeeded"], 1);
    assert_eq!(v["counts"]["cancelled"], 4);
    let c = app.wallet(&key).await;
    assert_eq!(c.held, 0);
    assert_eq!(c.balance, 990);
    app.assert_ledger_invariant().await;
    // The final transition recorded nothing to send: this key has no webhook URL.
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM webhook_delivery")
            .await,
        0
    );
}

async fn list_pages_every_batch_once(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100000\nrate_limit_per_min = 1000\nread_rate_limit_per_min = 1000",
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    let mut made = Vec::new();
    for i in 0..23 {
        made.push(create(&app, &key, &format!("l-{i}"), 1).await);
    }
    app.cancel_batch(&key, &made[0]).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=5&cursor={c}"),
            None => "limit=5".into(),
        };
        let v: Value = app.list_batches(&key, &q).await.json().await.unwrap();
        for b in v["data"].as_array().unwrap() {
            assert!(b.get("items").is_none());
            seen.push(b["batch_id"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut expected = made.clone();
    expected.reverse();
    assert_eq!(seen, expected, "newest first, each exactly once");
    let v: Value = app
        .list_batches(&key, "status=cancelled")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    // Malformed (not the documents' 22 URL-safe base64 characters): refused.
    let r = app.list_batches(&key, "cursor=garbage").await;
    assert_eq!(r.status(), 400);
    // Well-formed: a position (here before every batch id), so an empty last page.
    let r = app
        .list_batches(&key, "cursor=AAAAAAAAAAAAAAAAAAAAAA")
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 0, "{v}");
}

async fn another_keys_batch_is_not_found(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .key("beta", "initial_credits = 100")
        .build()
        .await;
    let b = create(&app, app.key("acme"), "mine", 1).await;
    let r = app.get_batch(app.key("beta"), &b).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "NOT_FOUND");
    assert_eq!(app.cancel_batch(app.key("beta"), &b).await.status(), 404);
    let v: Value = app
        .get_batch(app.key("acme"), &b)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["items"][0]["prompt"], "prompt number 0");
    assert_eq!(v["items"][0]["params"]["duration_s"], 5);
}

async fn reference_worker_runs_a_batch_end_to_end(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let b = create(&app, &key, "ref-1", 3).await;
    let args = api::worker_client::WorkerArgs {
        base_url: app.base.clone(),
        secret: crate::helpers::WORKER_SECRET.into(),
        concurrency: 2,
        renderer_cmd: "cat > /dev/null; echo rendering \"$PROMPT\" >&2; echo \"https://cdn.example/$ITEM_ID.mp4\"".into(),
        worker_id: "ref".into(),
        lease_seconds: 30,
        timeout_seconds: 30,
        exit_when_idle: true,
        poll_seconds: 1,
    };
    api::worker_client::run(args).await.expect("worker runs");
    let v: Value = app.get_batch(&key, &b).await.json().await.unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["counts"]["succeeded"], 3);
    for item in v["items"].as_array().unwrap() {
        let id = item["item_id"].as_str().unwrap();
        assert_eq!(item["result_url"], format!("https://cdn.example/{id}.mp4"));
    }
    assert_eq!(app.wallet(&key).await.balance, 970);
}

/// The reference worker keeps going through a server restart: claims and reports that fail
/// while the server is down are retried with backoff, and the batch is finished.
async fn reference_worker_survives_a_server_restart(backend: Backend) {
    let mut app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let b = create(&app, &key, "ref-restart", 6).await;
    let args = api::worker_client::WorkerArgs {
        base_url: app.base.clone(),
        secret: crate::helpers::WORKER_SECRET.into(),
        concurrency: 2,
        // Slow enough that renders are in flight when the server goes away.
        renderer_cmd: "cat > /dev/null; sleep 0.4; echo \"https://cdn.example/$ITEM_ID.mp4\""
            .into(),
        worker_id: "ref".into(),
        lease_seconds: 30,
        timeout_seconds: 30,
        exit_when_idle: false,
        poll_seconds: 1,
    };
    let worker = tokio::spawn(api::worker_client::run(args));
    // Renders are in flight once the worker has claimed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app
        .scalar("SELECT COUNT(*) AS v FROM batch_item WHERE status = 'running'")
        .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker claimed nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The server comes back only after two of the worker's calls were turned away unanswered.
    app.restart_in_place(2).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let v = loop {
        let v: Value = app.get_batch(&key, &b).await.json().await.unwrap();
        if v["status"] == "completed" {
            break v;
        }
        assert!(
            !worker.is_finished(),
            "the worker exited: {:?}",
            worker.await
        );
        assert!(std::time::Instant::now() < deadline, "not finished: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    worker.abort();
    assert_eq!(v["counts"]["succeeded"], 6, "{v}");
    assert_eq!(app.wallet(&key).await.held, 0);
    app.assert_ledger_invariant().await;
}

/// An item whose worker never reports (crash, hang) is failed and released after its last
/// allowed attempt instead of circling the queue for ever.
async fn expired_last_attempt_fails_the_item_and_releases_it(backend: Backend) {
    {
        let app = TestApp::builder(backend)
            .key("acme", "initial_credits = 100")
            .config("")
            .build()
            .await;
        let key = app.key("acme").to_string();
        let b = create(&app, &key, "poison", 1).await;
        let mut last = Value::Null;
        for attempt in 1..=3 {
            let r = app
                .worker_post(
                    "/claim",
                    &json!({"worker_id": "crashy", "max_items": 1, "lease_seconds": 1}),
                )
                .await;
            let items = r.json::<Value>().await.unwrap()["items"]
                .as_array()
                .cloned()
                .unwrap();
            assert_eq!(items.len(), 1, "attempt {attempt} gets the item");
            assert_eq!(items[0]["attempt"], attempt);
            last = items[0].clone();
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        // max_attempts = 3 (default): it is never handed out again, and the reaper fails it.
        assert!(app.claim("crashy", 1).await.is_empty());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
        let v = loop {
            let v: Value = app.get_batch(&key, &b).await.json().await.unwrap();
            if v["status"] == "completed" {
                break v;
            }
            assert!(std::time::Instant::now() < deadline, "not reaped: {v}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert_eq!(v["counts"]["failed"], 1);
        assert_eq!(app.wallet(&key).await.held, 0);
        assert_eq!(
            app.complete(&last).await.status(),
            409,
            "the late report is stale"
        );
        app.assert_ledger_invariant().await;
    }
}
