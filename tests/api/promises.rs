//! Promises of the contract that had no test of their own, one behaviour per test.
use std::time::Duration;

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::{Receiver, SECRET, wait_status};

both_backends!(
    unauthorized_and_forbidden_calls_use_no_quota,
    a_heartbeat_extends_the_lease,
    a_retryable_failure_requeues_until_max_attempts,
    the_batch_webhook_url_override_receives_the_event,
    metadata_is_returned_as_given,
    every_customer_response_carries_the_rate_limit_headers,
    an_admin_idempotency_key_reused_with_another_body_is_refused,
    redirects_are_not_followed_by_webhooks,
    private_webhook_targets_are_refused_at_send_time,
);

/// 401 and 403 calls use no quota: with a limit of 2, two creates still pass after them.
async fn unauthorized_and_forbidden_calls_use_no_quota(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000\nrate_limit_per_min = 2")
        .key(
            "fenced",
            "initial_credits = 1000\nrate_limit_per_min = 2\nip_allowlist = [\"203.0.113.0/24\"]",
        )
        .build()
        .await;
    app.freeze_clock();
    for i in 0..5 {
        let r = app
            .create_batch(
                "vb_not_a_key",
                &TestApp::batch_body(Some(&format!("x{i}")), 1),
            )
            .await;
        assert_eq!(r.status(), 401);
        let r = app
            .create_batch(
                app.key("fenced"),
                &TestApp::batch_body(Some(&format!("f{i}")), 1),
            )
            .await;
        assert_eq!(r.status(), 403);
    }
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM rate_limit_window")
            .await,
        0,
        "no window was counted"
    );
    let key = app.key("acme").to_string();
    for (i, want) in [201, 201, 429].into_iter().enumerate() {
        let r = app
            .create_batch(&key, &TestApp::batch_body(Some(&format!("a{i}")), 1))
            .await;
        assert_eq!(r.status(), want, "create {i}");
    }
}

async fn claim_with(app: &TestApp, lease: u32) -> Value {
    let r = app
        .worker_post(
            "/claim",
            &json!({ "worker_id": "w", "max_items": 1, "lease_seconds": lease }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["items"][0].clone()
}

/// A heartbeat moves the lease's end, so the item is still the worker's after the first end.
async fn a_heartbeat_extends_the_lease(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("hb"), 1))
            .await
            .status(),
        201
    );
    let item = claim_with(&app, 3).await;
    let first_end: chrono::DateTime<chrono::Utc> =
        item["lease_expires_at"].as_str().unwrap().parse().unwrap();
    let r = app
        .worker_post(
            &format!("/items/{}/heartbeat", item["item_id"].as_str().unwrap()),
            &json!({ "lease_token": item["lease_token"], "lease_seconds": 60 }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let new_end: chrono::DateTime<chrono::Utc> =
        v["lease_expires_at"].as_str().unwrap().parse().unwrap();
    assert!(
        new_end > first_end + chrono::Duration::seconds(2),
        "{first_end} -> {new_end}"
    );
    // Past the first end: a claim (which takes expired leases) and the reaper's passes leave
    // it leased, and the report is accepted.
    while chrono::Utc::now() <= first_end + chrono::Duration::milliseconds(1100) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(claim_with(&app, 30).await.is_null(), "not handed out again");
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) AS v FROM batch_item WHERE status = 'running' AND attempts = 1"
        )
        .await,
        1,
        "still the first attempt, never requeued"
    );
    assert_eq!(app.complete(&item).await.status(), 200);
}

/// A retryable failure puts the item back with attempt + 1; at `max_attempts` it fails for
/// good and its hold is released.
async fn a_retryable_failure_requeues_until_max_attempts(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.worker.max_attempts = 2)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("retry"), 1))
        .await;
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = claim_with(&app, 30).await;
    assert_eq!(first["attempt"], 1);
    let r = app.fail(&first, true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "queued");
    let second = claim_with(&app, 30).await;
    assert_eq!(second["item_id"], first["item_id"]);
    assert_eq!(second["attempt"], 2);
    let r = app.fail(&second, true).await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "failed");
    let b: Value = app.get_batch(&key, &id).await.json().await.unwrap();
    assert_eq!(b["status"], "completed");
    assert_eq!(b["counts"]["failed"], 1);
    let credits = app.wallet(&key).await;
    assert_eq!((credits.held, credits.balance), (0, 100));
}

