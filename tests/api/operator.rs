//! Operator and admin promises of the README: the admin reads of a key's wallet and ledger and
//! the key list's effective policy, SQLite's durable defaults (`synchronous=FULL`,
//! `auto_vacuum = INCREMENTAL`), the API serving when the ops port cannot be bound, a worker's
//! optional `result`, and a usage range over several days with `to` inclusive.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    admin_reads_a_keys_wallet_and_ledger_and_lists_effective_policies,
    a_workers_optional_result_is_returned_with_the_item,
    a_usage_range_over_several_days_includes_its_last_day,
);

async fn admin_reads_a_keys_wallet_and_ledger_and_lists_effective_policies(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100\ncost_per_video = 7\nmax_running_items = 2\n\
             low_credit_threshold = 20\nwebhook_url = \"https://hooks.example/acme\"\n\
             webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
        )
        .key("plain", "initial_credits = 5")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("w"), 2))
        .await;
    assert_eq!(r.status(), 201);
    let item = app.claim("w", 1).await.remove(0);
    assert_eq!(app.complete(&item).await.status(), 200);
    let r = app
        .admin_post(
            "/keys/acme/credits/grant",
            &json!({ "amount": 30, "note": "inv" }),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);

    let w = app.admin_get("/keys/acme/credits").await;
    assert_eq!(w["key"], "acme");
    // 100 + 30 granted, 7 charged; 7 held for the other item.
    assert_eq!(
        (w["balance"].as_i64(), w["held"].as_i64()),
        (Some(123), Some(7)),
        "{w}"
    );
    assert_eq!(w["available"], 116);
    let kinds: Vec<(&str, i64)> = w["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["kind"].as_str().unwrap(), l["amount"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("grant", 30), ("charge", 7), ("hold", 14), ("grant", 100)],
        "newest first: {w}"
    );
    let charge = &w["ledger"][1];
    assert_eq!(charge["item_id"], item["item_id"], "{charge}");
    assert_eq!(w["ledger"][0]["note"], "inv");
    // The customer's own read agrees.
    let mine = app.wallet(&key).await;
    assert_eq!((mine.balance, mine.held), (123, 7));

    let keys = app.admin_get("/keys").await;
    let list = keys
        .as_array()
        .unwrap_or_else(|| keys["keys"].as_array().unwrap());
    let acme = list
        .iter()
        .find(|k| k["name"] == "acme")
        .expect("acme listed");
    assert_eq!(acme["cost_per_video"], 7);
    assert_eq!(acme["max_running_items"], 2);
    assert_eq!(acme["low_credit_threshold"], 20);
    assert_eq!(acme["webhook_url"], "https://hooks.example/acme");
    assert_eq!(acme["webhook_secret_set"], true);
    assert_eq!(
        acme["key_sha256_prefix"],
        crate::helpers::sha256(&key)[..12]
    );
    let plain = list
        .iter()
        .find(|k| k["name"] == "plain")
        .expect("plain listed");
    // The defaults it inherits.
    assert_eq!(plain["cost_per_video"], 10);
    assert!(plain["max_running_items"].is_null());
    assert_eq!(plain["webhook_secret_set"], false);
    let text = keys.to_string();
    assert!(
        !text.contains("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") && !text.contains(&key),
        "secrets never shown: {text}"
    );
}

