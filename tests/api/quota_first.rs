//! Every call is counted before its work: a read over its quota is refused before its handler
//! runs a single query.
use std::time::Duration;

use sea_orm::{ConnectionTrait, TransactionTrait};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(a_read_over_its_quota_runs_no_query_of_its_handler);

/// The handler's reads are made to wait: on SQLite the test holds the whole read pool (reads
/// have a pool of their own, writes go through the writer), on PostgreSQL an exclusive lock on
/// `batch_job`, so any query of a batch read would wait (for 30 s here). Reads over the quota
/// are answered 429 at once: their handlers never ran; the last admitted read is still served
/// once the test lets go.
async fn a_read_over_its_quota_runs_no_query_of_its_handler(backend: Backend) {
    let pg = backend.is_postgres();
    let app = TestApp::builder(backend)
        .settings(|s| {
            s.database.timeouts.acquire = Duration::from_secs(30);
            s.database.timeouts.lock = Duration::from_secs(30);
            s.database.timeouts.statement = Duration::from_secs(30);
        })
        .key(
            "acme",
            "initial_credits = 1000\nread_rate_limit_per_min = 3",
        )
        .build()
        .await;
    app.freeze_clock();
    let key = app.key("acme").to_string();
    let id = app.created_batch_id(&key, "q", 1).await;
    for _ in 0..2 {
        assert_eq!(app.get_batch(&key, &id).await.status(), 200);
    }

    // Make every read of a batch wait.
    let locker = app.db();
    let mut held = Vec::new();
    let lock = if pg {
        let txn = locker.begin().await.unwrap();
        txn.execute_unprepared("LOCK TABLE batch_job IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        Some(txn)
    } else {
        let pool = locker.get_sqlite_connection_pool().clone();
        while let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(300), pool.acquire()).await
        {
            held.push(c);
        }
        assert!(!held.is_empty(), "the read pool is held");
        None
    };

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
    if let Some(txn) = lock {
        txn.commit().await.unwrap();
    }
    assert_eq!(admitted.await.unwrap().unwrap(), 200);
}
