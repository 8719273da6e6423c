//! Credits, usage and the read quota of the customer API.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    usage_counts_calls_batches_items_and_charges,
    read_calls_use_the_read_quota,
    concurrent_reads_on_two_nodes_admit_exactly_the_read_quota,
    a_read_is_counted_before_its_work_and_audited_once,
    old_rate_windows_are_pruned
);

async fn usage_counts_calls_batches_items_and_charges(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 45\nrate_limit_per_min = 100")
        .key("beta", "initial_credits = 100")
        .build()
        .await;
    let frozen = app.freeze_clock();
    let key = app.key("acme").to_string();
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("u1"), 2))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("u2"), 2))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("u3"), 2))
            .await
            .status(),
        402
    );
    let item = app.claim("w", 1).await.remove(0);
    assert_eq!(app.complete(&item).await.status(), 200);
    // Another key's activity does not show.
    assert_eq!(
        app.create_batch(app.key("beta"), &TestApp::batch_body(Some("b1"), 1))
            .await
            .status(),
        201
    );
    let today = frozen.date_naive();
    let r = app
        .client
        .get(format!(
            "{}/api/enterprise/usage?from={today}&to={today}",
            app.base
        ))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let days = v["days"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{v}");
    let d = &days[0];
    assert_eq!(d["date"], today.to_string());
    assert_eq!(d["calls"], 3, "only this key's calls, before this one: {d}");
    assert_eq!(d["calls_2xx"], 2);
    assert_eq!(d["calls_4xx"], 1);
    assert_eq!(d["batches"], 2);
    assert_eq!(d["items"], 4);
    assert_eq!(d["credits_charged"], 10);
    let r = app
        .client
        .get(format!(
            "{}/api/enterprise/usage?from=2026-12-01&to=2026-11-01",
            app.base
        ))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // The admin sees the same numbers for the key.
    let r = app
        .client
        .get(format!(
            "{}/api/admin/keys/acme/usage?from={today}&to={today}",
            app.base
        ))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["days"][0]["batches"], 2);
}

async fn read_calls_use_the_read_quota(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100\nread_rate_limit_per_min = 3\nrate_limit_per_min = 50",
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    app.freeze_clock();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = app
            .client
            .get(format!("{}/api/enterprise/credits", app.base))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["ratelimit-policy"], "\"read\";q=3;w=60");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    // Batch creation has its own quota.
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(None, 1))
            .await
            .status(),
        201
    );
    // Oversized params are refused clearly.
    let big = "x".repeat(5000);
    let r = app
        .create_batch(
            &key,
            &json!({"items": [{"prompt": "p", "params": {"blob": big}}]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("items[0].params"),
        "{v}"
    );
}

async fn old_rate_windows_are_pruned(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    app.client
        .get(format!("{}/api/enterprise/credits", app.base))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM rate_limit_window")
            .await,
        1
    );
    let now = chrono::Utc::now();
    let pruned = api::service::rate_limit::prune(&app.db(), now)
        .await
        .unwrap();
    assert_eq!(pruned, 0, "the current window stays");
    let pruned = api::service::rate_limit::prune(&app.db(), now + chrono::Duration::minutes(3))
        .await
        .unwrap();
    assert_eq!(pruned, 1, "ended windows go");
}

/// Reads are counted after their handler ran, with their usage row: 60 concurrent reads on two
/// nodes against a quota of 25 are exactly 25 answers and 35 refusals, and every call leaves
/// one row that says which (a refused read is audited as the 429 it was answered).
async fn concurrent_reads_on_two_nodes_admit_exactly_the_read_quota(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100\nread_rate_limit_per_min = 25",
        )
        .build()
        .await;
    let peer = app.peer().await;
    let at = app.freeze_clock();
    peer.freeze_clock_at(at);
    let key = app.key("acme").to_string();
    let calls = (0..60).map(|i| {
        let base = if i % 2 == 0 { &app.base } else { &peer.base };
        let (client, key) = (app.client.clone(), key.clone());
        let url = format!("{base}/api/enterprise/credits");
        async move {
            let r = client
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let remaining = r.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_string();
            if status == 429 {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"], "RATE_LIMIT_EXCEEDED", "{body}");
                assert_eq!(remaining, "0");
            } else {
                assert_eq!(status, 200);
            }
            status
        }
    });
    let statuses = futures::future::join_all(calls).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!((ok, statuses.len() - ok), (25, 35), "{statuses:?}");
    let rows = |status: u16| {
        format!(
            "SELECT COUNT(*) AS v FROM usage_event WHERE path = '/api/enterprise/credits' \
             AND status = {status}"
        )
    };
    assert_eq!(app.scalar(&rows(200)).await, 25);
    assert_eq!(app.scalar(&rows(429)).await, 35);
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) AS v FROM usage_event WHERE status = 429 \
             AND error_code = 'RATE_LIMIT_EXCEEDED'"
        )
        .await,
        35
    );
}

/// A read is counted before its handler runs (one group) and its usage row is written
/// once it is answered (another): 20 reads one after another make exactly 40 commits (the reaper
/// is paused while they are counted).
async fn a_read_is_counted_before_its_work_and_audited_once(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let (commits, ()) = app
        .commits_during(async {
            for _ in 0..20 {
                assert_eq!(app.credits_status(&key).await, 200);
            }
        })
        .await;
    assert_eq!(commits, 40, "{commits} commits for 20 reads");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM usage_event WHERE path = '/api/enterprise/credits'")
            .await,
        20
    );
    assert_eq!(crate::helpers::count_window(&app, "read").await, 20);
}