/// A batch's own `webhook_url` receives its events; the key's URL gets none.
async fn the_batch_webhook_url_override_receives_the_event(backend: Backend) {
    let key_receiver = Receiver::start(0, &[]).await;
    let batch_receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "acme",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                key_receiver.url()
            ),
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    let body = json!({ "items": [{ "prompt": "p" }], "webhook_url": batch_receiver.url() });
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(app.cancel_batch(&key, &id).await.status(), 200);
    let got = batch_receiver.wait_for(1, Duration::from_secs(10)).await;
    assert!(got[0].body.contains(&id));
    // Every event is in the outbox, final: none was ever meant for the key's URL.
    let rows = crate::helpers::wait_outbox_final(&app.db(), 1).await;
    assert!(
        rows.iter().all(|r| r.target_url == batch_receiver.url()),
        "an event went to the key's URL: {rows:?}"
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(key_receiver.got().is_empty(), "the key's URL got an event");
}

/// `metadata` comes back exactly as sent, on the create's replay and on reads.
async fn metadata_is_returned_as_given(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let metadata = json!({
        "campaign": "q4", "n": 42, "ratio": 0.5, "ok": true, "none": null,
        "nested": { "list": [1, "two", { "three": 3 }] }, "text": "漢字 🎬 \"quoted\""
    });
    let body =
        json!({ "request_id": "meta-1", "items": [{ "prompt": "p" }], "metadata": metadata });
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let v: Value = app.get_batch(&key, &id).await.json().await.unwrap();
    assert_eq!(v["metadata"], metadata);
    let listed: Value = app.list_batches(&key, "").await.json().await.unwrap();
    assert_eq!(listed["data"][0]["metadata"], metadata, "{listed}");
}

fn rate_headers(r: &reqwest::Response) -> (String, String, u32, u32, u32) {
    let h = |n: &str| {
        r.headers()
            .get(n)
            .unwrap_or_else(|| panic!("{n} missing on a {} answer", r.status()))
            .to_str()
            .unwrap()
            .to_string()
    };
    (
        h("ratelimit-policy"),
        h("ratelimit"),
        h("x-ratelimit-limit").parse().unwrap(),
        h("x-ratelimit-remaining").parse().unwrap(),
        h("x-ratelimit-reset").parse().unwrap(),
    )
}

/// Every customer answer, 2xx included, carries `RateLimit-Policy`, `RateLimit` and the
/// `X-RateLimit-*` headers of the scope it counted against.
async fn every_customer_response_carries_the_rate_limit_headers(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100\nrate_limit_per_min = 7\nread_rate_limit_per_min = 50",
        )
        .build()
        .await;
    app.freeze_clock();
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("h1"), 1))
        .await;
    assert_eq!(r.status(), 201);
    let (policy, rl, limit, remaining, reset) = rate_headers(&r);
    assert_eq!(policy, "\"batch\";q=7;w=60");
    assert_eq!(rl, format!("\"batch\";r=6;t={reset}"));
    assert_eq!((limit, remaining), (7, 6));
    assert!((1..=60).contains(&reset));
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let base = format!("{}/api/enterprise", app.base);
    let reads = [
        app.client.get(format!("{base}/video-batch/{id}")),
        app.client.get(format!("{base}/video-batch")),
        app.client.get(format!("{base}/credits")),
        app.client.get(format!("{base}/usage")),
        app.client.post(format!("{base}/video-batch/{id}/cancel")),
    ];
    for (i, req) in reads.into_iter().enumerate() {
        let r = req.header("x-api-key", &key).send().await.unwrap();
        assert_eq!(r.status(), 200, "call {i}");
        let (policy, _, limit, remaining, _) = rate_headers(&r);
        assert_eq!(policy, "\"read\";q=50;w=60");
        assert_eq!((limit, remaining), (50, 49 - i as u32), "call {i}");
    }
}

