//! Two server processes on one PostgreSQL database, with the load split between them: exact
//! rate limit, no overdraft, one batch per request id, each item claimed once, each webhook
//! attempt sent once.
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use sea_orm::ConnectionTrait;
use serde_json::Value;

use crate::helpers::{
    Backend, PgDatabase, TestApp, WORKER_SECRET, assert_ledger_invariant, claim_at, complete_at,
    key_plaintext, sha256,
};
use crate::webhooks::{Receiver, SECRET};

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_postgres_keep_every_invariant() {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return;
    };
    let pg = PgDatabase::create(&url, "vb_two").await;
    let db_url = pg.url.clone();
    let receiver = Receiver::start(0, &[]).await;
    let hook = format!(
        "webhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
        receiver.url()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.toml"),
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\n[database]\nurl = \"{db_url}\"\n[worker]\nsecret = \"{WORKER_SECRET}\"\n\
             [admin]\ntoken = \"two-admin\"\n[webhooks]\nallow_private_targets = true\n\
             [keys.limited]\nkey_sha256 = \"{}\"\ninitial_credits = 100000\nrate_limit_per_min = 50\n{hook}\n\
             [keys.poor]\nkey_sha256 = \"{}\"\ninitial_credits = 100\nrate_limit_per_min = 1000\n{hook}\n\
             [keys.idem]\nkey_sha256 = \"{}\"\ninitial_credits = 1000\nrate_limit_per_min = 1000\n{hook}\n",
            sha256(&key_plaintext("limited")),
            sha256(&key_plaintext("poor")),
            sha256(&key_plaintext("idem")),
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    let mut ports = Vec::new();
    let mut _nodes = Vec::new();
    // Both nodes run on one frozen clock, so the rate-limit calls below count against one
    // window whatever the wall clock does.
    let frozen = chrono::Utc::now().to_rfc3339();
    for _ in 0..2 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
        cmd.env("APP_CONFIG_DIR", dir.path())
            .env(api::clock::TEST_FROZEN_CLOCK_ENV, &frozen)
            .env("APP_ENVIRONMENT", "test")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        let (child, port) = crate::helpers::spawn_server(cmd);
        _nodes.push(Node(child));
        ports.push(port);
    }
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for base in &bases {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "node did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let create = |i: usize, key: &str, rid: String| {
        let (client, base, key) = (client.clone(), bases[i % 2].clone(), key_plaintext(key));
        async move {
            let r = client
                .post(format!("{base}/api/enterprise/video-batch"))
                .header("x-api-key", key)
                .json(&TestApp::batch_body(Some(&rid), 1))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };

    let rl = join_all((0..120).map(|i| create(i, "limited", format!("rl-{i}")))).await;
    assert_eq!(
        rl.iter().filter(|r| r.0 == 201).count(),
        50,
        "exact rate limit across nodes"
    );
    assert_eq!(rl.iter().filter(|r| r.0 == 429).count(), 70);

    let od = join_all((0..40).map(|i| create(i, "poor", format!("od-{i}")))).await;
    assert_eq!(
        od.iter().filter(|r| r.0 == 201).count(),
        10,
        "no overdraft across nodes"
    );
    assert_eq!(od.iter().filter(|r| r.0 == 402).count(), 30);

    let idem = join_all((0..30).map(|i| create(i, "idem", "same-id".to_string()))).await;
    assert_eq!(
        idem.iter().filter(|r| r.0 == 201).count(),
        1,
        "one batch per request id"
    );
    assert_eq!(idem.iter().filter(|r| r.0 == 200).count(), 29);
    let ids: HashSet<&str> = idem
        .iter()
        .map(|r| r.1["batch_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1);

    // Four workers, two per node, drain the 61 items.
    let workers = (0..4).map(|w| {
        let (client, base) = (client.clone(), bases[w % 2].clone());
        async move {
            let mut mine = Vec::new();
            loop {
                let items = claim_at(&client, &base, &format!("w{w}"), 3, None).await;
                if items.is_empty() {
                    return mine;
                }
                for item in items {
                    let id = item["item_id"].as_str().unwrap().to_string();
                    assert_eq!(complete_at(&client, &base, &item).await, 200);
                    mine.push(id);
                }
            }
        }
    });
    let claimed: Vec<String> = join_all(workers).await.into_iter().flatten().collect();
    assert_eq!(claimed.len(), 61, "every item claimed");
    assert_eq!(
        claimed.iter().collect::<HashSet<_>>().len(),
        61,
        "no item claimed twice"
    );

    // Both nodes dispatch; every batch.completed is sent exactly once: once every outbox row
    // is final with one attempt, no node sends it again.
    receiver.wait_for(61, Duration::from_secs(30)).await;
    let db = api::db::connect_url(&db_url, 2, None).await.unwrap();
    let deliveries = crate::helpers::wait_outbox_final(&db, 61).await;
    for d in &deliveries {
        assert_eq!(
            (d.status.as_str(), d.attempt_count, d.attempts),
            ("succeeded", 1, 1),
            "delivery {} was attempted more than once",
            d.id
        );
    }
    let got = receiver.got();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *per_id.entry(r.id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 61);
    assert!(
        per_id.values().all(|n| *n == 1),
        "an attempt was sent twice"
    );

    assert_ledger_invariant(&db).await;
    let charges = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'charge'".to_string(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "v")
        .unwrap();
    assert_eq!(charges, 61, "each item charged once");
    drop(db);
    drop(_nodes);
    pg.drop_now().await;
}
