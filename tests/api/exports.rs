//! The exports stream, in the form asked for: the error export of a 50,000-item batch reaches the client line by line
//! while the server's memory stays flat (the real binary, restarted before the export, its
//! resident memory read from /proc while the export runs; the export is over 190 MiB, so a
//! server that gathered it first would grow by at least that).
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::ConnectionTrait;

use crate::both_backends;
use crate::helpers::{Backend, TestApp, key_plaintext, sha256};

both_backends!(
    the_error_export_of_a_large_batch_streams_in_constant_memory,
    an_export_comes_as_a_download_when_asked_for
);

const ITEMS: usize = 50_000;
/// Each failure's message: 4,000 characters, so the export is over 190 MiB.
const MESSAGE_CHARS: usize = 4_000;

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The real binary on the config folder `dir`; killed when dropped (a failed test included).
struct Server(std::process::Child);

impl Server {
    async fn start(dir: &std::path::Path, client: &reqwest::Client) -> (Server, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
        cmd.env("APP_CONFIG_DIR", dir)
            .env("APP_ENVIRONMENT", "test")
            .env("RUST_LOG", "warn");
        let (child, port) = crate::helpers::spawn_server(cmd);
        let server = Server(child);
        let base = format!("http://127.0.0.1:{port}");
        crate::helpers::wait_ready(client, &base).await;
        (server, base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn the_error_export_of_a_large_batch_streams_in_constant_memory(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (url, pg) = crate::helpers::own_database(&backend, dir.path(), "export").await;
    let key = key_plaintext("big");
    std::fs::write(
        dir.path().join("base.toml"),
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\nmax_body_bytes = 4194304\n\
             [database]\nurl = \"{url}\"\n[worker]\nsecret = \"export-worker-secret-value\"\n\
             [admin]\ntoken = \"export-admin-token-value\"\n\
             [keys.big]\nkey_sha256 = \"{}\"\ninitial_credits = 1000000\nmax_batch_items = {ITEMS}\n",
            sha256(&key)
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    let client = reqwest::Client::new();
    let (server, base) = Server::start(dir.path(), &client).await;
    let r = client
        .post(format!("{base}/api/enterprise/video-batch"))
        .header("x-api-key", &key)
        .json(&TestApp::batch_body(Some("big"), ITEMS))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let batch_id = r.json::<serde_json::Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Every item failed with a long message, written straight into the store (the export reads
    // items; how they came to fail does not matter here).
    let db = sea_orm::Database::connect(&url).await.unwrap();
    let message = "m".repeat(MESSAGE_CHARS);
    let changed = db
        .execute_unprepared(&format!(
            "UPDATE batch_item SET status = 'failed', error_code = 'model_error', \
             error = '{message}' WHERE batch_id = (SELECT id FROM batch_job WHERE request_id = 'big')"
        ))
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, ITEMS as u64);
    drop(db);
    // A fresh process for the export: what the create allocated is not there to be reused.
    drop(server);
    let (server, base) = Server::start(dir.path(), &client).await;
    let pid = server.0.id();

    // Sample the server's resident memory while the export runs.
    let before = proc_kib(pid, "VmRSS");
    let (running, peak) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicU64::new(before)),
    );
    let sampler = {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                peak.fetch_max(proc_kib(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut r = client
        .get(format!(
            "{base}/api/enterprise/video-batch/{batch_id}/errors"
        ))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let (mut lines, mut bytes, mut first) = (0usize, 0usize, None);
    while let Some(chunk) = r.chunk().await.unwrap() {
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        if first.is_none() {
            first = Some(String::from_utf8_lossy(&chunk[..chunk.len().min(200)]).to_string());
        }
    }
    running.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let grew_mib = peak.saturating_sub(before) / 1024;
    let export_mib = bytes / (1024 * 1024);
    eprintln!(
        "error export of {lines} items, {export_mib} MiB: server RSS {} MiB before, {} MiB at most during (+{grew_mib} MiB)",
        before / 1024,
        peak / 1024
    );
    assert_eq!(lines, ITEMS, "one line per failed item");
    assert!(
        first
            .as_deref()
            .unwrap_or_default()
            .contains("\"error_code\":\"model_error\""),
        "{first:?}"
    );
    assert!(export_mib >= 190, "the export is {export_mib} MiB");
    // Pages of items, the read pool's page caches and the socket's buffers, not the export.
    assert!(
        before > 0 && grew_mib < 80,
        "the server grew by {grew_mib} MiB while streaming a {export_mib} MiB export"
    );
    drop(server);
    if let Some(pg) = pg {
        pg.drop_now().await;
    }
}

/// `Accept: application/octet-stream` gets the same lines as a download (what stock SDK
/// generators ask for); no `Accept`, `*/*` or both forms get JSON Lines.
async fn an_export_comes_as_a_download_when_asked_for(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let id = app.created_batch_id(&key, "dl", 3).await;
    let get = |accept: Option<&'static str>| {
        let mut r = app
            .client
            .get(format!(
                "{}/api/enterprise/video-batch/{id}/results",
                app.base
            ))
            .header("x-api-key", &key);
        if let Some(a) = accept {
            r = r.header("accept", a);
        }
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            (ct, r.text().await.unwrap())
        }
    };
    let (ct, lines) = get(None).await;
    assert_eq!(ct, "application/x-ndjson");
    assert_eq!(lines.lines().count(), 3);
    for accept in ["*/*", "application/x-ndjson, application/octet-stream"] {
        assert_eq!(
            get(Some(accept)).await,
            (ct.clone(), lines.clone()),
            "{accept}"
        );
    }
    assert_eq!(
        get(Some("application/octet-stream")).await,
        ("application/octet-stream".to_string(), lines.clone())
    );
}