async fn a_workers_optional_result_is_returned_with_the_item(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let batch = app.created_batch_id(&key, "res", 2).await;
    let items = app.claim("w", 2).await;
    let extra = json!({ "duration_s": 12.5, "frames": 300, "codec": "h264" });
    let r = app
        .worker_post(
            &format!("/items/{}/complete", items[0]["item_id"].as_str().unwrap()),
            &json!({ "lease_token": items[0]["lease_token"],
                     "result_url": "https://cdn.example/a.mp4", "result": extra }),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.complete(&items[1]).await.status(), 200);
    let v: Value = app.get_batch(&key, &batch).await.json().await.unwrap();
    let item = |id: &Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| &i["item_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(item(&items[0]["item_id"])["result"], extra, "{v}");
    assert_eq!(
        item(&items[0]["item_id"])["result_url"],
        "https://cdn.example/a.mp4"
    );
    assert!(
        item(&items[1]["item_id"])["result"].is_null(),
        "optional: {v}"
    );
}

async fn a_usage_range_over_several_days_includes_its_last_day(backend: Backend) {
    let app = TestApp::builder(backend)
        .key(
            "acme",
            "initial_credits = 100\nread_rate_limit_per_min = 100",
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    let today = chrono::Utc::now().date_naive();
    let noon = |d: chrono::NaiveDate| d.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let days: Vec<chrono::NaiveDate> = (0..3)
        .map(|back| today - chrono::Duration::days(3 - back))
        .collect();
    // 2, 3 and 1 reads on three consecutive days.
    for (day, reads) in days.iter().zip([2, 3, 1]) {
        app.freeze_clock_at(noon(*day));
        for _ in 0..reads {
            assert_eq!(app.credits_status(&key).await, 200);
        }
    }
    let usage = |from: chrono::NaiveDate, to: chrono::NaiveDate| {
        let (app, key) = (&app, &key);
        async move {
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
            let v: Value = r.json().await.unwrap();
            v["days"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["date"].as_str().unwrap().to_string(),
                        d["calls"].as_i64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    // Asked on the last day (the answer counts the calls before it).
    assert_eq!(
        usage(days[0], days[1]).await,
        [(days[0].to_string(), 2), (days[1].to_string(), 3)],
        "`to` is inclusive, and the day after it is left out"
    );
    assert_eq!(
        usage(days[1], days[2]).await,
        [(days[1].to_string(), 3), (days[2].to_string(), 2)],
        "the last day holds its read and the first usage call"
    );
}

/// SQLite's defaults: every acknowledged write is fsynced (`synchronous=FULL`, 2, on the
/// writer that commits the requests' writes) and a new database gives freed pages back
/// (`auto_vacuum = INCREMENTAL`, 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_synchronous_full_with_incremental_auto_vacuum_by_default() {
    use sea_orm::ConnectionTrait;
    let app = TestApp::builder(Backend::Sqlite).build().await;
    for (pragma, want) in [("synchronous", 2), ("auto_vacuum", 2)] {
        let db = app.state().writer.clone();
        for _ in 0..3 {
            let v: i64 = db
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Sqlite,
                    format!("PRAGMA {pragma}"),
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get_by_index(0)
                .unwrap();
            assert_eq!(v, want, "PRAGMA {pragma}");
        }
    }
}

/// An ops address that cannot be bound (another socket holds it) leaves the API serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_when_the_ops_port_cannot_be_bound() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let app = TestApp::builder(Backend::Sqlite)
        .key("acme", "initial_credits = 100")
        .settings(move |s| s.server.ops_bind = addr.clone())
        .build()
        .await;
    assert!(app.ops_base.is_empty(), "no ops listener: {}", app.ops_base);
    assert_eq!(
        app.credits_status(app.key("acme")).await,
        200,
        "the API serves"
    );
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "/metrics does not move to the public port");
    drop(taken);
}

/// A kept-alive connection with nothing in flight is closed after `idle_timeout` (1 s here),
/// long before the header timeout (2 minutes here) would close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::builder(Backend::Sqlite)
        .settings(|s| {
            s.server.idle_timeout = std::time::Duration::from_secs(1);
            s.server.header_timeout = std::time::Duration::from_secs(120);
        })
        .build()
        .await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let sent = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer, then (kept alive, idle) the close.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let n = conn.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(closed.is_ok(), "the idle connection was not closed: {text}");
    assert!(
        sent.elapsed() >= std::time::Duration::from_millis(900),
        "closed right after the answer, not for being idle: {text}"
    );
}
