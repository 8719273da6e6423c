//! Two real nodes on one PostgreSQL database behind nginx (`scripts/cluster-demo.sh`): the
//! per-key rate limit stays exact across both, the allowlist sees the real client address
//! through the proxy and not a forged one, a node killed mid-load loses no acknowledged batch
//! while the other keeps serving calls sent after it died, a call cut off by the kill is safe
//! to retry with its request id, one request id makes one batch, and every wallet holds exactly
//! what its batches require with the ledger agreeing.
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use sea_orm::ConnectionTrait;

use crate::helpers::{PgDatabase, TestApp, key_plaintext, sha256};

fn nginx() -> Option<String> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| p.to_string())
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address works on Linux).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A create the cluster answered 201 or 200 (a repeat of its request id).
struct Ack {
    request_id: String,
    batch_id: String,
    /// Sent once the killed node was gone.
    sent_after_kill: bool,
}

/// Waits (up to 60 s) until `done` holds for the acknowledged creates.
async fn wait_for(acknowledged: &Mutex<Vec<Ack>>, what: &str, done: impl Fn(&[Ack]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&acknowledged.lock().unwrap()) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `cluster-demo.sh start` wrote to `cluster.env`.
struct Cluster {
    env: HashMap<String, String>,
}

impl Cluster {
    fn url(&self) -> &str {
        &self.env["CLUSTER_URL"]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_postgres_behind_nginx_keep_every_invariant() {
    let Some(nginx) = nginx() else {
        crate::helpers::skipped(
            "nginx is not installed (apt-get install nginx); cluster test not run",
        );
        return;
    };
    let Some(crate::helpers::Backend::Postgres(base_url)) = crate::helpers::Backend::postgres()
    else {
        return;
    };
    let db = PgDatabase::create(&base_url, "vb_cluster").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[worker]\nsecret = \"{}\"\n[admin]\ntoken = \"{}\"\n\
             [keys.limited]\nkey_sha256 = \"{}\"\ninitial_credits = 100000\nrate_limit_per_min = 20\n\
             [keys.fenced]\nkey_sha256 = \"{}\"\nip_allowlist = [\"127.0.0.2/32\"]\n\
             [keys.busy]\nkey_sha256 = \"{}\"\ninitial_credits = 1000000\nrate_limit_per_min = 100000\nread_rate_limit_per_min = 100000\n",
            crate::helpers::WORKER_SECRET,
            crate::helpers::ADMIN_TOKEN,
            sha256(&key_plaintext("limited")),
            sha256(&key_plaintext("fenced")),
            sha256(&key_plaintext("busy")),
        ),
    )
    .unwrap();
    let started = Command::new("bash")
        .args(["scripts/cluster-demo.sh", "start"])
        .arg(dir.path().join("cluster"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BIN", env!("CARGO_BIN_EXE_video-batch-api"))
        .env("DATABASE_URL", &db.url)
        .env("EXTRA_CONFIG", &keys)
        .env("NGINX", &nginx)
        .env("APP_ENVIRONMENT", "test")
        // Both nodes run on one frozen clock, so the rate-limit calls count against one window.
        .env(
            api::clock::TEST_FROZEN_CLOCK_ENV,
            chrono::Utc::now().to_rfc3339(),
        )
        .output()
        .unwrap();
    let cluster_dir = dir.path().join("cluster");
    let env: HashMap<String, String> = std::fs::read_to_string(cluster_dir.join("cluster.env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let cluster = Cluster { env };
    assert!(
        started.status.success() && cluster.env.contains_key("CLUSTER_URL"),
        "cluster-demo.sh start failed: {}\n{}",
        String::from_utf8_lossy(&started.stderr),
        std::fs::read_to_string(cluster_dir.join("node1.log")).unwrap_or_default()
    );
    let stop = || {
        let _ = Command::new("bash")
            .args(["scripts/cluster-demo.sh", "stop"])
            .arg(&cluster_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status();
    };
    let result = std::panic::AssertUnwindSafe(drive(&cluster, &cluster_dir, &db.url));
    let outcome = futures::FutureExt::catch_unwind(result).await;
    stop();
    db.drop_now().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn drive(cluster: &Cluster, cluster_dir: &std::path::Path, database_url: &str) {
    let url = cluster.url().to_string();
    let inside = client_from("127.0.0.2");
    let outside = client_from("127.0.0.3");

    // The allowlist sees the client's address through nginx, and a forged header does not help.
    let credits = |c: &reqwest::Client, forged: Option<&str>| {
        let mut r = c
            .get(format!("{url}/api/enterprise/credits"))
            .header("x-api-key", key_plaintext("fenced"));
        if let Some(f) = forged {
            r = r.header("x-forwarded-for", f);
        }
        r.send()
    };
    for _ in 0..4 {
        assert_eq!(credits(&inside, None).await.unwrap().status(), 200);
        assert_eq!(credits(&outside, None).await.unwrap().status(), 403);
        assert_eq!(
            credits(&outside, Some("127.0.0.2")).await.unwrap().status(),
            403,
            "a client-sent X-Forwarded-For is not believed"
        );
    }

    // The per-key limit is exact across both nodes (frozen on one window: see the start).
    let calls = (0..60).map(|i| {
        let c = inside.clone();
        let url = url.clone();
        async move {
            c.post(format!("{url}/api/enterprise/video-batch"))
                .header("x-api-key", key_plaintext("limited"))
                .json(&TestApp::batch_body(Some(&format!("rl-{i}")), 1))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(calls).await;
    let created = statuses.iter().filter(|s| **s == 201).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        (created, limited),
        (20, 40),
        "exactly the limit is admitted through two nodes: {statuses:?}"
    );

    // Kill one node mid-load. Each create is sent again with its request id until it is
    // answered: a call in flight on the killed node gets a 502 from nginx (or loses its
    // connection) and is safe to retry, so every request id ends with exactly one batch.
    // Calls sent after the node died prove that the surviving node serves.
    let acknowledged = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicUsize::new(0));
    let mut creators = Vec::new();
    for t in 0..4 {
        let c = inside.clone();
        let url = url.clone();
        let (acknowledged, killed, stop, retried) = (
            Arc::clone(&acknowledged),
            Arc::clone(&killed),
            Arc::clone(&stop),
            Arc::clone(&retried),
        );
        creators.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let request_id = format!("load-{t}-{i}");
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    assert!(Instant::now() < deadline, "{request_id} was never answered");
                    let sent_after_kill = killed.load(Ordering::SeqCst);
                    let r = c
                        .post(format!("{url}/api/enterprise/video-batch"))
                        .header("x-api-key", key_plaintext("busy"))
                        .json(&TestApp::batch_body(Some(&request_id), 1))
                        .send()
                        .await;
                    let status = r.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
                    match (status, r) {
                        (201 | 200, Ok(r)) => {
                            let v: Value = r.json().await.unwrap();
                            acknowledged.lock().unwrap().push(Ack {
                                request_id,
                                batch_id: v["batch_id"].as_str().unwrap().to_string(),
                                sent_after_kill,
                            });
                            break;
                        }
                        (0 | 502 | 503 | 504, _) => {
                            retried.fetch_add(1, Ordering::SeqCst);
                        }
                        (other, _) => panic!("{request_id}: unexpected {other}"),
                    }
                }
            }
        }));
    }
    wait_for(
        &acknowledged,
        "no load was acknowledged before the kill",
        |a| a.len() >= 20,
    )
    .await;
    let before_kill = acknowledged.lock().unwrap().len();
    let node1 = &cluster.env["NODE1_PID"];
    assert!(
        Command::new("kill")
            .args(["-KILL", node1])
            .status()
            .unwrap()
            .success()
    );
    // Gone (or a zombie nobody reaped yet): it answers nothing any more.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(format!("/proc/{node1}/stat")).is_ok_and(|st| {
        st.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    }) {
        assert!(Instant::now() < deadline, "node 1 did not die");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.store(true, Ordering::SeqCst);
    wait_for(
        &acknowledged,
        "the surviving node acknowledged nothing sent after the kill",
        |a| a.iter().filter(|a| a.sent_after_kill).count() >= 20,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for c in creators {
        c.await.unwrap();
    }
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    let after_kill = acknowledged.iter().filter(|a| a.sent_after_kill).count();
    assert!(before_kill >= 20, "load ran before the kill");
    assert!(
        acknowledged.len() > before_kill && after_kill >= 20,
        "the surviving node kept serving ({before_kill} before the kill, {after_kill} sent after it, {} in all); logs in {}",
        acknowledged.len(),
        cluster_dir.display()
    );
    let request_ids: HashSet<&str> = acknowledged.iter().map(|a| a.request_id.as_str()).collect();
    let batch_ids: HashSet<&str> = acknowledged.iter().map(|a| a.batch_id.as_str()).collect();
    assert_eq!(
        request_ids.len(),
        acknowledged.len(),
        "each request id answered once"
    );
    assert_eq!(
        batch_ids.len(),
        acknowledged.len(),
        "retried request ids were answered with their one batch"
    );
    eprintln!(
        "cluster: {before_kill} batches acknowledged before node 1 was killed, {after_kill} sent after, {} in all, {} calls retried",
        acknowledged.len(),
        retried.load(Ordering::SeqCst)
    );
    for a in &acknowledged {
        let id = &a.batch_id;
        let r = inside
            .get(format!("{url}/api/enterprise/video-batch/{id}"))
            .header("x-api-key", key_plaintext("busy"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged batch {id} survives");
    }

    // One batch per request id through two nodes: the same create sent at once many times.
    let same = (0..16).map(|_| {
        let c = inside.clone();
        let url = url.clone();
        async move {
            let r = c
                .post(format!("{url}/api/enterprise/video-batch"))
                .header("x-api-key", key_plaintext("busy"))
                .json(&TestApp::batch_body(Some("same-request"), 1))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (
                status,
                v["batch_id"].as_str().unwrap_or_default().to_string(),
            )
        }
    });
    let same = futures::future::join_all(same).await;
    assert_eq!(
        same.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "one create wins: {same:?}"
    );
    assert!(same.iter().all(|(s, _)| *s == 201 || *s == 200), "{same:?}");
    assert_eq!(
        same.iter().map(|(_, id)| id).collect::<HashSet<_>>().len(),
        1,
        "every repeat names the one batch"
    );

    // The money: no batch ran, so every key still has its initial balance, holds exactly what
    // its batches require, and the ledger agrees with the wallets.
    let db = api::db::connect_url(database_url, 2, None).await.unwrap();
    crate::helpers::assert_ledger_invariant(&db).await;
    let scalar = |sql: String| {
        let db = db.clone();
        async move {
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                sql,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "v")
            .unwrap()
        }
    };
    let busy_batches = scalar(
        "SELECT COUNT(*) AS v FROM batch_job b JOIN api_key k ON k.id = b.api_key_id \
         WHERE k.name = 'busy'"
            .into(),
    )
    .await;
    assert_eq!(
        busy_batches as usize,
        acknowledged.len() + 1,
        "exactly one batch per acknowledged request id (and one for the repeated create)"
    );
    for (key, initial, batches) in [("limited", 100_000, 20), ("busy", 1_000_000, busy_batches)] {
        let row = |col: &str| {
            scalar(format!(
                "SELECT CAST(w.{col} AS BIGINT) AS v FROM credit_wallet w JOIN api_key k \
                 ON k.id = w.api_key_id WHERE k.name = '{key}'"
            ))
        };
        let required = scalar(format!(
            "SELECT CAST(COALESCE(SUM(b.required_credits), 0) AS BIGINT) AS v FROM batch_job b \
             JOIN api_key k ON k.id = b.api_key_id WHERE k.name = '{key}'"
        ))
        .await;
        let per_batch = scalar(format!(
            "SELECT CAST(COALESCE(MAX(b.required_credits), 0) AS BIGINT) AS v FROM batch_job b \
             JOIN api_key k ON k.id = b.api_key_id WHERE k.name = '{key}'"
        ))
        .await;
        assert!(per_batch > 0, "{key}: batches require credits");
        assert_eq!(
            required,
            per_batch * batches,
            "{key}: every batch requires the same"
        );
        assert_eq!(row("balance").await, initial, "{key}: nothing was charged");
        assert_eq!(
            row("held").await,
            required,
            "{key}: held is what its batches require"
        );
    }
}
