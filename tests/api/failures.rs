//! Failures a customer can act on: typed error codes on items, exports and webhooks, counts
//! per code on the batch, the error export, and retry-failed through every guard of a create.
use std::time::Duration;

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::{Receiver, SECRET};

both_backends!(
    failure_codes_reach_items_exports_counts_and_webhooks,
    retry_failed_makes_a_batch_of_exactly_the_failed_items,
    retry_failed_includes_expired_items_on_request,
);

fn id(v: &Value) -> String {
    v["batch_id"].as_str().expect("batch_id").to_string()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

async fn fail_with(app: &TestApp, item: &Value, body: Value) -> reqwest::Response {
    let mut body = body;
    body["lease_token"] = item["lease_token"].clone();
    app.worker_post(
        &format!("/items/{}/fail", item["item_id"].as_str().unwrap()),
        &body,
    )
    .await
}

async fn retry(app: &TestApp, key: &str, batch: &str, body: Option<Value>) -> reqwest::Response {
    let r = app
        .client
        .post(format!(
            "{}/api/enterprise/video-batch/{batch}/retry-failed",
            app.base
        ))
        .header("x-api-key", key);
    match body {
        Some(b) => r.json(&b),
        None => r,
    }
    .send()
    .await
    .unwrap()
}

/// Each code a worker reports (and `worker_lost` from a lease that ran out, `internal` from a
/// report in the older shape) reaches the item view, the batch's counts per code, the error
/// and results exports, and the `item.failed` webhook; a report that says nothing is refused.
async fn failure_codes_reach_items_exports_counts_and_webhooks(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .settings(|s| s.worker.max_attempts = 1)
        .key(
            "acme",
            &format!(
                "initial_credits = 1000\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\
                 webhook_events = [\"item.failed\"]",
                receiver.url()
            ),
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("codes"), 8))
        .await;
    assert_eq!(r.status(), 201);
    let batch = id(&r.json().await.unwrap());
    let mut items = app.claim("w", 8).await;
    assert_eq!(items.len(), 8);
    items.sort_by_key(|i| i["prompt"].as_str().unwrap().to_string());

    // Neither a code nor a message: refused, and the item is still running.
    let r = fail_with(&app, &items[0], json!({})).await;
    assert_eq!(r.status(), 422);
    let r = fail_with(&app, &items[0], json!({"message": "a", "error": "b"})).await;
    assert_eq!(r.status(), 422);
    let r = fail_with(&app, &items[0], json!({"error_code": "expired"})).await;
    assert_eq!(r.status(), 422, "only the service gives `expired`");

    let reports = [
        ("content_policy", Some("refused by the policy")),
        ("invalid_params", None),
        ("model_error", Some("the model diverged")),
        ("render_timeout", Some("took 600 s")),
        ("internal", Some("disk full on the worker")),
    ];
    for (i, (code, message)) in reports.iter().enumerate() {
        let mut body = json!({ "error_code": code });
        if let Some(m) = message {
            body["message"] = json!(m);
        }
        let r = fail_with(&app, &items[i], body).await;
        assert_eq!(r.status(), 200, "{code}");
        let v: Value = r.json().await.unwrap();
        // One attempt allowed: even the retryable codes end failed.
        assert_eq!(v["status"], "failed", "{code}: {v}");
    }
    // The older shape: free text and an explicit `retryable`.
    assert_eq!(app.fail(&items[5], false).await.status(), 200);
    // A worker that went silent: the reaper fails the item as `worker_lost`.
    app.expire_lease(items[6]["item_id"].as_str().unwrap())
        .await;
    assert_eq!(app.complete(&items[7]).await.status(), 200);
    let b = app
        .wait_batch(&key, &batch, |b| b["status"] == "completed")
        .await;

    let expected_codes = [
        "content_policy",
        "invalid_params",
        "model_error",
        "render_timeout",
        "internal",
        "internal",
        "worker_lost",
    ];
    assert_eq!(b["counts"]["failed"], 7, "{b}");
    assert_eq!(b["counts"]["succeeded"], 1, "{b}");
    assert_eq!(
        b["error_counts"],
        json!({"content_policy": 1, "invalid_params": 1, "model_error": 1,
               "render_timeout": 1, "internal": 2, "worker_lost": 1}),
        "{b}"
    );
    let by_id = |v: &Value, item: &Value| -> Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["item_id"] == item["item_id"])
            .cloned()
            .expect("item listed")
    };
    for (i, code) in expected_codes.iter().enumerate() {
        let view = by_id(&b["items"], &items[i]);
        assert_eq!(view["status"], "failed", "{view}");
        assert_eq!(view["error_code"], *code, "{view}");
        assert!(view["message"].is_string(), "{view}");
        assert_eq!(view["message"], view["error"], "{view}");
    }
    assert_eq!(
        by_id(&b["items"], &items[0])["message"],
        "refused by the policy"
    );
    // Without a message the code stands for it.
    assert_eq!(by_id(&b["items"], &items[1])["message"], "invalid_params");
    assert_eq!(by_id(&b["items"], &items[5])["message"], "renderer crashed");
    assert_eq!(by_id(&b["items"], &items[6])["message"], "lease expired");
    let done = by_id(&b["items"], &items[7]);
    assert!(
        done["error_code"].is_null() && done["message"].is_null(),
        "{done}"
    );

    // The error export: the seven failures in request order, with prompts to act on.
    let (status, text) = app
        .customer_get(&key, &format!("/video-batch/{batch}/errors"))
        .await;
    assert_eq!(status, 200);
    let errors = lines(&text);
    assert_eq!(errors.len(), 7, "{text}");
    let indexes: Vec<i64> = errors
        .iter()
        .map(|e| e["index"].as_i64().unwrap())
        .collect();
    let mut sorted = indexes.clone();
    sorted.sort();
    assert_eq!(indexes, sorted, "request order");
    for e in &errors {
        let item = items.iter().find(|i| i["item_id"] == e["item_id"]).unwrap();
        let view = by_id(&b["items"], item);
        assert_eq!(e["error_code"], view["error_code"], "{e}");
        assert_eq!(e["message"], view["message"], "{e}");
        assert_eq!(e["prompt"], item["prompt"], "{e}");
        assert_eq!(e["attempts"], 1, "{e}");
        assert_eq!(e["status"], "failed", "{e}");
    }
    // The results export carries the codes too.
    let (status, text) = app
        .customer_get(&key, &format!("/video-batch/{batch}/results"))
        .await;
    assert_eq!(status, 200);
    let results = lines(&text);
    assert_eq!(results.len(), 8);
    let mut codes: Vec<String> = results
        .iter()
        .filter_map(|r| r["error_code"].as_str().map(str::to_string))
        .collect();
    codes.sort();
    let mut want: Vec<String> = expected_codes.iter().map(|c| c.to_string()).collect();
    want.sort();
    assert_eq!(codes, want);

    // Each failure's webhook carries its code.
    let got = receiver.wait_for(7, Duration::from_secs(20)).await;
    let mut hooked: Vec<String> = got
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["type"], "item.failed");
            body["data"]["item"]["error_code"]
                .as_str()
                .expect("error_code in the event")
                .to_string()
        })
        .collect();
    hooked.sort();
    assert_eq!(hooked, want);
    app.assert_ledger_invariant().await;
}

