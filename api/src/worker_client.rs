//! The reference worker: claims items over the worker API, runs a renderer command per item,
//! heartbeats while it runs, and reports complete or fail.
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::domain::failure::FailureCode;
use clap::Args;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Options of `video-batch-api worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Server base URL.
    #[arg(long, env = "BASE_URL", default_value = "http://127.0.0.1:8080")]
    pub base_url: String,
    /// Worker secret (`[worker] secret`).
    #[arg(long, env = "INTERNAL_WORKER_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Items rendered at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Command run per item; gets ITEM_ID, BATCH_ID, PROMPT, PARAMS_JSON, ATTEMPT and the item
    /// JSON on stdin; the last line of its stdout is the result URL. When it fails (exits
    /// non-zero), a last line of stderr `error_code=CODE` (e.g. `error_code=content_policy`)
    /// reports that code; otherwise the failure is `internal`. A render that runs out of time
    /// is `render_timeout`.
    #[arg(long)]
    pub renderer_cmd: String,
    /// Name reported to the server.
    #[arg(long, default_value = "reference-worker")]
    pub worker_id: String,
    /// Lease asked for each claim.
    #[arg(long, default_value_t = 120)]
    pub lease_seconds: u32,
    /// Renderer time limit.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
    /// Exit when a claim returns nothing (instead of polling).
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Seconds between claims when idle.
    #[arg(long, default_value_t = 2)]
    pub poll_seconds: u64,
}

struct Stats {
    done: AtomicU64,
    failed: AtomicU64,
}

/// Runs until Ctrl-C (or until idle with `--exit-when-idle`): stops claiming, finishes what it holds.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let args = Arc::new(args);
    let stats = Arc::new(Stats {
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let started = Instant::now();
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stopping = Arc::clone(&stopping);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping: no new claims; finishing the items held");
            stopping.store(true, Ordering::SeqCst);
            stop.notify_waiters();
        });
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    // Consecutive claims that failed for a reason that may pass (server restarting, 5xx).
    let mut failures: u32 = 0;
    while !stopping.load(Ordering::SeqCst) {
        let free = slots.available_permits();
        if free == 0 {
            tasks.join_next().await;
            continue;
        }
        let resp = client
            .post(format!("{}/api/internal/worker/claim", args.base_url))
            .bearer_auth(&args.secret)
            .json(&json!({ "worker_id": args.worker_id, "max_items": free, "lease_seconds": args.lease_seconds }))
            .send()
            .await;
        let claimed = match resp {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.map_err(|e| e.to_string()),
            Ok(r) if r.status().is_client_error() => {
                // A refused secret or request will not pass by waiting: stop and say why.
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                anyhow::bail!("claim refused: {status}: {body}");
            }
            Ok(r) => Err(format!("server answered {}", r.status())),
            Err(e) => Err(e.to_string()),
        };
        let items = match claimed {
            Ok(v) => {
                failures = 0;
                v["items"].as_array().cloned().unwrap_or_default()
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures);
                eprintln!("claim failed: {e}; retrying in {:.1}s", wait.as_secs_f64());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {},
                    _ = stop.notified() => {},
                }
                continue;
            }
        };
        if items.is_empty() {
            if args.exit_when_idle && tasks.is_empty() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(args.poll_seconds)) => {},
                _ = stop.notified() => {},
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {},
            }
            continue;
        }
        for item in items {
            let permit = Arc::clone(&slots).acquire_owned().await?;
            let (client, args, stats) = (client.clone(), Arc::clone(&args), Arc::clone(&stats));
            tasks.spawn(async move {
                let ok = process(&client, &args, &item).await;
                if ok {
                    stats.done.fetch_add(1, Ordering::Relaxed)
                } else {
                    stats.failed.fetch_add(1, Ordering::Relaxed)
                };
                let done = stats.done.load(Ordering::Relaxed);
                let failed = stats.failed.load(Ordering::Relaxed);
                let rate = (done + failed) as f64 / started.elapsed().as_secs_f64().max(0.001);
                eprintln!("progress: {done} done, {failed} failed, {rate:.2} items/s");
                drop(permit);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    eprintln!(
        "worker finished: {} done, {} failed",
        stats.done.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Exponential backoff with full jitter: about 0.25 s, 0.5 s, 1 s … capped at 30 s.
fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(250)
        .saturating_mul(1 << failures.min(7))
        .min(Duration::from_secs(30));
    cap.mul_f64(rand::random_range(0.5..=1.0))
}

/// Reports an outcome; retries while the server is unreachable or answers 5xx (a restart must
/// not drop a finished render), for as long as the lease could still be live.
async fn report(
    client: &reqwest::Client,
    args: &WorkerArgs,
    item_id: &str,
    what: &str,
    body: Value,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.lease_seconds.max(30).into());
    let mut failures = 0;
    loop {
        let sent = client
            .post(format!(
                "{}/api/internal/worker/items/{item_id}/{what}",
                args.base_url
            ))
            .bearer_auth(&args.secret)
            .json(&body)
            .send()
            .await;
        let error = match sent {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                anyhow::bail!(
                    "{what} of {item_id}: {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Ok(r) => format!("server answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        failures += 1;
        if Instant::now() >= deadline {
            anyhow::bail!("{what} of {item_id}: gave up: {error}");
        }
        let wait = backoff(failures);
        eprintln!(
            "{what} of {item_id} failed: {error}; retrying in {:.1}s",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
}

/// Renders one item and reports it; true when it succeeded.
async fn process(client: &reqwest::Client, args: &WorkerArgs, item: &Value) -> bool {
    let item_id = item["item_id"].as_str().unwrap_or_default().to_string();
    let token = item["lease_token"].clone();
    let outcome = render(client, args, item).await;
    let (what, body) = match &outcome {
        Ok(url) => (
            "complete",
            json!({ "lease_token": token, "result_url": url }),
        ),
        Err(e) => (
            "fail",
            json!({ "lease_token": token, "error_code": failure_code(e), "message": failure_message(e) }),
        ),
    };
    if let Err(e) = report(client, args, &item_id, what, body).await {
        eprintln!("report failed: {e:#}");
        return false;
    }
    outcome.is_ok()
}

/// The code a failed render reports: the one its error carries, else `internal`.
fn failure_code(e: &anyhow::Error) -> &'static str {
    e.downcast_ref::<FailureCode>()
        .copied()
        .unwrap_or(FailureCode::Internal)
        .as_str()
}

/// What a failed render says: without the code it carries (sent beside it).
fn failure_message(e: &anyhow::Error) -> String {
    if e.downcast_ref::<FailureCode>().is_some() {
        e.root_cause().to_string()
    } else {
        format!("{e:#}")
    }
}

async fn render(
    client: &reqwest::Client,
    args: &WorkerArgs,
    item: &Value,
) -> anyhow::Result<String> {
    let item_id = item["item_id"].as_str().unwrap_or_default().to_string();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&args.renderer_cmd)
        .env("ITEM_ID", &item_id)
        .env("BATCH_ID", item["batch_id"].as_str().unwrap_or_default())
        .env("PROMPT", item["prompt"].as_str().unwrap_or_default())
        .env("PARAMS_JSON", item["params"].to_string())
        .env("ATTEMPT", item["attempt"].to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the renderer")?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(item.to_string().as_bytes()).await;
    }
    let heartbeat = {
        let (client, args, item_id, token) = (
            client.clone(),
            args.clone(),
            item_id.clone(),
            item["lease_token"].clone(),
        );
        tokio::spawn(async move {
            let every = Duration::from_secs(u64::from(args.lease_seconds / 3).max(1));
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = report(
                    &client,
                    &args,
                    &item_id,
                    "heartbeat",
                    json!({ "lease_token": token, "lease_seconds": args.lease_seconds }),
                )
                .await
                {
                    eprintln!("heartbeat failed: {e:#}");
                }
            }
        })
    };
    let output = tokio::time::timeout(
        Duration::from_secs(args.timeout_seconds),
        child.wait_with_output(),
    )
    .await;
    heartbeat.abort();
    let output = match output {
        Ok(o) => o.context("waiting for the renderer")?,
        Err(_) => {
            return Err(
                anyhow::anyhow!("renderer timed out after {}s", args.timeout_seconds)
                    .context(FailureCode::RenderTimeout),
            );
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let code = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("error_code="))
            .and_then(FailureCode::from_name)
            .filter(|c| *c != FailureCode::Expired)
            .unwrap_or(FailureCode::Internal);
        return Err(
            anyhow::anyhow!("renderer exited with {}: {}", output.status, tail.trim())
                .context(code),
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .context("renderer printed no result URL")
}
