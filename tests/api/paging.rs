//! Large batches: a status poll carries the first page of items and a cursor, the items endpoint
//! pages the rest, and the results export streams every outcome as JSON Lines.
use std::collections::HashSet;

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    a_status_poll_carries_one_page_and_the_items_endpoint_pages_the_rest,
    the_results_export_streams_every_outcome_as_json_lines,
    another_keys_items_and_results_are_not_found,
);

async fn big_batch(app: &TestApp, key: &str, n: usize) -> String {
    let r = app
        .create_batch(key, &TestApp::batch_body(Some("big"), n))
        .await;
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn app(backend: Backend) -> TestApp {
    TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100000\nmax_batch_items = 1000\nread_rate_limit_per_min = 10000",
        )
        .key("other", "initial_credits = 100")
        .build()
        .await
}

async fn get_json(app: &TestApp, key: &str, path: &str) -> (u16, Value) {
    let r = app
        .client
        .get(format!("{}/api/enterprise{path}", app.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn a_status_poll_carries_one_page_and_the_items_endpoint_pages_the_rest(backend: Backend) {
    let app = app(backend).await;
    let key = app.key("acme").to_string();
    let id = big_batch(&app, &key, 250).await;
    let (status, b) = get_json(&app, &key, &format!("/video-batch/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(b["items"].as_array().unwrap().len(), 100);
    assert_eq!(b["counts"]["total"], 250);
    assert_eq!(b["counts"]["queued"], 250);
    let mut cursor = b["items_next_cursor"].as_str().unwrap().to_string();
    let mut seen: Vec<i64> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["index"].as_i64().unwrap())
        .collect();
    loop {
        let (status, page) = get_json(
            &app,
            &key,
            &format!("/video-batch/{id}/items?limit=70&cursor={cursor}"),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["index"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(page["has_more"], true);
                cursor = c.to_string();
            }
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..250).collect::<Vec<_>>(),
        "every item once, in order"
    );
    // A status filter pages only those items.
    let claimed = app.claim("w", 10).await;
    assert_eq!(claimed.len(), 10);
    let (_, running) = get_json(
        &app,
        &key,
        &format!("/video-batch/{id}/items?status=running"),
    )
    .await;
    let ids: HashSet<&str> = running["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap())
        .collect();
    let want: HashSet<&str> = claimed
        .iter()
        .map(|i| i["item_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, want);
    // A cursor is 6 URL-safe base64 characters (the documents' pattern): anything else is
    // refused as malformed, and any string of that shape is a place to resume from.
    let (status, bad) = get_json(&app, &key, &format!("/video-batch/{id}/items?cursor=nope")).await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"], "VALIDATION_ERROR", "{bad}");
    assert!(bad["message"].as_str().unwrap().contains("cursor"), "{bad}");
    let (status, page) = get_json(
        &app,
        &key,
        &format!("/video-batch/{id}/items?cursor=AAAAAA&limit=5"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["data"][0]["index"], 1,
        "AAAAAA is index 0: the page starts after it"
    );
}

async fn the_results_export_streams_every_outcome_as_json_lines(backend: Backend) {
    let app = app(backend).await;
    let key = app.key("acme").to_string();
    let id = big_batch(&app, &key, 1000).await;
    let item = app.claim("w", 1).await.remove(0);
    assert_eq!(app.complete(&item).await.status(), 200);
    let r = app
        .client
        .get(format!(
            "{}/api/enterprise/video-batch/{id}/results",
            app.base
        ))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1000);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i as i64);
    }
    let done = lines
        .iter()
        .find(|l| l["item_id"] == item["item_id"])
        .unwrap();
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result_url"], json!("https://cdn.example/v.mp4"));
    assert_eq!(
        lines.iter().filter(|l| l["status"] == "queued").count(),
        999
    );

    // The other outcomes: failed, still running, cancelled (the batch is cancelled with one
    // item out), and, in a batch whose window ended, expired.
    let two = app.claim("w", 2).await;
    assert_eq!(two.len(), 2);
    assert_eq!(app.fail(&two[0], false).await.status(), 200);
    assert_eq!(app.cancel_batch(&key, &id).await.status(), 200);
    let lines = results(&app, &key, &id).await;
    assert_eq!(lines.len(), 1000);
    let status_of = |item: &Value| {
        lines
            .iter()
            .find(|l| l["item_id"] == item["item_id"])
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status_of(&item), "succeeded");
    assert_eq!(status_of(&two[0]), "failed");
    assert_eq!(status_of(&two[1]), "running");
    assert_eq!(
        lines.iter().filter(|l| l["status"] == "cancelled").count(),
        997
    );
    let mut body = TestApp::batch_body(Some("short"), 3);
    body["completion_window"] = json!("1s");
    let r = app.create_batch(&key, &body).await;
    assert_eq!(r.status(), 201);
    let short = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, b) = get_json(&app, &key, &format!("/video-batch/{short}")).await;
        if b["counts"]["expired"] == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "window not enforced: {b}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let lines = results(&app, &key, &short).await;
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["status"] == "expired"), "{lines:?}");
}

async fn results(app: &TestApp, key: &str, id: &str) -> Vec<Value> {
    let r = app
        .client
        .get(format!(
            "{}/api/enterprise/video-batch/{id}/results",
            app.base
        ))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn another_keys_items_and_results_are_not_found(backend: Backend) {
    let app = app(backend).await;
    let id = big_batch(&app, app.key("acme"), 3).await;
    let other = app.key("other").to_string();
    for path in [
        format!("/video-batch/{id}/items"),
        format!("/video-batch/{id}/results"),
    ] {
        let (status, body) = get_json(&app, &other, &path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "NOT_FOUND");
    }
}
