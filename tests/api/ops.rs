//! Operations: metrics, graceful shutdown, and the real binary (SIGHUP reload, JSON logs with
//! request ids, no secrets at debug level, SIGTERM).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use serde_json::Value;

use crate::both_backends;
use crate::helpers::{Backend, TestApp, key_plaintext, sha256};

both_backends!(
    in_flight_request_completes_during_shutdown,
    binary_reloads_on_sighup_and_logs_no_secrets
);

async fn in_flight_request_completes_during_shutdown(backend: Backend) {
    let mut app = TestApp::builder(backend.clone())
        // The create waits for the test's lock longer than a store may make a call wait.
        .settings(|s| {
            s.database.timeouts.busy = Duration::from_secs(30);
            s.database.timeouts.lock = Duration::from_secs(30);
            s.database.timeouts.statement = Duration::from_secs(30);
        })
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let key_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'acme'")
        .await;
    // Hold the database's write lock so that a create is still in flight when shutdown starts.
    let locker = app.db();
    let pg = backend.is_postgres();
    let txn = api::db::begin_write(&locker).await.unwrap();
    if pg {
        txn.execute_unprepared("LOCK TABLE credit_wallet IN EXCLUSIVE MODE")
            .await
            .unwrap();
    } else {
        txn.execute_unprepared("UPDATE credit_wallet SET updated_at = updated_at")
            .await
            .unwrap();
    }
    let client = app.client.clone();
    let url = format!("{}/api/enterprise/video-batch", app.base);
    let body = TestApp::batch_body(Some("inflight"), 1);
    let request = tokio::spawn(async move {
        client
            .post(url)
            .header("x-api-key", key)
            .json(&body)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    if pg {
        // In flight for sure: its transaction waits for this test's table lock (other tests
        // on the same server wait for locks of their own, so only this table counts).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let waiting = locker
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT COUNT(*) AS v FROM pg_locks \
                     WHERE NOT granted AND relation = 'credit_wallet'::regclass"
                        .to_string(),
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get::<i64>("", "v")
                .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the create never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        // SQLite shows no waiter: the server does, once the create waits for its commit.
        let writes = app.state().writes.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while writes.waiting_for(key_id) == 0 {
            assert!(
                Instant::now() < deadline,
                "the create never reached its write"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(!request.is_finished(), "the create waits for the lock");
    let port = app.port;
    let stopping = tokio::spawn(async move {
        app.stop().await;
        app
    });
    // Shutdown has begun once the listener is closed: only then let the create finish.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "shutdown never closed the listener"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if request.is_finished() {
        panic!(
            "the create is still in flight during shutdown: {:?}",
            request.await
        );
    }
    txn.commit().await.unwrap();
    let status = request
        .await
        .unwrap()
        .expect("the in-flight request gets its response");
    assert!(
        status == 201,
        "in-flight create completed during shutdown, got {status}"
    );
    let app = stopping.await.unwrap();
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 1);
}

/// Starts the real binary with a config folder; SIGHUP reloads, logs are JSON with request ids
/// and never contain a secret, SIGTERM stops it cleanly.
async fn binary_reloads_on_sighup_and_logs_no_secrets(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (url, pg) = crate::helpers::own_database(&backend, dir.path(), "bin").await;
    let key = key_plaintext("bin");
    let write = |cap: u32| {
        std::fs::write(
            dir.path().join("base.toml"),
            format!(
                "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\n[database]\nurl = \"{url}\"\n\
                 [worker]\nsecret = \"env:VB_TEST_WORKER_SECRET\"\n[admin]\ntoken = \"bin-admin-token-value\"\n\
                 [log]\nformat = \"json\"\n[keys.bin]\nkey_sha256 = \"{}\"\ninitial_credits = 100\nmax_batch_items = {cap}\n",
                sha256(&key)
            ),
        )
        .unwrap();
    };
    write(5);
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
    cmd.env("APP_CONFIG_DIR", dir.path())
        .env("APP_ENVIRONMENT", "test")
        .env("VB_TEST_WORKER_SECRET", "bin-worker-secret-value")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped());
    let (mut child, port, stderr_lines) = crate::helpers::spawn_server_logged(cmd);
    let stderr = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    crate::helpers::wait_ready(&client, &base).await;
    let create = |n: usize, rid: &str| {
        client
            .post(format!("{base}/api/enterprise/video-batch"))
            .header("x-api-key", &key)
            .header("x-request-id", format!("trace-{rid}"))
            .json(&TestApp::batch_body(Some(rid), n))
            .send()
    };
    assert_eq!(create(3, "before").await.unwrap().status(), 201);
    write(2);
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    loop {
        i += 1;
        let s = create(3, &format!("after-{i}")).await.unwrap().status();
        if s == 422 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new cap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Worker and admin calls too, so their secrets pass through the server.
    client
        .post(format!("{base}/api/internal/worker/claim"))
        .bearer_auth("bin-worker-secret-value")
        .json(&serde_json::json!({"worker_id": "w", "max_items": 1}))
        .send()
        .await
        .unwrap();
    client
        .get(format!("{base}/api/admin/keys"))
        .bearer_auth("bin-admin-token-value")
        .send()
        .await
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "SIGTERM stops cleanly: {exit:?}");
    let lines = lines.join().unwrap();
    assert!(!lines.is_empty());
    let stderr_lines = stderr_lines.join().unwrap();
    assert!(
        stderr_lines.iter().any(|l| l.contains("listening on port")),
        "stderr was read"
    );
    let all = format!("{}\n{}", lines.join("\n"), stderr_lines.join("\n"));
    for secret in [
        key.as_str(),
        "bin-worker-secret-value",
        "bin-admin-token-value",
    ] {
        assert!(
            !all.contains(secret),
            "a secret reached the logs (stdout or stderr)"
        );
    }
    let mut with_request_id = 0;
    for l in &lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}"));
        if v.to_string().contains("trace-before") {
            with_request_id += 1;
        }
    }
    assert!(
        with_request_id >= 2,
        "request log lines carry the request id"
    );
    assert!(all.contains("configuration reloaded"));
    if let Some(pg) = pg {
        pg.drop_now().await;
    }
}
