//! Two real nodes on one PostgreSQL database behind nginx (`scripts/cluster-demo.sh`): the
//! per-key rate limit stays exact across both, the allowlist sees the real client address
//! through the proxy and not a forged one, and a node killed mid-load loses no acknowledged
//! batch while the other keeps serving.
use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{PgDatabase, TestApp, fresh_window, key_plaintext, sha256};

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
    let result = std::panic::AssertUnwindSafe(drive(&cluster, &cluster_dir));
    let outcome = futures::FutureExt::catch_unwind(result).await;
    stop();
    db.drop_now().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn drive(cluster: &Cluster, cluster_dir: &std::path::Path) {
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

    // The per-key limit is exact across both nodes.
    fresh_window(20).await;
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

    // Kill one node mid-load: the other keeps serving and every acknowledged batch exists.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut creators = Vec::new();
    for t in 0..4 {
        let c = inside.clone();
        let url = url.clone();
        let acknowledged = Arc::clone(&acknowledged);
        creators.push(tokio::spawn(async move {
            let mut after_kill = 0;
            let mut i = 0;
            while Instant::now() < deadline {
                i += 1;
                let r = c
                    .post(format!("{url}/api/enterprise/video-batch"))
                    .header("x-api-key", key_plaintext("busy"))
                    .json(&TestApp::batch_body(Some(&format!("load-{t}-{i}")), 1))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status().as_u16() == 201
                {
                    let v: Value = r.json().await.unwrap();
                    acknowledged
                        .lock()
                        .unwrap()
                        .push(v["batch_id"].as_str().unwrap().to_string());
                    after_kill += 1;
                }
            }
            after_kill
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = acknowledged.lock().unwrap().len();
    let node1 = &cluster.env["NODE1_PID"];
    assert!(
        Command::new("kill")
            .args(["-KILL", node1])
            .status()
            .unwrap()
            .success()
    );
    let mut total = 0;
    for c in creators {
        total += c.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(total, acknowledged.len());
    assert!(before_kill > 0, "load ran before the kill");
    assert!(
        acknowledged.len() > before_kill,
        "the surviving node kept serving ({before_kill} before the kill, {} in all); logs in {}",
        acknowledged.len(),
        cluster_dir.display()
    );
    eprintln!(
        "cluster: {before_kill} batches acknowledged before node 1 was killed, {} in all",
        acknowledged.len()
    );
    for id in &acknowledged {
        let r = inside
            .get(format!("{url}/api/enterprise/video-batch/{id}"))
            .header("x-api-key", key_plaintext("busy"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged batch {id} survives");
    }
}
