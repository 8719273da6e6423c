//! POST /api/enterprise/video-batch: every guard, exact under concurrency.
use futures::future::join_all;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    rate_limit_is_exact_under_concurrency,
    no_overdraft_under_concurrency,
    creates_refused_for_credits_roll_nothing_back,
    one_batch_per_request_id_under_concurrency,
    every_error_code_of_the_create_path,
    ip_allowlist_and_trusted_proxies,
    audit_rows_for_every_outcome,
    a_create_over_the_quota_is_429_whatever_else_is_wrong,
    a_create_is_counted_and_written_in_one_commit,
);

/// With PostgreSQL, a second node shares the database; requests alternate between nodes.
async fn nodes(app: &TestApp, backend: &Backend) -> Vec<TestApp> {
    if backend.is_postgres() {
        vec![app.peer().await]
    } else {
        Vec::new()
    }
}

fn pick<'a>(app: &'a TestApp, peers: &'a [TestApp], i: usize) -> &'a TestApp {
    if peers.is_empty() || i.is_multiple_of(2) {
        app
    } else {
        &peers[0]
    }
}

async fn rate_limit_is_exact_under_concurrency(backend: Backend) {
    let app = TestApp::builder(backend.clone())
        .key("acme", "initial_credits = 1000000\nrate_limit_per_min = 60")
        .build()
        .await;
    let peers = nodes(&app, &backend).await;
    let key = app.key("acme").to_string();
    let at = app.freeze_clock();
    for p in &peers {
        p.freeze_clock_at(at);
    }
    let calls = (0..200).map(|i| {
        let target = pick(&app, &peers, i);
        let key = key.clone();
        async move {
            target
                .create_batch(&key, &TestApp::batch_body(Some(&format!("rl-{i}")), 1))
                .await
        }
    });
    let responses = join_all(calls).await;
    let created = responses.iter().filter(|r| r.status() == 201).count();
    let limited: Vec<_> = responses.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(created, 60, "exactly the limit is admitted");
    assert_eq!(limited.len(), 140);
    let r = limited[0];
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(r.headers()["ratelimit-policy"], "\"batch\";q=60;w=60");
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 60);
}

async fn no_overdraft_under_concurrency(backend: Backend) {
    // 10 batches of 2 items at 10 credits: exactly 200 credits.
    let app = TestApp::builder(backend.clone())
        .key("acme", "initial_credits = 200\nrate_limit_per_min = 1000")
        .build()
        .await;
    let peers = nodes(&app, &backend).await;
    let key = app.key("acme").to_string();
    let calls = (0..50).map(|i| {
        let target = pick(&app, &peers, i);
        let key = key.clone();
        async move {
            target
                .create_batch(&key, &TestApp::batch_body(Some(&format!("od-{i}")), 2))
                .await
                .status()
        }
    });
    let statuses = join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 402).count(), 40);
    let c = app.wallet(&key).await;
    assert_eq!(c.balance, 200);
    assert_eq!(c.held, 200);
    assert_eq!(c.available, 0);
    app.assert_ledger_invariant().await;
}

/// A create refused for want of credits has changed nothing, so it is answered without
/// rolling its group back: 40 refusals among 10 creates, and no group of the node ran again
/// one savepoint per unit.
async fn creates_refused_for_credits_roll_nothing_back(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 200\nrate_limit_per_min = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let calls = (0..50).map(|i| {
        let (app, key) = (&app, key.clone());
        async move {
            app.create_batch(&key, &TestApp::batch_body(Some(&format!("rf-{i}")), 2))
                .await
                .status()
        }
    });
    let statuses = join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 402).count(), 40);
    assert_eq!(app.state().writes.isolated_groups(), 0);
    let c = app.wallet(&key).await;
    assert_eq!((c.balance, c.held), (200, 200));
    app.assert_ledger_invariant().await;
}