/// Reusing an admin `Idempotency-Key` with another body is refused (409) and moves nothing;
/// the same body again answers without a second grant.
async fn an_admin_idempotency_key_reused_with_another_body_is_refused(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 0")
        .build()
        .await;
    let grant = |amount: i64| {
        let app = &app;
        async move {
            app.admin_post(
                "/keys/acme/credits/grant",
                &json!({ "amount": amount, "note": "top-up" }),
                Some("grant-7"),
            )
            .await
        }
    };
    assert_eq!(grant(50).await.status(), 200);
    let again = grant(50).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["balance"], 50);
    let other = grant(70).await;
    assert_eq!(other.status(), 409);
    assert_eq!(
        other.json::<Value>().await.unwrap()["error"],
        "IDEMPOTENCY_CONFLICT"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'grant'")
            .await,
        1
    );
    assert_eq!(app.wallet(app.key("acme")).await.balance, 50);
}

/// A 302 from the endpoint is an unsuccessful attempt; the redirect target is never called.
async fn redirects_are_not_followed_by_webhooks(backend: Backend) {
    let elsewhere = Receiver::start(0, &[]).await;
    let location: &'static str = Box::leak(elsewhere.url().into_boxed_str());
    let redirecting = Receiver::start(0, &[(302, None), (302, None), (302, None)]).await;
    redirecting.redirect_to(location);
    let app = TestApp::builder(backend)
        .key(
            "acme",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                redirecting.url()
            ),
        )
        .settings(|s| s.webhooks.retry_schedule = vec![std::time::Duration::from_secs(1)])
        .build()
        .await;
    let key = app.key("acme").to_string();
    app.create_and_cancel(&key, "redir").await;
    let d = wait_status(&app, "failed", Duration::from_secs(15)).await;
    assert_eq!(d["last_status_code"], 302, "{d}");
    assert_eq!(
        redirecting.got().len(),
        2,
        "two attempts, both answered 302"
    );
    assert!(elsewhere.got().is_empty(), "the redirect was followed");
}

/// With `allow_private_targets = false`, a key whose configured URL points at a loopback
/// receiver gets nothing sent: the attempt is refused at send time and not retried.
async fn private_webhook_targets_are_refused_at_send_time(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .public_targets_only()
        .key(
            "acme",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                receiver.url()
            ),
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    app.create_and_cancel(&key, "private").await;
    let d = wait_status(&app, "failed", Duration::from_secs(10)).await;
    assert!(
        d["last_error"].as_str().unwrap_or("").contains("refused"),
        "{d}"
    );
    // Failed is final: one attempt, never retried, and nothing reached the receiver.
    assert_eq!(d["attempt_count"], 1, "not retried: {d}");
    let rows = crate::helpers::wait_outbox_final(&app.db(), 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].attempt_count, rows[0].attempts),
        (1, 1),
        "{rows:?}"
    );
    assert!(receiver.got().is_empty(), "a private target was called");
}

/// The worker and admin documents have their own Swagger UI and JSON document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_admin_docs_are_served() {
    let app = TestApp::builder(Backend::Sqlite).build().await;
    for (ui, doc, title) in [
        ("/worker/docs", "/worker/openapi.json", "worker API"),
        ("/admin/docs", "/admin/openapi.json", "admin API"),
    ] {
        let r = app
            .client
            .get(format!("{}{ui}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{ui}");
        let html = r.text().await.unwrap();
        assert!(html.contains("swagger-ui"), "{ui} is Swagger UI");
        let r = app
            .client
            .get(format!("{}{doc}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{doc}");
        let v: Value = r.json().await.unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        assert!(
            v["info"]["title"].as_str().unwrap().contains(title),
            "{doc}"
        );
    }
}
