//! The lease reaper works with no claims at all: cancel wins over expiry (never re-leased,
//! never charged) and an exhausted last attempt is failed and released.
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    an_expired_lease_of_a_cancelled_batch_is_cancelled_never_billed,
    an_exhausted_lease_is_reaped_without_any_claim,
    a_row_the_reaper_cannot_settle_fails_neither_claims_nor_other_rows,
);

async fn claim_with_lease(app: &TestApp, max: u32, lease: u32) -> Vec<Value> {
    let r = app
        .worker_post(
            "/claim",
            &json!({ "worker_id": "w1", "max_items": max, "lease_seconds": lease }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["items"].as_array().cloned().unwrap_or_default()
}

async fn batch(app: &TestApp, key: &str, id: &str) -> Value {
    app.get_batch(key, id).await.json().await.unwrap()
}

/// Waits until the batch reaches `status`, failing after `limit`.
async fn wait_for_status(
    app: &TestApp,
    key: &str,
    id: &str,
    status: &str,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let b = batch(app, key, id).await;
        if b["status"] == status {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "batch still {} after {limit:?}, expected {status}: {b}",
            b["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn an_expired_lease_of_a_cancelled_batch_is_cancelled_never_billed(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let created: Value = app
        .create_batch(&key, &TestApp::batch_body(Some("cancel-expire"), 2))
        .await
        .json()
        .await
        .unwrap();
    let id = created["batch_id"].as_str().unwrap().to_string();
    let claimed = claim_with_lease(&app, 1, 30).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(app.cancel_batch(&key, &id).await.status(), 200);
    let b = batch(&app, &key, &id).await;
    assert_eq!(
        b["counts"]["running"], 1,
        "the leased item waits for its worker: {b}"
    );
    // The lease ends after the cancel; no claim from here on: the reaper alone settles it.
    app.expire_lease(claimed[0]["item_id"].as_str().unwrap())
        .await;
    let b = wait_for_status(&app, &key, &id, "cancelled", Duration::from_secs(8)).await;
    assert_eq!(b["counts"]["cancelled"], 2, "{b}");
    assert_eq!(b["counts"]["succeeded"], 0);
    assert!(
        claim_with_lease(&app, 10, 30).await.is_empty(),
        "never leased again"
    );
    let late = app.complete(&claimed[0]).await;
    assert_eq!(late.status(), 409, "the old lease cannot be completed");
    let credits = app.wallet(&key).await;
    assert_eq!(credits.held, 0);
    assert_eq!(credits.balance, 100, "nothing charged");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'charge'")
            .await,
        0
    );
    app.assert_ledger_invariant().await;
}

async fn an_exhausted_lease_is_reaped_without_any_claim(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.worker.max_attempts = 1)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let created: Value = app
        .create_batch(&key, &TestApp::batch_body(Some("exhaust"), 1))
        .await
        .json()
        .await
        .unwrap();
    let id = created["batch_id"].as_str().unwrap().to_string();
    let claimed = claim_with_lease(&app, 1, 30).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(app.wallet(&key).await.held, 10);
    app.expire_lease(claimed[0]["item_id"].as_str().unwrap())
        .await;
    let b = wait_for_status(&app, &key, &id, "completed", Duration::from_secs(8)).await;
    assert_eq!(b["counts"]["failed"], 1, "{b}");
    let credits = app.wallet(&key).await;
    assert_eq!(credits.held, 0, "the hold is released");
    assert_eq!(credits.balance, 100);
    app.assert_ledger_invariant().await;
}

/// A row the reaper cannot settle (here: its key's wallet no longer holds the item's credits,
/// so the release is refused) is logged and skipped: other expired leases are still reaped and
/// claims keep answering.
async fn a_row_the_reaper_cannot_settle_fails_neither_claims_nor_other_rows(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.worker.max_attempts = 1)
        .key("poisoned", "initial_credits = 100")
        .key("healthy", "initial_credits = 100")
        .build()
        .await;
    let (poisoned, healthy) = (
        app.key("poisoned").to_string(),
        app.key("healthy").to_string(),
    );
    let p: Value = app
        .create_batch(&poisoned, &TestApp::batch_body(Some("p"), 1))
        .await
        .json()
        .await
        .unwrap();
    let h: Value = app
        .create_batch(&healthy, &TestApp::batch_body(Some("h"), 1))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(claim_with_lease(&app, 2, 1).await.len(), 2);
    // Break the poisoned key's wallet: its hold is gone, so releasing the item must fail.
    let key_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'poisoned'")
        .await;
    {
        use sea_orm::ConnectionTrait;
        let db = app.db();
        db.execute_unprepared(&format!(
            "UPDATE credit_wallet SET held = 0 WHERE api_key_id = {key_id}"
        ))
        .await
        .unwrap();
    }
    let h_id = h["batch_id"].as_str().unwrap();
    wait_for_status(&app, &healthy, h_id, "completed", Duration::from_secs(8)).await;
    // Claims keep answering while the poisoned row stays behind.
    for _ in 0..3 {
        let r = app
            .worker_post("/claim", &json!({ "worker_id": "w2", "max_items": 5 }))
            .await;
        assert_eq!(r.status(), 200);
    }
    let still: Value = batch(&app, &poisoned, p["batch_id"].as_str().unwrap()).await;
    assert_eq!(
        still["counts"]["running"], 1,
        "the poisoned row is skipped, not half-done: {still}"
    );
    assert_eq!(app.wallet(&healthy).await.held, 0);
}
