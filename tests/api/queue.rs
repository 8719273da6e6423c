//! The queue's promises in the README: fair claiming (one key alone is served oldest batch
//! first, a new batch never goes before the head of the queue, requeued items keep their
//! position and go first) and completion windows (`0` = none, `24h` by default, an item
//! retried after the window is expired at the next pass, a running item that fails after the
//! window is released, cancel wins over the window).
use std::time::Duration;

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    one_key_alone_is_served_oldest_batch_first,
    a_new_batch_never_goes_before_the_head_of_the_queue,
    requeued_items_keep_their_position_and_go_first,
    a_window_of_zero_is_none_and_the_default_is_24h,
    after_the_window_a_retry_expires_and_a_failure_is_released,
    cancel_wins_over_the_window,
);

async fn create(app: &TestApp, key: &str, rid: &str, n: usize, window: Option<&str>) -> Value {
    let mut body = TestApp::batch_body(Some(rid), n);
    if let Some(w) = window {
        body["completion_window"] = json!(w);
    }
    let r = app.create_batch(key, &body).await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

fn id(v: &Value) -> String {
    v["batch_id"].as_str().unwrap().to_string()
}

/// The lowest fair-queue position of the queued items (the head of the queue).
async fn head(app: &TestApp) -> i64 {
    app.scalar("SELECT MIN(fair_pos) AS v FROM batch_item WHERE status = 'queued'")
        .await
}

async fn one_key_alone_is_served_oldest_batch_first(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let mut want = Vec::new();
    for b in 0..3 {
        let v = create(&app, &key, &format!("old-{b}"), 3, None).await;
        for i in 0..3 {
            want.push((id(&v), i));
        }
    }
    let mut got = Vec::new();
    for claim in [2, 1, 4, 2] {
        for item in app.claim("w", claim).await {
            got.push((
                item["batch_id"].as_str().unwrap().to_string(),
                item["item_id"].clone(),
            ));
        }
    }
    assert_eq!(got.len(), 9);
    let batches: Vec<&str> = got.iter().map(|(b, _)| b.as_str()).collect();
    let wanted: Vec<&str> = want.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(batches, wanted, "oldest batch first, each batch in one run");
    // And within a batch, in the batch's item order.
    for (b, _) in want.iter().step_by(3) {
        let v: Value = app.get_batch(&key, b).await.json().await.unwrap();
        let order: Vec<&Value> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["item_id"])
            .collect();
        let claimed: Vec<&Value> = got
            .iter()
            .filter(|(gb, _)| gb == b)
            .map(|(_, i)| i)
            .collect();
        assert_eq!(claimed, order, "batch {b} claimed in item order");
    }
}

/// A key with a backlog cannot delay another key's new batch, but the new batch does not jump
/// ahead of the head of the queue either: its position is at or after the head's.
async fn a_new_batch_never_goes_before_the_head_of_the_queue(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "big",
            "initial_credits = 1000000\nmax_batch_items = 1000\nrate_limit_per_min = 1000",
        )
        .key("small", "initial_credits = 1000")
        .build()
        .await;
    for b in 0..2 {
        create(&app, app.key("big"), &format!("backlog-{b}"), 500, None).await;
    }
    // Some of the backlog is served: the head has moved on.
    assert_eq!(app.claim("w", 7).await.len(), 7);
    let head_before = head(&app).await;
    let small = id(&create(&app, app.key("small"), "new", 2, None).await);
    let small_min = app
        .scalar(
            "SELECT MIN(fair_pos) AS v FROM batch_item WHERE api_key_id = \
             (SELECT account_id FROM api_key WHERE name = 'small')",
        )
        .await;
    assert!(
        small_min >= head_before,
        "the new batch ({small_min}) went before the head ({head_before})"
    );
    assert_eq!(head(&app).await, head_before.min(small_min));
    // ...and it is served within the next claims, interleaved with the backlog.
    let mut seen = 0;
    let mut claims = 0;
    while seen < 2 {
        claims += 1;
        assert!(claims <= 4, "the new batch waits behind the backlog");
        seen += app
            .claim("w", 1)
            .await
            .iter()
            .filter(|i| i["batch_id"] == small.as_str())
            .count();
    }
}

