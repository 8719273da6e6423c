//! The admin API: credits with idempotency, keys, reload.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp};

both_backends!(
    grant_is_idempotent_and_adjust_never_goes_below_held,
    reload_applies_new_policy_or_keeps_the_old,
    huge_grants_are_refused_not_overflowed,
);

async fn grant_is_idempotent_and_adjust_never_goes_below_held(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    for _ in 0..2 {
        let r = app
            .admin_post(
                "/keys/acme/credits/grant",
                &json!({"amount": 50, "note": "invoice 7"}),
                Some("inv-7"),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let key = app.key("acme").to_string();
    assert_eq!(app.wallet(&key).await.balance, 150, "granted once");
    app.create_batch(&key, &TestApp::batch_body(Some("x"), 10))
        .await;
    let r = app
        .admin_post("/keys/acme/credits/adjust", &json!({"amount": -60}), None)
        .await;
    assert_eq!(r.status(), 409, "150 - 60 < 100 held");
    let r = app
        .admin_post("/keys/acme/credits/adjust", &json!({"amount": -50}), None)
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["balance"], 100);
    assert_eq!(v["held"], 100);
    app.assert_ledger_invariant().await;
    // Customer keys and the worker secret are refused by the admin API.
    for token in [key.as_str(), crate::helpers::WORKER_SECRET] {
        let r = app
            .client
            .get(format!("{}/api/admin/keys", app.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = app
        .client
        .get(format!("{}/api/admin/keys", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("acme") && !text.contains(&key));
}

async fn reload_applies_new_policy_or_keeps_the_old(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 1000\ncost_per_video = 10\nrate_limit_per_min = 100",
        )
        .key("gone", "initial_credits = 5")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let gone = app.key("gone").to_string();
    app.freeze_clock();
    let first: Value = app
        .create_batch(&key, &TestApp::batch_body(Some("before"), 1))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["cost_per_video"], 10);

    app.write_config(
        &[("acme".into(), "cost_per_video = 7\nmax_batch_items = 2\nrate_limit_per_min = 3\nip_allowlist = [\"127.0.0.1\"]".into())],
        "",
    );
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v: Value = app
        .create_batch(&key, &TestApp::batch_body(Some("after"), 1))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["cost_per_video"], 7, "new cost for new batches");
    let old: Value = app
        .get_batch(&key, first["batch_id"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        old["cost_per_video"], 10,
        "existing batches keep their cost"
    );
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("cap"), 3))
        .await;
    assert_eq!(r.status(), 422, "new cap");
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("rl"), 1))
        .await;
    assert_eq!(r.status(), 429, "new rate limit (3 per minute)");
    assert_eq!(
        app.credits(&gone).await["error"],
        "UNAUTHORIZED",
        "removed key refused"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key WHERE name = 'gone'")
            .await,
        1,
        "history stays"
    );

    // A broken file is rejected and the running policy stays: its valid line (a new cost)
    // is not applied either.
    let keys = || async {
        app.client
            .get(format!("{}/api/admin/keys", app.base))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let before = keys().await;
    assert!(
        !before.to_string().contains("\"cost_per_video\":99"),
        "{before}"
    );
    std::fs::write(
        app.config_dir.path().join("test.toml"),
        "[defaults]\nrate_limit_per_min = 0\ncost_per_video = 99\n",
    )
    .unwrap();
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 422);
    assert_eq!(keys().await, before, "the running policy is unchanged");
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("test.toml"), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("defaults.rate_limit_per_min"),
        "{v}"
    );
    let v: Value = app
        .create_batch(&key, &TestApp::batch_body(Some("still"), 5))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["error"], "RATE_LIMIT_EXCEEDED",
        "old (reloaded) policy still serving"
    );
}

async fn huge_grants_are_refused_not_overflowed(backend: Backend) {
    let start = api::service::credits::MAX_BALANCE - 2_000_000_000_000;
    let app = TestApp::builder(backend)
        .key("acme", &format!("initial_credits = {start}"))
        .build()
        .await;
    let r = app
        .admin_post(
            "/keys/acme/credits/grant",
            &json!({"amount": i64::MAX}),
            None,
        )
        .await;
    assert_eq!(r.status(), 400, "above the per-call cap");
    for _ in 0..3 {
        let r = app
            .admin_post(
                "/keys/acme/credits/grant",
                &json!({"amount": 1_000_000_000_000i64}),
                None,
            )
            .await;
        if r.status() == 409 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"], "CONFLICT");
            let c = app.wallet(app.key("acme")).await;
            assert!(c.balance <= api::service::credits::MAX_BALANCE);
            app.assert_ledger_invariant().await;
            return;
        }
        assert_eq!(r.status(), 200);
    }
    panic!("the maximum balance was never reached");
}
