//! Crash safety: the real server is killed with SIGKILL in the middle of concurrent creates,
//! completes and cancels, restarted, and nothing that was acknowledged is lost or half-written.
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{
    Backend, PgDatabase, WORKER_SECRET, assert_ledger_invariant, claim_at, complete_at,
    key_plaintext, sha256, spawn_server,
};

both_backends!(sigkill_mid_load_loses_nothing);

struct Server {
    child: Child,
    base: String,
}

fn start(dir: &std::path::Path) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
    cmd.env("APP_CONFIG_DIR", dir)
        .env("APP_ENVIRONMENT", "test")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let (child, port) = spawn_server(cmd);
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_string(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "v").unwrap()
}

async fn sigkill_mid_load_loses_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (url, pg_db) = match &backend {
        Backend::Sqlite => (
            format!("sqlite://{}/crash.db?mode=rwc", dir.path().display()),
            None,
        ),
        Backend::Postgres(url) => {
            let pg = PgDatabase::create(url, "vb_crash").await;
            (pg.url.clone(), Some(pg))
        }
    };
    let key = key_plaintext("crash");
    std::fs::write(
        dir.path().join("base.toml"),
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\nshutdown_grace_seconds = 1\n[database]\nurl = \"{url}\"\n\
             [worker]\nsecret = \"{WORKER_SECRET}\"\nlease_seconds = 1\n[admin]\ntoken = \"crash-admin\"\n\
             [webhooks]\ndispatch = false\nallow_private_targets = true\n\
             [keys.crash]\nkey_sha256 = \"{}\"\ninitial_credits = 10000000\nrate_limit_per_min = 1000000\n\
             read_rate_limit_per_min = 1000000\nwebhook_url = \"http://127.0.0.1:9/hook\"\n\
             webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
            sha256(&key)
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut server = start(dir.path());
    crate::helpers::wait_ready(&client, &server.base).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (client, base, key, stop, acked) = (
            client.clone(),
            server.base.clone(),
            key.clone(),
            stop.clone(),
            acked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let n = 1 + (i % 3);
                let items: Vec<Value> =
                    (0..n).map(|k| json!({"prompt": format!("p{k}")})).collect();
                let body = json!({"request_id": format!("c{t}-{i}"), "items": items});
                let Ok(r) = client
                    .post(format!("{base}/api/enterprise/video-batch"))
                    .header("x-api-key", &key)
                    .json(&body)
                    .send()
                    .await
                else {
                    continue;
                };
                if r.status().is_success()
                    && let Ok(v) = r.json::<Value>().await
                {
                    let id = v["batch_id"].as_str().unwrap().to_string();
                    acked.lock().unwrap().push((id, n as i64));
                }
            }
        }));
    }
    // Every acknowledged report (item id, "complete" or "fail") and cancel (batch id).
    let reports = Arc::new(std::sync::Mutex::new(Vec::<(String, &'static str)>::new()));
    let cancels = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    for w in 0..2 {
        let (client, base, stop, reports) = (
            client.clone(),
            server.base.clone(),
            stop.clone(),
            reports.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = client.post(format!("{base}/api/internal/worker/claim")).bearer_auth(WORKER_SECRET)
                    .json(&json!({"worker_id": format!("w{w}"), "max_items": 5, "lease_seconds": 1})).send().await else { continue };
                let Ok(v) = r.json::<Value>().await else { continue };
                for item in v["items"].as_array().cloned().unwrap_or_default() {
                    let what = if item["prompt"] == "p1" { "fail" } else { "complete" };
                    let id = item["item_id"].as_str().unwrap().to_string();
                    let r = client
                        .post(format!("{base}/api/internal/worker/items/{id}/{what}"))
                        .bearer_auth(WORKER_SECRET)
                        .json(&if what == "complete" {
                            json!({"lease_token": item["lease_token"], "result_url": "https://x/y"})
                        } else {
                            json!({"lease_token": item["lease_token"], "error": "boom", "retryable": false})
                        })
                        .send()
                        .await;
                    if r.is_ok_and(|r| r.status() == 200) {
                        reports.lock().unwrap().push((id, what));
                    }
                }
            }
        }));
    }
    {
        let (client, base, key, stop, acked, cancels) = (
            client.clone(),
            server.base.clone(),
            key.clone(),
            stop.clone(),
            acked.clone(),
            cancels.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let target = acked
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .nth(3)
                    .map(|(id, _)| id.clone());
                if let Some(id) = target {
                    let r = client
                        .post(format!("{base}/api/enterprise/video-batch/{id}/cancel"))
                        .header("x-api-key", &key)
                        .send()
                        .await;
                    // A cancel of a batch that had already completed changes nothing; only a
                    // cancel the server says it recorded must survive.
                    if let Ok(r) = r
                        && r.status() == 200
                        && let Ok(v) = r.json::<Value>().await
                        && !v["cancel_requested_at"].is_null()
                    {
                        cancels.lock().unwrap().push(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Kill once the load has produced what the checks below need: batches, reports of both
    // kinds and recorded cancels.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let enough = {
            let reports = reports.lock().unwrap();
            acked.lock().unwrap().len() > 10
                && reports.iter().any(|(_, w)| *w == "complete")
                && reports.iter().any(|(_, w)| *w == "fail")
                && !cancels.lock().unwrap().is_empty()
        };
        if enough {
            break;
        }
        assert!(Instant::now() < deadline, "the load produced too little");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "load ran: {} batches acknowledged",
        acked.len()
    );

    let mut server = start(dir.path());
    crate::helpers::wait_ready(&client, &server.base).await;
    let db = api::db::connect_url(&url, 2, None).await.unwrap();
    for (id, n) in &acked {
        // UUIDs are blobs on SQLite: bind them through the entity API.
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
        let items = entity::batch_item::Entity::find()
            .filter(entity::batch_item::Column::BatchId.eq(uuid))
            .count(&db)
            .await
            .unwrap();
        assert_eq!(
            items as i64, *n,
            "acknowledged batch {id} has all its items"
        );
        let holds = entity::credit_ledger::Entity::find()
            .filter(entity::credit_ledger::Column::BatchId.eq(uuid))
            .filter(entity::credit_ledger::Column::Kind.eq("hold"))
            .count(&db)
            .await
            .unwrap();
        assert_eq!(holds, 1, "acknowledged batch {id} has its hold");
    }
    // Every acknowledged report and cancel survived too.
    let reports = reports.lock().unwrap().clone();
    let cancels = cancels.lock().unwrap().clone();
    assert!(!reports.is_empty(), "workers reported before the kill");
    assert!(!cancels.is_empty(), "cancels were recorded before the kill");
    for (id, what) in &reports {
        use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        let item = entity::batch_item::Entity::find_by_id(uuid)
            .one(&db)
            .await
            .unwrap()
            .expect("reported item exists");
        let (status, kind) = if *what == "complete" {
            (entity::status::ItemState::Succeeded, "charge")
        } else {
            (entity::status::ItemState::Failed, "release")
        };
        assert_eq!(item.status, status, "acknowledged {what} of item {id}");
        let rows = entity::credit_ledger::Entity::find()
            .filter(entity::credit_ledger::Column::ItemId.eq(uuid))
            .filter(entity::credit_ledger::Column::Kind.eq(kind))
            .count(&db)
            .await
            .unwrap();
        assert_eq!(
            rows, 1,
            "acknowledged {what} of item {id} has exactly one {kind}"
        );
    }
    for id in &cancels {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        use sea_orm::EntityTrait;
        let job = entity::batch_job::Entity::find_by_id(uuid)
            .one(&db)
            .await
            .unwrap()
            .expect("cancelled batch exists");
        assert!(
            job.cancel_requested_at.is_some(),
            "acknowledged cancel of batch {id} survives"
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) AS v FROM batch_job b WHERE NOT EXISTS \
            (SELECT 1 FROM credit_ledger l WHERE l.batch_id = b.id AND l.kind = 'hold')"
        )
        .await,
        0,
        "no batch without its hold"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) AS v FROM batch_job b WHERE \
            (SELECT COUNT(*) FROM batch_item i WHERE i.batch_id = b.id) <> b.total_count"
        )
        .await,
        0,
        "no half-written batch"
    );
    assert_ledger_invariant(&db).await;
    let missing_events = "SELECT COUNT(*) AS v FROM batch_job b WHERE b.status IN ('completed', 'cancelled') \
        AND NOT EXISTS (SELECT 1 FROM webhook_delivery d WHERE d.batch_id = b.id AND d.event_type LIKE 'batch.%')";
    assert_eq!(
        count(&db, missing_events).await,
        0,
        "no final batch without its webhook event"
    );

    // Drain what is left (leases of the killed server expire after a second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let items = claim_at(&client, &server.base, "drain", 100, Some(30)).await;
        if items.is_empty()
            && count(
                &db,
                "SELECT COUNT(*) AS v FROM batch_item WHERE status IN ('queued', 'running')",
            )
            .await
                == 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "queue did not drain");
        for item in items {
            assert_eq!(complete_at(&client, &server.base, &item).await, 200);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        count(
            &db,
            "SELECT CAST(COALESCE(SUM(held), 0) AS BIGINT) AS v FROM credit_wallet"
        )
        .await,
        0,
        "nothing held once all is final"
    );
    assert_ledger_invariant(&db).await;
    assert_eq!(count(&db, missing_events).await, 0);
    let _ = server.child.kill();
    let _ = server.child.wait();
    // The plaintext key never reaches the database: not in the SQLite files, not in a dump.
    let stored: Vec<u8> = match &backend {
        Backend::Sqlite => ["crash.db", "crash.db-wal"]
            .iter()
            .flat_map(|f| std::fs::read(dir.path().join(f)).unwrap_or_default())
            .collect(),
        Backend::Postgres(_) => {
            Command::new("pg_dump")
                .arg(&url)
                .output()
                .expect("pg_dump")
                .stdout
        }
    };
    assert!(stored.len() > 10_000, "the database holds the load's data");
    assert!(
        !stored.windows(key.len()).any(|w| w == key.as_bytes()),
        "the plaintext key is stored somewhere"
    );
    assert!(
        stored.windows(64).any(|w| w == sha256(&key).as_bytes()),
        "its hash is what is stored"
    );
    let _ = server.child.wait();
    drop(db);
    if let Some(pg) = pg_db {
        pg.drop_now().await;
    }
}
