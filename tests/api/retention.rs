//! Months of uptime: old audit and webhook rows are pruned while newer ones stay, and a key
//! revoked by one node's reload is refused by every node within seconds.
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use sea_orm::{ActiveModelTrait, ActiveValue::Set};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    retention_prunes_rows_older_than_the_configured_age,
    a_key_removed_on_one_node_is_refused_by_the_other_within_5_seconds,
);

async fn delivery(app: &TestApp, key_id: i64, status: &str, age_days: i64) {
    let at = Utc::now() - TimeDelta::days(age_days);
    // A pending one waits for a retry due tomorrow: the test's own dispatcher (which looks
    // for due deliveries every 100 ms) leaves it alone.
    let due = if status == "pending" {
        Utc::now() + TimeDelta::days(1)
    } else {
        at
    };
    entity::webhook_delivery::ActiveModel {
        attempt_count: Set(1),
        last_status_code: Set(Some(200)),
        ..crate::helpers::delivery_row(key_id, "https://hooks.example/x", status, due, at)
    }
    .insert(&app.state().writer)
    .await
    .expect("insert delivery");
}

async fn retention_prunes_rows_older_than_the_configured_age(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    for _ in 0..6 {
        assert_eq!(app.credits_status(&key).await, 200);
    }
    // Age four of the six audit rows past 90 days.
    let old = (Utc::now() - TimeDelta::days(91)).to_rfc3339();
    let backend = app.db().get_database_backend();
    let ids: Vec<i64> = {
        use sea_orm::{ConnectionTrait, Statement};
        let rows = app
            .db()
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT id FROM usage_event ORDER BY id LIMIT 4".to_string(),
            ))
            .await
            .unwrap();
        rows.iter().map(|r| r.try_get("", "id").unwrap()).collect()
    };
    {
        use sea_orm::{ConnectionTrait, Statement};
        for id in &ids {
            let sql = match backend {
                sea_orm::DbBackend::Postgres => format!(
                    "UPDATE usage_event SET created_at = '{old}'::timestamptz WHERE id = {id}"
                ),
                _ => format!("UPDATE usage_event SET created_at = '{old}' WHERE id = {id}"),
            };
            app.db()
                .execute_raw(Statement::from_string(backend, sql))
                .await
                .unwrap();
        }
    }
    let key_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'acme'")
        .await;
    delivery(&app, key_id, "succeeded", 40).await;
    delivery(&app, key_id, "failed", 31).await;
    delivery(&app, key_id, "succeeded", 5).await;
    delivery(&app, key_id, "pending", 60).await;
    // Endpoints: one idle for 40 days (pruned); one idle as long but disabled (it holds
    // deliveries until enabled), one idle as long with a pending delivery, one used yesterday.
    let writer = &app.state().writer;
    let days_ago = |d: i64| Utc::now() - TimeDelta::days(d);
    let day = chrono::Duration::days(1);
    let kid = api::domain::ids::AccountId(key_id);
    use api::store::webhooks::note_endpoint;
    for (url, success, age) in [
        ("https://idle.example/in", true, 40),
        ("https://recent.example/in", true, 1),
        ("https://hooks.example/x", true, 40),
        ("https://down.example/in", false, 60),
    ] {
        note_endpoint(writer, kid, url, success, days_ago(age), day)
            .await
            .unwrap();
    }
    assert!(
        note_endpoint(
            writer,
            kid,
            "https://down.example/in",
            false,
            days_ago(40),
            day
        )
        .await
        .unwrap(),
        "failing for 20 days disables it"
    );
    let retention = app.state().runtime().settings.retention;
    assert_eq!((retention.usage_days, retention.webhook_days), (90, 30));
    let pruned = api::service::retention::prune(&app.state().writer, &retention, Utc::now())
        .await
        .unwrap();
    assert_eq!(pruned.usage, 4);
    assert_eq!(pruned.webhook_deliveries, 2);
    assert_eq!(pruned.webhook_endpoints, 1);
    let urls: Vec<String> = api::store::webhooks::endpoints(writer, kid)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.url)
        .collect();
    assert_eq!(
        urls,
        [
            "https://down.example/in",
            "https://hooks.example/x",
            "https://recent.example/in"
        ],
        "a disabled endpoint, one with a pending delivery and a recent one stay"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM usage_event").await,
        2,
        "newer audit rows stay"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM webhook_delivery WHERE status = 'pending'")
            .await,
        1,
        "a pending delivery is never pruned, however old"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM webhook_delivery")
            .await,
        2
    );
    let again = api::service::retention::prune(&app.state().writer, &retention, Utc::now())
        .await
        .unwrap();
    assert_eq!(again, Default::default(), "a second pass finds nothing");

    // 0 keeps forever: with every row far past any age, a pass with 0 days deletes nothing.
    {
        use sea_orm::{ConnectionTrait, Statement};
        let ancient = (Utc::now() - TimeDelta::days(4000)).to_rfc3339();
        let sql = match backend {
            sea_orm::DbBackend::Postgres => {
                format!("UPDATE usage_event SET created_at = '{ancient}'::timestamptz")
            }
            _ => format!("UPDATE usage_event SET created_at = '{ancient}'"),
        };
        app.db()
            .execute_raw(Statement::from_string(backend, sql))
            .await
            .unwrap();
    }
    delivery(&app, key_id, "succeeded", 4000).await;
    let usage_rows = app.scalar("SELECT COUNT(*) AS v FROM usage_event").await;
    let deliveries = app
        .scalar("SELECT COUNT(*) AS v FROM webhook_delivery")
        .await;
    assert!(usage_rows >= 2 && deliveries == 3);
    let mut forever = retention;
    forever.usage_days = 0;
    forever.webhook_days = 0;
    let none = api::service::retention::prune(&app.state().writer, &forever, Utc::now())
        .await
        .unwrap();
    assert_eq!(none, Default::default(), "0 keeps forever");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM usage_event").await,
        usage_rows
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM webhook_delivery")
            .await,
        deliveries
    );
    // The same rows under the default ages are gone.
    let pruned = api::service::retention::prune(&app.state().writer, &retention, Utc::now())
        .await
        .unwrap();
    assert_eq!(pruned.webhook_deliveries, 1);
    assert!(pruned.usage >= 2);
}

async fn a_key_removed_on_one_node_is_refused_by_the_other_within_5_seconds(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("leaky", "initial_credits = 10")
        .key("other", "initial_credits = 10")
        .build()
        .await;
    let peer = app.peer().await;
    let leaky = app.key("leaky").to_string();
    assert_eq!(peer.credits_status(&leaky).await, 200);
    // The leaked key leaves the configuration; only the first node is reloaded.
    app.write_config(&[("other".into(), "initial_credits = 10".into())], "");
    let r = app
        .admin_post("/config/reload", &serde_json::json!({}), None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.credits_status(&leaky).await, 401);
    let started = Instant::now();
    loop {
        if peer.credits_status(&leaky).await == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the other node still accepts the removed key after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        peer.credits_status(app.key("other")).await,
        200,
        "other keys are untouched"
    );
}
