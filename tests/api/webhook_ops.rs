//! Webhook operations for customers: deliveries and attempts listed per key, recover after an
//! outage (each failed delivery once), resend with the same `webhook-id`, endpoints that
//! disable themselves and hold their events until enabled, and a previous signing secret that
//! stops signing when it expires.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::{Receiver, SECRET, reserve_port, verify};

both_backends!(
    an_outage_is_recovered_once_and_resend_keeps_the_webhook_id,
    an_endpoint_failing_too_long_is_disabled_and_enable_releases_its_events,
    an_expired_previous_secret_stops_signing,
);

async fn call(
    app: &TestApp,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}/api/enterprise{path}", app.base);
    let mut r = match method {
        "GET" => app.client.get(url),
        _ => app.client.post(url),
    }
    .header("x-api-key", key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn finish_batches(app: &TestApp, key: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let r = app
            .create_batch(key, &TestApp::batch_body(Some(&format!("{prefix}-{i}")), 1))
            .await;
        assert_eq!(r.status(), 201);
    }
    let items = app.claim("w", n as u32).await;
    assert_eq!(items.len(), n);
    for item in &items {
        assert_eq!(app.complete(item).await.status(), 200);
    }
}

/// An endpoint that refuses connections (its port reserved, not listening: start a receiver on
/// the socket to bring it up), its URL, and an app whose key `acme` sends its webhooks there.
fn down_endpoint(
    backend: Backend,
) -> (
    tokio::net::TcpSocket,
    String,
    crate::helpers::TestAppBuilder,
) {
    let (socket, port) = reserve_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let builder = TestApp::builder(backend).key(
        "acme",
        &format!(
            "initial_credits = 10000\nrate_limit_per_min = 1000\n\
             webhook_url = \"{url}\"\nwebhook_secret = \"{SECRET}\""
        ),
    );
    (socket, url, builder)
}

