//! Key scopes: a call outside a key's scopes is 403 FORBIDDEN_SCOPE, audited, using no quota;
//! a key without `scopes` may do everything; a reload changes a key's scopes live.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp, count_window};

both_backends!(
    a_call_outside_the_key_scopes_is_refused_audited_and_uses_no_quota,
    a_reload_grants_a_scope_live
);

async fn get(app: &TestApp, key: &str, path: &str) -> reqwest::Response {
    app.client
        .get(format!("{}/api/enterprise{path}", app.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

async fn assert_forbidden(r: reqwest::Response, needed: &str, held: Value) {
    assert_eq!(r.status(), 403);
    assert!(
        r.headers().get("retry-after").is_none(),
        "a scope refusal is not a throttle"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], "FORBIDDEN_SCOPE", "{v}");
    assert_eq!(v["details"]["required_scope"], needed, "{v}");
    assert_eq!(v["details"]["key_scopes"], held, "{v}");
}

async fn a_call_outside_the_key_scopes_is_refused_audited_and_uses_no_quota(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "dashboard",
            "initial_credits = 100\nscopes = [\"batches:read\", \"usage:read\"]\n\
             rate_limit_per_min = 1\nread_rate_limit_per_min = 3",
        )
        .key("full", "initial_credits = 100")
        .build()
        .await;
    let dashboard = app.key("dashboard").to_string();
    let full = app.key("full").to_string();
    let held = json!(["batches:read", "usage:read"]);

    // Writes and reads outside the scopes: refused before any quota is counted.
    for i in 0..3 {
        let body = TestApp::batch_body(Some(&format!("dash-{i}")), 1);
        assert_forbidden(
            app.create_batch(&dashboard, &body).await,
            "batches:write",
            held.clone(),
        )
        .await;
        assert_forbidden(
            get(&app, &dashboard, "/credits").await,
            "credits:read",
            held.clone(),
        )
        .await;
    }
    assert_forbidden(
        get(&app, &dashboard, "/webhooks/deliveries").await,
        "webhooks:read",
        held.clone(),
    )
    .await;
    assert_eq!(count_window(&app, "batch").await, 0, "no batch quota used");
    assert_eq!(count_window(&app, "read").await, 0, "no read quota used");
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 0);

    // Its reads in scope work, and its read quota (3) is whole.
    for path in ["/video-batch", "/usage", "/video-batch?limit=1"] {
        assert_eq!(get(&app, &dashboard, path).await.status(), 200, "{path}");
    }
    assert_eq!(get(&app, &dashboard, "/video-batch").await.status(), 429);

    // A key without scopes may do everything.
    let r = app
        .create_batch(&full, &TestApp::batch_body(Some("full-1"), 1))
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(get(&app, &full, "/credits").await.status(), 200);
    assert_eq!(get(&app, &full, "/webhooks/endpoints").await.status(), 200);

    // Every refusal is audited against the key, one row each.
    let key_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'dashboard'")
        .await;
    assert_eq!(
        app.scalar(&format!(
            "SELECT COUNT(*) AS v FROM usage_event WHERE api_key_id = {key_id} \
             AND status = 403 AND error_code = 'FORBIDDEN_SCOPE'"
        ))
        .await,
        7
    );
    assert_eq!(
        app.scalar(&format!(
            "SELECT COUNT(*) AS v FROM usage_event WHERE api_key_id = {key_id} \
             AND status = 403 AND method = 'POST' AND path = '/api/enterprise/video-batch'"
        ))
        .await,
        3
    );
}

async fn a_reload_grants_a_scope_live(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("ci", "initial_credits = 100\nscopes = \"batches:read\"")
        .build()
        .await;
    let key = app.key("ci").to_string();
    let body = TestApp::batch_body(Some("ci-1"), 1);
    assert_forbidden(
        app.create_batch(&key, &body).await,
        "batches:write",
        json!(["batches:read"]),
    )
    .await;
    let keys = app.admin_get("/keys").await;
    assert_eq!(keys[0]["scopes"], json!(["batches:read"]), "{keys}");

    app.write_config(
        &[(
            "ci".into(),
            "initial_credits = 100\nscopes = [\"batches:read\", \"batches:write\"]".into(),
        )],
        "",
    );
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201, "the reloaded scopes are in effect");

    // An unknown scope is refused by the reload, which keeps the scopes in force.
    app.write_config(
        &[(
            "ci".into(),
            "initial_credits = 100\nscopes = [\"batches:delete\"]".into(),
        )],
        "",
    );
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("unknown scope"),
        "{v}"
    );
    let keys = app.admin_get("/keys").await;
    assert_eq!(
        keys[0]["scopes"],
        json!(["batches:write", "batches:read"]),
        "{keys}"
    );
}