async fn one_batch_per_request_id_under_concurrency(backend: Backend) {
    let app = TestApp::builder(backend.clone())
        .key("acme", "initial_credits = 1000\nrate_limit_per_min = 1000")
        .build()
        .await;
    let peers = nodes(&app, &backend).await;
    let key = app.key("acme").to_string();
    let body = TestApp::batch_body(Some("order-42"), 2);
    let calls = (0..50).map(|i| {
        let target = pick(&app, &peers, i);
        let (key, body) = (key.clone(), body.clone());
        async move {
            let r = target.create_batch(&key, &body).await;
            let status = r.status().as_u16();
            let replayed = r
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.to_str().unwrap().to_string());
            let v: Value = r.json().await.unwrap();
            (status, replayed, v)
        }
    });
    let results = join_all(calls).await;
    let created: Vec<_> = results.iter().filter(|r| r.0 == 201).collect();
    let replays: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    assert_eq!(created.len(), 1, "{results:?}");
    assert_eq!(replays.len(), 49);
    let batch_id = &created[0].2["batch_id"];
    for r in &replays {
        assert_eq!(&r.2["batch_id"], batch_id);
        assert_eq!(r.2["idempotent_replay"], true);
        assert_eq!(r.1.as_deref(), Some("true"));
        assert_eq!(
            r.2["available_credits"], 980,
            "fresh available credits on replay"
        );
    }
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 1);
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'hold'")
            .await,
        1
    );
    assert_eq!(app.wallet(&key).await.held, 20);

    let other = TestApp::batch_body(Some("order-42"), 3);
    let r = app.create_batch(&key, &other).await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "IDEMPOTENCY_CONFLICT");
    assert_eq!(v["request_id"], "order-42");
    app.assert_ledger_invariant().await;
}