/// retry-failed makes a batch of exactly the failed items (prompts, params, original indexes),
/// holds their credits once, answers a repeat as a replay, and refuses an unfinished batch
/// (409), a batch with nothing failed (422), another key (404) and a wallet that cannot hold
/// it (402, nothing written).
async fn retry_failed_makes_a_batch_of_exactly_the_failed_items(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100\ncost_per_video = 10")
        .key("other", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let body = json!({
        "request_id": "orig",
        "metadata": {"campaign": "autumn"},
        "items": (0..5).map(|i| json!({"prompt": format!("prompt {i}"), "params": {"n": i}})).collect::<Vec<_>>(),
    });
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201);
    let batch = id(&r.json().await.unwrap());
    let mut items = app.claim("w", 5).await;
    items.sort_by_key(|i| i["prompt"].as_str().unwrap().to_string());
    // Unfinished: 409, nothing created.
    let r = retry(&app, &key, &batch, None).await;
    assert_eq!(r.status(), 409);
    let v = r.json::<Value>().await.unwrap();
    assert_eq!(
        (v["error"].as_str(), v["details"]["reason"].as_str()),
        (Some("CONFLICT"), Some("batch_not_finished")),
        "{v}"
    );
    for (i, item) in items.iter().enumerate() {
        let s = match i {
            1 => fail_with(&app, item, json!({"error_code": "content_policy"})).await,
            3 => {
                fail_with(
                    &app,
                    item,
                    json!({"error_code": "model_error", "message": "m"}),
                )
                .await
            }
            _ => app.complete(item).await,
        };
        assert_eq!(s.status(), 200);
    }
    app.wait_batch(&key, &batch, |b| b["status"] == "completed")
        .await;
    // Another key does not see the batch.
    let r = retry(&app, app.key("other"), &batch, None).await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.wallet(&key).await.held, 0);

    let r = retry(&app, &key, &batch, None).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let retry_id = id(&created);
    assert_eq!(created["total_count"], 2);
    assert_eq!(created["required_credits"], 20);
    // A repeat is the same retry, not a second one.
    let r = retry(&app, &key, &batch, Some(json!({}))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(id(&r.json().await.unwrap()), retry_id);
    let w = app.wallet(&key).await;
    assert_eq!(
        (w.balance, w.held),
        (70, 20),
        "3 charged, the retry held once"
    );

    let new: Value = app.get_batch(&key, &retry_id).await.json().await.unwrap();
    assert_eq!(new["retry_of"], batch.as_str());
    assert_eq!(new["metadata"], json!({"campaign": "autumn"}));
    let got: Vec<(Value, Value, Value, Value)> = new["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["index"].clone(),
                i["original_index"].clone(),
                i["prompt"].clone(),
                i["params"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (json!(0), json!(1), json!("prompt 1"), json!({"n": 1})),
            (json!(1), json!(3), json!("prompt 3"), json!({"n": 3})),
        ]
    );
    let old: Value = app.get_batch(&key, &batch).await.json().await.unwrap();
    assert_eq!(old["retried_by"], retry_id.as_str());
    assert!(old["retry_of"].is_null());

    // The retry's items run like any others; a batch where nothing failed has nothing to retry.
    let again = app.claim("w", 5).await;
    assert_eq!(again.len(), 2);
    for item in &again {
        assert_eq!(app.complete(item).await.status(), 200);
    }
    app.wait_batch(&key, &retry_id, |b| b["status"] == "completed")
        .await;
    let r = retry(&app, &key, &retry_id, None).await;
    assert_eq!(r.status(), 422);
    let v = r.json::<Value>().await.unwrap();
    assert_eq!(
        (v["error"].as_str(), v["details"]["reason"].as_str()),
        (Some("VALIDATION_ERROR"), Some("nothing_to_retry")),
        "{v}"
    );

    // A wallet that cannot hold the retry: 402 and nothing written.
    let r = app
        .create_batch(
            &key,
            &json!({"request_id": "p2", "items": [{"prompt": "x"}, {"prompt": "y"}]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let second = id(&r.json().await.unwrap());
    let two = app.claim("w", 2).await;
    for item in &two {
        let r = fail_with(&app, item, json!({"error_code": "invalid_params"})).await;
        assert_eq!(r.status(), 200);
    }
    app.wait_batch(&key, &second, |b| b["status"] == "completed")
        .await;
    let filler = (0..5)
        .map(|i| json!({"prompt": format!("f{i}")}))
        .collect::<Vec<_>>();
    let r = app
        .create_batch(&key, &json!({"request_id": "filler", "items": filler}))
        .await;
    assert_eq!(r.status(), 201, "50 of the 50 available held");
    let batches_before = app.scalar("SELECT COUNT(*) AS v FROM batch_job").await;
    let r = retry(&app, &key, &second, Some(json!({"request_id": "r-poor"}))).await;
    assert_eq!(r.status(), 402);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "INSUFFICIENT_CREDITS"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM batch_job").await,
        batches_before
    );
    let old: Value = app.get_batch(&key, &second).await.json().await.unwrap();
    assert!(old["retried_by"].is_null(), "{old}");
    app.assert_ledger_invariant().await;
}

/// Items whose completion window ended are retried only with `include_expired`, under an
/// idempotency key of their own.
async fn retry_failed_includes_expired_items_on_request(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let mut body = TestApp::batch_body(Some("late"), 3);
    body["completion_window"] = json!("2s");
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201);
    let batch = id(&r.json().await.unwrap());
    let running = app.claim("w", 1).await;
    assert_eq!(running.len(), 1);
    let r = fail_with(&app, &running[0], json!({"error_code": "content_policy"})).await;
    assert_eq!(r.status(), 200);
    let b = app
        .wait_batch(&key, &batch, |b| b["status"] == "expired")
        .await;
    assert_eq!(
        b["error_counts"],
        json!({"content_policy": 1, "expired": 2}),
        "{b}"
    );
    let (_, text) = app
        .customer_get(&key, &format!("/video-batch/{batch}/errors"))
        .await;
    let errors = lines(&text);
    let mut codes: Vec<&str> = errors
        .iter()
        .map(|e| e["error_code"].as_str().unwrap())
        .collect();
    codes.sort();
    assert_eq!(codes, ["content_policy", "expired", "expired"], "{text}");

    let r = retry(&app, &key, &batch, None).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["total_count"], 1);
    let r = retry(&app, &key, &batch, Some(json!({"include_expired": true}))).await;
    assert_eq!(r.status(), 201, "another request: expired included");
    let all: Value = r.json().await.unwrap();
    assert_eq!(all["total_count"], 3);
    let old: Value = app.get_batch(&key, &batch).await.json().await.unwrap();
    assert_eq!(old["retried_by"], all["batch_id"], "the latest retry");
    app.assert_ledger_invariant().await;
}