/// Waits until the key's deliveries in `status` number `n`.
async fn wait_deliveries(app: &TestApp, key: &str, status: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = call(
            app,
            key,
            "GET",
            &format!("/webhooks/deliveries?status={status}&limit=100"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let data = v["data"].as_array().unwrap().clone();
        if data.len() == n {
            return data;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} {status}: {v}",
            data.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An endpoint refuses connections while 20 batches finish: the 20 deliveries are listed as
/// failed with their attempts; recover sends each exactly once (counted by `webhook-id` at the
/// receiver) and a second recover sends nothing; resend of a delivered event arrives again with
/// its `webhook-id`, once per `Idempotency-Key`; another key sees none of it.
async fn an_outage_is_recovered_once_and_resend_keeps_the_webhook_id(backend: Backend) {
    let (socket, url, builder) = down_endpoint(backend);
    let app = builder
        .key("other", "initial_credits = 100")
        .settings(|s| {
            // One attempt each: the outage fails them at once.
            s.webhooks.retry_schedule = Vec::new();
        })
        .build()
        .await;
    let key = app.key("acme").to_string();
    let other = app.key("other").to_string();
    let started = chrono::Utc::now() - chrono::Duration::seconds(1);
    finish_batches(&app, &key, "down", 20).await;
    let failed = wait_deliveries(&app, &key, "failed", 20).await;
    for d in &failed {
        assert_eq!(d["event_type"], "batch.completed");
        assert_eq!(d["target_url"], url.as_str());
        assert!(d["webhook_id"].as_str().unwrap().starts_with("msg_"));
    }
    let first = failed[0]["delivery_id"].as_str().unwrap().to_string();
    let (s, detail) = call(
        &app,
        &key,
        "GET",
        &format!("/webhooks/deliveries/{first}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{detail}");
    assert_eq!(detail["status"], "failed");
    let log = detail["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 1, "{detail}");
    assert_eq!(log[0]["error_kind"], "connect", "{detail}");
    assert!(log[0]["status_code"].is_null());
    // Paging: 20 in pages of 7, newest first, no duplicates.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, page) = call(
            &app,
            &key,
            "GET",
            &format!("/webhooks/deliveries?limit=7{cursor}"),
            None,
        )
        .await;
        assert_eq!(s, 200);
        for d in page["data"].as_array().unwrap() {
            seen.push(d["delivery_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first");
    sorted.dedup();
    assert_eq!(sorted.len(), 20);

    // Another key sees none of it.
    let (s, v) = call(&app, &other, "GET", "/webhooks/deliveries", None).await;
    assert_eq!((s, v["data"].as_array().unwrap().len()), (200, 0));
    let (s, _) = call(
        &app,
        &other,
        "GET",
        &format!("/webhooks/deliveries/{first}"),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = call(
        &app,
        &other,
        "POST",
        &format!("/webhooks/deliveries/{first}/resend"),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let since = json!({ "since": started.to_rfc3339() });
    let (s, v) = call(
        &app,
        &other,
        "POST",
        "/webhooks/recover",
        Some(since.clone()),
    )
    .await;
    assert_eq!((s, v["queued"].clone()), (200, json!(0)));

    // The endpoint is back: recover sends each failed delivery once.
    let receiver = Receiver::start_on(socket, &[]);
    let (s, v) = call(&app, &key, "POST", "/webhooks/recover", Some(since.clone())).await;
    assert_eq!((s, v["queued"].clone()), (200, json!(20)), "{v}");
    let (s, v) = call(&app, &key, "POST", "/webhooks/recover", Some(since.clone())).await;
    assert_eq!(
        (s, v["queued"].clone()),
        (200, json!(0)),
        "a repeat queues nothing: {v}"
    );
    let delivered = wait_deliveries(&app, &key, "delivered", 20).await;
    let got = receiver.wait_for(20, Duration::from_secs(30)).await;
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *by_id.entry(r.id.clone()).or_default() += 1;
    }
    assert_eq!(by_id.len(), 20, "every failed delivery once");
    assert!(by_id.values().all(|n| *n == 1), "{by_id:?}");
    let want: std::collections::HashSet<String> = delivered
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(want, by_id.keys().cloned().collect());

    // Resend of a delivered event: the same webhook-id again, once per Idempotency-Key.
    let target = &delivered[3];
    let id = target["delivery_id"].as_str().unwrap();
    for _ in 0..2 {
        let r = app
            .client
            .post(format!(
                "{}/api/enterprise/webhooks/deliveries/{id}/resend",
                app.base
            ))
            .header("x-api-key", &key)
            .header("Idempotency-Key", "resend-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let got = receiver.wait_for(21, Duration::from_secs(30)).await;
    assert_eq!(got[20].id, target["webhook_id"].as_str().unwrap());
    wait_deliveries(&app, &key, "delivered", 20).await;
    let (_, detail) = call(
        &app,
        &key,
        "GET",
        &format!("/webhooks/deliveries/{id}"),
        None,
    )
    .await;
    let log = detail["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 3, "failed, recovered, resent: {detail}");
    assert_eq!(log[2]["status_code"], 200);
    assert!(log[2]["error_kind"].is_null());
    assert_eq!(
        receiver.got().len(),
        21,
        "the repeat with the same key sent nothing"
    );
}

/// Every delivery to an endpoint fails for longer than `webhooks.disable_after`: the endpoint
/// is disabled, its pending and new events are held (never sent), and enabling it releases
/// them.
async fn an_endpoint_failing_too_long_is_disabled_and_enable_releases_its_events(backend: Backend) {
    let (socket, url, builder) = down_endpoint(backend);
    let app = builder
        .settings(|s| {
            s.webhooks.retry_schedule = vec![Duration::from_millis(300); 40];
            s.webhooks.disable_after = Duration::from_secs(1);
        })
        .build()
        .await;
    let key = app.key("acme").to_string();
    let (s, v) = call(&app, &key, "GET", "/webhooks/endpoints", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!([{"url": url, "state": "enabled", "failing_since": null,
        "last_success_at": null, "last_failure_at": null, "disabled_at": null}])
    );
    finish_batches(&app, &key, "first", 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let endpoint = loop {
        let (_, v) = call(&app, &key, "GET", "/webhooks/endpoints", None).await;
        if v[0]["state"] == "disabled" {
            break v[0].clone();
        }
        assert!(Instant::now() < deadline, "never disabled: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(endpoint["failing_since"].is_string() && endpoint["last_failure_at"].is_string());
    wait_deliveries(&app, &key, "held", 1).await;
    // A new event for the disabled endpoint waits in the outbox, held.
    finish_batches(&app, &key, "second", 1).await;
    let held = wait_deliveries(&app, &key, "held", 2).await;
    let (s, _) = call(
        &app,
        &key,
        "POST",
        &format!(
            "/webhooks/deliveries/{}/resend",
            held[0]["delivery_id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(s, 409, "a held delivery waits for its endpoint");
    // Held rows are final until the endpoint is enabled: the dispatcher never claims them.
    let receiver = Receiver::start_on(socket, &[]);
    let still_held = wait_deliveries(&app, &key, "held", 2).await;
    assert_eq!(still_held, held, "a held delivery is not attempted");
    let (s, v) = call(
        &app,
        &key,
        "POST",
        "/webhooks/endpoints/enable",
        Some(json!({"url": url})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["released"], 2, "{v}");
    assert_eq!(v["state"], "enabled", "{v}");
    let got = receiver.wait_for(2, Duration::from_secs(30)).await;
    let mut ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2);
    wait_deliveries(&app, &key, "delivered", 2).await;
    let (_, v) = call(&app, &key, "GET", "/webhooks/endpoints", None).await;
    assert_eq!(v[0]["state"], "enabled", "{v}");
    assert!(v[0]["last_success_at"].is_string(), "{v}");
    let (s, _) = call(
        &app,
        &key,
        "POST",
        "/webhooks/endpoints/enable",
        Some(json!({"url": "https://never.example/hook"})),
    )
    .await;
    assert_eq!(s, 404);
}

/// While a previous secret is valid both secrets sign (a receiver may verify with either);
/// once `webhook_previous_secret_expires_at` has passed only the current one does. (The
/// expired key is written with the names `previous_webhook_secret[_expires_at]`, which the
/// configuration accepts too.)
async fn an_expired_previous_secret_stops_signing(backend: Backend) {
    const OLD: &str = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "valid",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\
                 webhook_previous_secret = \"{OLD}\"\n\
                 webhook_previous_secret_expires_at = \"2999-01-01T00:00:00Z\"",
                receiver.url()
            ),
        )
        .key(
            "expired",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\
                 previous_webhook_secret = \"{OLD}\"\n\
                 previous_webhook_secret_expires_at = \"2020-01-01T00:00:00Z\"",
                receiver.url()
            ),
        )
        .build()
        .await;
    let valid = app.key("valid").to_string();
    let expired = app.key("expired").to_string();
    finish_batches(&app, &valid, "v", 1).await;
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert!(
        verify(SECRET, &got[0]) && verify(OLD, &got[0]),
        "both sign during the rotation"
    );
    finish_batches(&app, &expired, "e", 1).await;
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert!(verify(SECRET, &got[1]), "the current secret signs");
    assert!(!verify(OLD, &got[1]), "the expired one no longer does");
}
