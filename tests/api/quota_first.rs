//! Every call is counted before its work: a read over its quota is refused before its handler
//! runs a single query.
use std::time::Duration;

use crate::helpers::{Backend, TestApp};

/// The read pool is held whole by the test (SQLite: reads have a pool of their own, writes go
/// through the writer), so any query of a handler would wait for a connection for 30 s. Reads
/// over the quota are answered 429 at once: their handlers never ran; the last admitted read
/// is still served once the pool is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_over_its_quota_runs_no_query_of_its_handler() {
    let app = TestApp::builder(Backend::Sqlite)
        .settings(|s| s.database.timeouts.acquire = Duration::from_secs(30))
        .key(
            "acme",
            "initial_credits = 1000\nread_rate_limit_per_min = 3",
        )
        .build()
        .await;
    app.freeze_clock();
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("q"), 1))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..2 {
        assert_eq!(app.get_batch(&key, &id).await.status(), 200);
    }

    // Hold every read connection.
    let pool = app.db().get_sqlite_connection_pool().clone();
    let mut held = Vec::new();
    while let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(300), pool.acquire()).await {
        held.push(c);
    }
    assert!(!held.is_empty(), "the read pool is held");

    // The third read is admitted: its handler waits for a connection.
    let admitted = tokio::spawn({
        let (client, url, key) = (
            app.client.clone(),
            format!("{}/api/enterprise/video-batch/{id}", app.base),
            key.clone(),
        );
        async move {
            client
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    // Wait until it is counted (its window's count reaches 3), then go over the quota.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = crate::helpers::count_window(&app, "read").await;
        if n >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the third read is counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(10), app.get_batch(&key, &id))
            .await
            .expect("a read over the quota is answered without waiting for the read pool");
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
    }
    assert!(
        !admitted.is_finished(),
        "the admitted read waits for the pool"
    );
    drop(held);
    assert_eq!(admitted.await.unwrap().unwrap(), 200);
}
