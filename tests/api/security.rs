//! Security checks: credentials never cross APIs, hostile JSON is refused without harm, odd
//! but valid text round-trips intact, and plaintext keys never reach the database.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, WORKER_SECRET};

both_backends!(
    credentials_never_cross_apis,
    hostile_json_is_refused_and_odd_text_round_trips
);

async fn credentials_never_cross_apis(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    for secret in [ADMIN_TOKEN, WORKER_SECRET] {
        let r = app.credits(secret).await;
        assert_eq!(r["error"], "UNAUTHORIZED", "{secret} is not a customer key");
    }
    let key = app.key("acme").to_string();
    let r = app
        .client
        .post(format!("{}/api/internal/worker/claim", app.base))
        .bearer_auth(&key)
        .json(&json!({"worker_id": "w", "max_items": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(format!("{}/api/internal/worker/claim", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"worker_id": "w", "max_items": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(format!("{}/api/admin/keys", app.base))
        .bearer_auth(WORKER_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The key is stored only as its hash.
    let sql =
        format!("SELECT COUNT(*) AS v FROM api_key WHERE key_sha256 = '{key}' OR name = '{key}'");
    assert_eq!(app.scalar(&sql).await, 0);
}

async fn hostile_json_is_refused_and_odd_text_round_trips(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000\nrate_limit_per_min = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let post_raw = |body: String| {
        app.client
            .post(format!("{}/api/enterprise/video-batch", app.base))
            .header("x-api-key", &key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Very deep nesting anywhere in the body: a clear 400, and the server lives on.
    let deep = format!(
        "{{\"items\":[{{\"prompt\":\"p\",\"params\":{{\"a\":{}1{}}}}}]}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let r = post_raw(deep).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "VALIDATION_ERROR"
    );
    // Nested deeper than the params limit but parseable: 422 naming the field.
    let mut nested = json!(1);
    for _ in 0..12 {
        nested = json!({ "n": nested });
    }
    let r = app
        .create_batch(&key, &json!({"items": [{"prompt": "p", "params": nested}]}))
        .await;
    assert_eq!(r.status(), 422);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("items[0].params")
    );
    // Request ids with control characters or quotes are refused clearly.
    for bad in ["a\nb", "a\"b", "a b", "ünï"] {
        let r = app
            .create_batch(
                &key,
                &json!({"request_id": bad, "items": [{"prompt": "p"}]}),
            )
            .await;
        assert_eq!(r.status(), 400, "{bad:?}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "VALIDATION_ERROR"
        );
    }
    // NUL is refused; quotes, control characters and long Unicode round-trip intact.
    let r = app
        .create_batch(&key, &json!({"items": [{"prompt": "a\u{0}b"}]}))
        .await;
    assert_eq!(r.status(), 422);
    let odd = format!(
        "\"quoted\" \\ back\tslash\nline 🎬 {} ʕ•ᴥ•ʔ",
        "漢".repeat(3900)
    );
    let r = app.create_batch(&key, &json!({"request_id": "odd.text:1", "items": [{"prompt": odd, "params": {"q": "'\"<>&"}}]})).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let v: Value = app.get_batch(&key, &id).await.json().await.unwrap();
    assert_eq!(v["items"][0]["prompt"].as_str().unwrap(), odd);
    assert_eq!(v["items"][0]["params"]["q"], "'\"<>&");
    assert_eq!(v["request_id"], "odd.text:1");
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
}
