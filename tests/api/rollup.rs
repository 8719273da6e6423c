//! Usage reports read the daily rollup: they answer what the raw audit and ledger rows say,
//! and keep answering it after retention pruned the raw rows.
use chrono::{DateTime, NaiveTime, TimeDelta, Utc};
use serde_json::Value;

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(usage_from_the_rollup_equals_the_raw_rows_and_outlives_their_pruning);

/// A mix of outcomes in one frozen minute: created (201), replayed (200), too large (422),
/// unknown batch (404), rate-limited (429), reads (200).
async fn calls_of_a_day(app: &TestApp, key: &str, at: DateTime<Utc>, tag: &str) {
    app.freeze_clock_at(at);
    let too_large = TestApp::batch_body(None, 101);
    assert_eq!(app.create_batch(key, &too_large).await.status(), 422);
    let body = TestApp::batch_body(Some(&format!("{tag}-1")), 3);
    assert_eq!(app.create_batch(key, &body).await.status(), 201);
    assert_eq!(app.create_batch(key, &body).await.status(), 200);
    assert_eq!(app.create_batch(key, &body).await.status(), 429);
    assert_eq!(app.credits_status(key).await, 200);
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(app.get_batch(key, &unknown).await.status(), 404);
}

async fn usage(app: &TestApp, key: &str, from: &str, to: &str) -> Value {
    let r = app
        .client
        .get(format!(
            "{}/api/enterprise/usage?from={from}&to={to}",
            app.base
        ))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["days"].clone()
}

async fn usage_from_the_rollup_equals_the_raw_rows_and_outlives_their_pruning(backend: Backend) {
    // The background retention keeps everything: it would otherwise prune the old day's first
    // rows while the test still writes that day. The test prunes by itself below.
    let app = TestApp::builder(backend)
        .settings(|s| s.retention.usage_days = 0)
        .key("acme", "initial_credits = 1000\nrate_limit_per_min = 3")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let key_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'acme'")
        .await;
    let now = Utc::now();
    let noon = |days_ago: i64| {
        (now - TimeDelta::days(days_ago))
            .date_naive()
            .and_time(NaiveTime::from_hms_opt(12, 0, 0).unwrap())
            .and_utc()
    };
    // One day past the raw rows' retention (90 days), one recent day.
    calls_of_a_day(&app, &key, noon(100), "old").await;
    calls_of_a_day(&app, &key, noon(1), "recent").await;
    app.state().clock.unfreeze();
    // Charges land today (a success is charged when it is reported).
    let items = app.claim("w", 2).await;
    assert_eq!(items.len(), 2);
    assert_eq!(app.complete(&items[0]).await.status(), 200);
    assert_eq!(app.fail(&items[1], false).await.status(), 200);

    let from = noon(120).date_naive().and_time(NaiveTime::MIN).and_utc();
    let to = now.date_naive().and_time(NaiveTime::MIN).and_utc() + TimeDelta::days(1);
    let db = app.fresh_db().await;
    let raw =
        api::store::usage::daily_from_raw_rows(&db, api::domain::ids::AccountId(key_id), from, to)
            .await
            .unwrap();
    let rolled = api::store::usage::daily(&db, api::domain::ids::AccountId(key_id), from, to)
        .await
        .unwrap();
    assert_eq!(rolled, raw, "the rollup answers what the raw rows say");
    assert_eq!(
        rolled.len(),
        3,
        "two days of calls and a day of charges: {rolled:?}"
    );
    let old = &rolled[0];
    assert_eq!(
        (
            old.counts.calls,
            old.counts.calls_2xx,
            old.counts.calls_4xx,
            old.counts.rate_limited
        ),
        (6, 3, 3, 1)
    );
    assert_eq!((old.counts.batches, old.counts.items), (1, 3));
    assert_eq!(rolled[2].credits_charged, 10);
    let (first, last) = (noon(100).date_naive(), noon(1).date_naive());
    let served = usage(&app, &key, &first.to_string(), &last.to_string()).await;
    assert_eq!(served.as_array().unwrap().len(), 2, "{served}");

    // Retention prunes the old day's raw rows; reports still answer it from the rollup.
    let mut retention = app.state().runtime().settings.retention;
    retention.usage_days = 90;
    assert_eq!(
        retention.usage_rollup_days, 0,
        "the rollup is kept by default"
    );
    let pruned = api::service::retention::prune(&app.state().writer, &retention, Utc::now())
        .await
        .unwrap();
    assert_eq!(pruned.usage, 6, "the old day's raw rows are pruned");
    assert_eq!(pruned.usage_rollup, 0);
    let raw_after =
        api::store::usage::daily_from_raw_rows(&db, api::domain::ids::AccountId(key_id), from, to)
            .await
            .unwrap();
    assert_eq!(
        raw_after.len(),
        2,
        "the raw rows no longer know the old day"
    );
    let rolled_after = api::store::usage::daily(&db, api::domain::ids::AccountId(key_id), from, to)
        .await
        .unwrap();
    // (Today's row has grown by the usage call above.)
    assert_eq!(rolled_after[..2], rolled[..2], "the rollup still does");
    assert_eq!(
        usage(&app, &key, &first.to_string(), &last.to_string()).await,
        served,
        "the usage API answers as before the pruning"
    );

    // With its own retention set, old days of the rollup go too, recent ones stay.
    let old_rows = app
        .scalar(&format!(
            "SELECT COUNT(*) AS v FROM usage_rollup WHERE day = '{first}'"
        ))
        .await;
    assert_eq!(old_rows, 4, "one row per outcome: 2xx, and three 4xx codes");
    retention.usage_rollup_days = 30;
    let pruned = api::service::retention::prune(&app.state().writer, &retention, Utc::now())
        .await
        .unwrap();
    assert_eq!(pruned.usage_rollup, old_rows as u64);
    let kept = api::store::usage::daily(&db, api::domain::ids::AccountId(key_id), from, to)
        .await
        .unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(kept[0], rolled[1]);
    db.close().await.unwrap();
}