async fn requeued_items_keep_their_position_and_go_first(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.worker.max_attempts = 3)
        .key("acme", "initial_credits = 1000")
        .key("other", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    create(&app, &key, "first", 3, None).await;
    create(&app, app.key("other"), "second", 3, None).await;
    let claimed = app.claim("w", 3).await;
    assert_eq!(claimed.len(), 3);
    let pos = |item: &Value| {
        let app = &app;
        let id = item["item_id"].as_str().unwrap().to_string();
        async move {
            use sea_orm::EntityTrait;
            entity::batch_item::Entity::find_by_id(id.parse::<uuid::Uuid>().unwrap())
                .one(&app.db())
                .await
                .unwrap()
                .unwrap()
                .fair_pos
        }
    };
    let last = &claimed[2];
    let before = pos(last).await;
    let r = app.fail(last, true).await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "queued");
    assert_eq!(
        pos(last).await,
        before,
        "the requeued item keeps its position"
    );
    let next = app.claim("w", 1).await;
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0]["item_id"], last["item_id"],
        "the requeued item goes first"
    );
    assert_eq!(next[0]["attempt"], 2);
}

async fn a_window_of_zero_is_none_and_the_default_is_24h(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("plain", "initial_credits = 1000")
        .key(
            "forever",
            "initial_credits = 1000\ncompletion_window = \"0\"",
        )
        .build()
        .await;
    let v = create(&app, app.key("plain"), "default", 1, None).await;
    let at = |f: &str| chrono::DateTime::parse_from_rfc3339(v[f].as_str().unwrap()).unwrap();
    // (expires_at is stored to the microsecond, created_at is answered to the nanosecond.)
    let window = (at("expires_at") - at("created_at")).num_milliseconds();
    assert!(
        (86_399_999..=86_400_000).contains(&window),
        "the default window is 24h: {v}"
    );
    let v = create(&app, app.key("forever"), "none", 1, None).await;
    assert!(v["expires_at"].is_null(), "a window of 0 is none: {v}");
    let b: Value = app
        .get_batch(app.key("forever"), &id(&v))
        .await
        .json()
        .await
        .unwrap();
    assert!(b["expires_at"].is_null(), "{b}");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM batch_job WHERE expires_at IS NULL")
            .await,
        1
    );
}

/// Waits until the wall clock is past `expires_at` of `batch` (the window is the event).
async fn past_the_window(batch: &Value) {
    let end = chrono::DateTime::parse_from_rfc3339(batch["expires_at"].as_str().unwrap()).unwrap();
    while chrono::Utc::now() <= end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two items run when the window ends: one fails retryably (it is expired at the next pass,
/// never handed out again) and one fails for good (released); the batch ends `expired` with
/// nothing charged and nothing held.
async fn after_the_window_a_retry_expires_and_a_failure_is_released(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.worker.max_attempts = 3)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let v = create(&app, &key, "late", 2, Some("2s")).await;
    let batch = id(&v);
    let running = app.claim("w", 2).await;
    assert_eq!(running.len(), 2);
    past_the_window(&v).await;
    assert_eq!(app.fail(&running[0], true).await.status(), 200);
    assert_eq!(app.fail(&running[1], false).await.status(), 200);
    let b = app
        .wait_batch(&key, &batch, |b| b["status"] == "expired")
        .await;
    assert_eq!(b["counts"]["expired"], 1, "the retried item expired: {b}");
    assert_eq!(b["counts"]["failed"], 1, "{b}");
    assert!(
        app.claim("w", 10).await.is_empty(),
        "never handed out again"
    );
    let w = app.wallet(&key).await;
    assert_eq!((w.balance, w.held), (1000, 0), "released, nothing charged");
    app.assert_ledger_invariant().await;
}

/// A batch cancelled with an item still running ends `cancelled` even when its window ends
/// before that item reports.
async fn cancel_wins_over_the_window(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let v = create(&app, &key, "both", 3, Some("2s")).await;
    let batch = id(&v);
    let running = app.claim("w", 1).await;
    assert_eq!(running.len(), 1);
    assert_eq!(app.cancel_batch(&key, &batch).await.status(), 200);
    past_the_window(&v).await;
    assert_eq!(app.complete(&running[0]).await.status(), 200);
    let b = app
        .wait_batch(&key, &batch, |b| {
            b["status"] == "cancelled" || b["status"] == "expired"
        })
        .await;
    assert_eq!(b["status"], "cancelled", "{b}");
    assert_eq!(b["counts"]["cancelled"], 2, "{b}");
    assert_eq!(b["counts"]["expired"], 0, "{b}");
    assert_eq!(b["counts"]["succeeded"], 1, "{b}");
    let w = app.wallet(&key).await;
    assert_eq!((w.balance, w.held), (990, 0));
    app.assert_ledger_invariant().await;
}