async fn every_error_code_of_the_create_path(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 30\nmax_batch_items = 3\nmax_prompt_chars = 5\nrate_limit_per_min = 100")
        .key("blocked", "ip_allowlist = [\"203.0.113.0/24\"]")
        .key("off", "disabled = true")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let check = |status: u16, code: &'static str| {
        move |r: (u16, Value)| {
            assert_eq!(r.0, status, "{}", r.1);
            assert_eq!(r.1["ok"], false);
            assert_eq!(r.1["error"], code, "{}", r.1);
        }
    };
    async fn send(app: &TestApp, key: &str, body: Value) -> (u16, Value) {
        let r = app.create_batch(key, &body).await;
        (r.status().as_u16(), r.json().await.unwrap())
    }
    check(401, "UNAUTHORIZED")(send(&app, "vb_wrong", TestApp::batch_body(None, 1)).await);
    check(401, "UNAUTHORIZED")(send(&app, app.key("off"), TestApp::batch_body(None, 1)).await);
    let r = app
        .client
        .post(format!("{}/api/enterprise/video-batch", app.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    check(403, "IP_NOT_ALLOWED")(
        send(&app, app.key("blocked"), TestApp::batch_body(None, 1)).await,
    );
    let (s, v) = send(&app, &key, TestApp::batch_body(None, 4)).await;
    check(422, "BATCH_TOO_LARGE")((s, v.clone()));
    assert_eq!(v["details"]["max_batch_items"], 3);
    let (s, v) = send(
        &app,
        &key,
        json!({"items": [{"prompt": "ok"}, {"prompt": "ünïcødé!"}]}),
    )
    .await;
    check(422, "VALIDATION_ERROR")((s, v.clone()));
    assert!(
        v["message"].as_str().unwrap().contains("items[1].prompt"),
        "{v}"
    );
    // 5 Unicode characters is within a 5-character cap even though it is more bytes.
    let (s, _) = send(
        &app,
        &key,
        json!({"request_id": "uni", "items": [{"prompt": "ünïcø"}]}),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = send(
        &app,
        &key,
        json!({"items": [{"prompt": "ok"}], "webhook_url": "ftp://x"}),
    )
    .await;
    check(422, "VALIDATION_ERROR")((s, v.clone()));
    assert!(v["message"].as_str().unwrap().contains("webhook_url"));
    check(400, "VALIDATION_ERROR")(
        send(
            &app,
            &key,
            json!({"request_id": "bad id!", "items": [{"prompt": "ok"}]}),
        )
        .await,
    );
    check(400, "VALIDATION_ERROR")(
        send(&app, &key, json!({"items": [{"prompt": "ok"}], "extra": 1})).await,
    );
    let r = app
        .client
        .post(format!("{}/api/enterprise/video-batch", app.base))
        .header("x-api-key", &key)
        .header("Idempotency-Key", "abc")
        .json(&json!({"request_id": "xyz", "items": [{"prompt": "ok"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // 20 of 30 credits left; 3 items need 30.
    let (s, v) = send(
        &app,
        &key,
        json!({"request_id": "big", "items": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]}),
    )
    .await;
    check(402, "INSUFFICIENT_CREDITS")((s, v.clone()));
    assert_eq!(v["details"]["required_credits"], 30);
    assert_eq!(v["details"]["available_credits"], 20);
    assert_eq!(v["request_id"], "big");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM batch_job").await,
        1,
        "only the valid batch exists"
    );
    // Idempotency-Key header alone works and is replayed.
    let send_hdr = || {
        app.client
            .post(format!("{}/api/enterprise/video-batch", app.base))
            .header("x-api-key", &key)
            .header("Idempotency-Key", "hdr-1")
            .json(&json!({"items": [{"prompt": "a"}]}))
            .send()
    };
    assert_eq!(send_hdr().await.unwrap().status(), 201);
    assert_eq!(send_hdr().await.unwrap().status(), 200);
}

async fn ip_allowlist_and_trusted_proxies(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "local",
            "initial_credits = 100\nip_allowlist = [\"127.0.0.1/32\"]",
        )
        .key(
            "remote",
            "initial_credits = 100\nip_allowlist = [\"198.51.100.7\"]",
        )
        .build()
        .await;
    let get = |key: String, xff: Option<&'static str>| {
        let mut r = app
            .client
            .get(format!("{}/api/enterprise/credits", app.base))
            .header("x-api-key", key);
        if let Some(x) = xff {
            r = r
                .header("x-forwarded-for", x)
                .header("x-real-ip", "198.51.100.7")
                .header("forwarded", "for=198.51.100.7");
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        get(app.key("local").into(), None).await,
        200,
        "allowed address"
    );
    assert_eq!(
        get(app.key("remote").into(), None).await,
        403,
        "refused address"
    );
    // The peer (127.0.0.1) is not a trusted proxy: forwarding headers are ignored.
    assert_eq!(
        get(app.key("remote").into(), Some("198.51.100.7")).await,
        403,
        "spoofed XFF ignored"
    );
    assert_eq!(
        get(app.key("local").into(), Some("198.51.100.7")).await,
        200
    );

    // Trust the loopback proxy: the right-most untrusted X-Forwarded-For hop is the client.
    let mut app = app;
    app.write_config(
        &[
            ("local".into(), "ip_allowlist = [\"127.0.0.1/32\"]".into()),
            ("remote".into(), "ip_allowlist = [\"198.51.100.7\"]".into()),
        ],
        "",
    );
    let base = std::fs::read_to_string(app.config_dir.path().join("base.toml")).unwrap();
    std::fs::write(
        app.config_dir.path().join("base.toml"),
        base.replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
            1,
        ),
    )
    .unwrap();
    app.restart().await;
    let get = |key: String, xff: &'static str| {
        let r = app
            .client
            .get(format!("{}/api/enterprise/credits", app.base))
            .header("x-api-key", key)
            .header("x-forwarded-for", xff);
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        get(app.key("remote").into(), "203.0.113.9, 198.51.100.7").await,
        200,
        "honoured from a trusted proxy"
    );
    assert_eq!(
        get(app.key("remote").into(), "198.51.100.7, 203.0.113.9").await,
        403,
        "right-most untrusted hop counts"
    );
    assert_eq!(get(app.key("local").into(), "198.51.100.7").await, 403);
}

async fn audit_rows_for_every_outcome(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 20\nrate_limit_per_min = 5\nmax_batch_items = 2",
        )
        .key("blocked", "ip_allowlist = [\"203.0.113.0/24\"]")
        .build()
        .await;
    let key = app.key("acme").to_string();
    app.freeze_clock();
    let ua = |r: reqwest::RequestBuilder| r.header("user-agent", "audit-test/1.0");
    // Each call also carries its own x-request-id, so that the audit's request id can be checked
    // against a value the test chose: the body's id where the body was read, the header's
    // otherwise.
    let post = |key: String, body: Value| {
        let trace = format!("trace-{}", body["request_id"].as_str().unwrap_or("none"));
        let r = ua(app
            .client
            .post(format!("{}/api/enterprise/video-batch", app.base)))
        .header("x-api-key", key)
        .header("x-request-id", trace)
        .json(&body);
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        post(key.clone(), TestApp::batch_body(Some("a1"), 1)).await,
        201
    );
    assert_eq!(
        post(key.clone(), TestApp::batch_body(Some("a1"), 1)).await,
        200
    );
    assert_eq!(
        post(key.clone(), TestApp::batch_body(Some("a1"), 2)).await,
        409
    );
    assert_eq!(
        post(key.clone(), TestApp::batch_body(Some("a2"), 3)).await,
        422
    );
    assert_eq!(
        post(key.clone(), TestApp::batch_body(Some("a3"), 2)).await,
        402
    );
    assert_eq!(
        post(key.clone(), TestApp::batch_body(Some("a4"), 1)).await,
        429
    );
    assert_eq!(
        post("vb_nope".into(), TestApp::batch_body(Some("a5"), 1)).await,
        401
    );
    assert_eq!(
        post(
            app.key("blocked").into(),
            TestApp::batch_body(Some("a6"), 1)
        )
        .await,
        403
    );

    let db = app.db();
    use sea_orm::{EntityTrait, QueryOrder};
    let rows = entity::usage_event::Entity::find()
        .order_by_asc(entity::usage_event::Column::Id)
        .all(&db)
        .await
        .unwrap();
    let got: Vec<(i32, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.status, r.error_code.clone(), r.request_id.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (201, None, Some("a1".into())),
            (200, None, Some("a1".into())),
            (409, Some("IDEMPOTENCY_CONFLICT".into()), Some("a1".into())),
            (422, Some("BATCH_TOO_LARGE".into()), Some("a2".into())),
            (402, Some("INSUFFICIENT_CREDITS".into()), Some("a3".into())),
            (
                429,
                Some("RATE_LIMIT_EXCEEDED".into()),
                Some("trace-a4".into())
            ),
            (401, Some("UNAUTHORIZED".into()), Some("trace-a5".into())),
            (403, Some("IP_NOT_ALLOWED".into()), Some("trace-a6".into())),
        ]
    );
    for r in &rows {
        assert_eq!(r.client_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(r.user_agent.as_deref(), Some("audit-test/1.0"));
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/api/enterprise/video-batch");
    }
    assert_eq!(rows[0].items, 1);
    assert_eq!(rows[0].credits, 10);
    assert!(rows[0].batch_id.is_some());
    assert_eq!(rows[6].api_key_id, None, "401 rows have no key");
    // 401 and 403 used no quota: 5 admitted calls (201, 200, 409, 422, 402), then 429.
    let text = format!("{rows:?}");
    assert!(!text.contains(&key), "the key never reaches the audit");
}

/// The quota comes before idempotency, validation and credits, even though a create is counted
/// in the group that writes its batch: once the window is used up, a replay, a conflicting
/// reuse, a batch too large and a batch beyond the wallet are all 429, hold nothing and are
/// audited as 429 with the call's `x-request-id`.
async fn a_create_over_the_quota_is_429_whatever_else_is_wrong(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 30\nrate_limit_per_min = 2\nmax_batch_items = 2",
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    app.freeze_clock();
    let post = |body: Value, trace: &str| {
        let r = app
            .client
            .post(format!("{}/api/enterprise/video-batch", app.base))
            .header("x-api-key", &key)
            .header("x-request-id", trace)
            .json(&body);
        async move { r.send().await.unwrap() }
    };
    assert_eq!(
        post(TestApp::batch_body(Some("q1"), 1), "t1")
            .await
            .status(),
        201
    );
    assert_eq!(
        post(TestApp::batch_body(Some("q2"), 1), "t2")
            .await
            .status(),
        201
    );
    let refused = [
        (TestApp::batch_body(Some("q1"), 1), "replay"),
        (TestApp::batch_body(Some("q1"), 2), "conflict"),
        (TestApp::batch_body(Some("q3"), 3), "too-large"),
        (TestApp::batch_body(Some("q4"), 2), "no-credits"),
        (TestApp::batch_body(Some("q5"), 1), "fine"),
    ];
    for (body, trace) in refused {
        let r = post(body, trace).await;
        assert_eq!(r.status(), 429, "{trace}");
        assert!(r.headers().get("idempotent-replayed").is_none(), "{trace}");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "RATE_LIMIT_EXCEEDED", "{trace}: {v}");
        assert_eq!(v["request_id"], trace, "{trace}: {v}");
    }
    let w = app.wallet(&key).await;
    assert_eq!(
        (w.balance, w.held),
        (30, 20),
        "only the two admitted batches hold"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 2);
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) AS v FROM usage_event WHERE status = 429 \
             AND error_code = 'RATE_LIMIT_EXCEEDED' AND batch_id IS NULL \
             AND request_id IN ('replay', 'conflict', 'too-large', 'no-credits', 'fine')"
        )
        .await,
        5
    );
}

/// A create waits for one group commit, not two: its rate-limit count and its batch are
/// written together. 20 creates one after another make exactly 20 commits (the reaper is paused
/// while they are counted), where counting first and writing after made 40.
async fn a_create_is_counted_and_written_in_one_commit(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000\nrate_limit_per_min = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let (commits, ()) = app
        .commits_during(async {
            for i in 0..20 {
                let body = TestApp::batch_body(Some(&format!("one-{i}")), 1);
                assert_eq!(app.create_batch(&key, &body).await.status(), 201);
            }
        })
        .await;
    assert_eq!(commits, 20, "{commits} commits for 20 creates");
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 20);
    assert_eq!(app.wallet(&key).await.held, 200);
}
