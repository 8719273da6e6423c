//! Helpers for `scripts/bench.sh` (one binary, several subcommands, so one link step).
//!
//! ```text
//! bench http-ceiling  --bind 127.0.0.1:PORT
//!     L_http: a trivial poem server answering POST /api/enterprise/video-batch with the same
//!     request headers, JSON body extraction, response headers and body shape as the real
//!     create, and no database. Runs until killed.
//! bench db-ceiling    --url URL --conc 4,16 --seconds 5 [--items 2] [--max-connections 16]
//!     L_db: migrates URL (a fresh database) with api::db, then runs one create as the service
//!     does (rate-limit hit, idempotency lookup, then `write_new_batch` in one transaction) in a
//!     closed loop with CONC tasks on the same driver and pool settings as the server, one commit
//!     per create. One JSON line per level.
//! bench claim-ceiling --url URL --conc 2,8 --seconds 5 [--preload 50000] [--batch-items 100]
//!     L_claim: the service's claim (10 items) + complete, per item, one commit each, in a
//!     closed loop with CONC workers, on a fresh migrated database preloaded before each level.
//! bench preload       --base http://127.0.0.1:PORT --key KEY --items 50000 [--batch-items 100]
//!     Creates batches over HTTP so that the worker phase has items to claim.
//! bench worker        --base http://127.0.0.1:PORT --secret S --conc 8 --seconds 5
//!     The worker phase over HTTP: CONC workers each claim 10 items then complete them one by
//!     one. One JSON line.
//! bench webhooks      --url URL --key bench --receiver 127.0.0.1:PORT [--n 5000] [--rate 200] [--seconds 10] [--tarpit 0]
//!                     [--backlog 100000] [--backlog-seconds 10]
//!     Webhook delivery of a running server whose key `bench` targets http://RECEIVER/hook: a
//!     receiver answering 200 at once counts arrivals; N pending deliveries are written into the
//!     outbox at once (throughput: deliveries/s until the last arrives), then RATE per second for
//!     SECONDS (delay from commit to receipt, p50/p99), then TARPIT deliveries to a receiver that
//!     accepts connections and never answers followed by N more to the fast one (deliveries/s of
//!     those beside the dead endpoint), then BACKLOG at once, received for BACKLOG_SECONDS (the
//!     server's memory with that many pending). One JSON line.
//! ```
//! `db-ceiling` and `claim-ceiling` also take `--clk-tck N` (default 100) to report their own
//! CPU time per operation. Both run the service's own functions (`write_new_batch`, `claim_in`,
//! `complete_in`, which run the statements of `api::store`), one commit per call: the design
//! before group commit, measured without HTTP. Their SQL is nowhere else.
//! Every loop is bounded by `--seconds` (plus a short warm-up); every level prints one JSON
//! object on stdout; progress goes to stderr.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use serde_json::json;
use uuid::Uuid;

use api::db::begin_write;
use api::domain::{NewBatch, NewItem};
use api::service::batches::{AuditInfo, NewBatchUnit, write_new_batch};
use api::service::leases::{claim_in, complete_in};
use api::service::rate_limit;
use api::service::usage::UsageRow;
use api::state::Runtime;
use api::store::unit::{GroupMemo, Txn};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, Set};

/// The body every create of the benchmark sends (two items, like the issue asks).
const PROMPTS: [(&str, Option<&str>); 2] = [
    ("a red fox at dawn", Some(r#"{"duration_s":5}"#)),
    ("a city at night in the rain", None),
];
const COST: i64 = 10;
/// `worker.max_attempts` of config/base.toml.
const MAX_ATTEMPTS: u32 = 3;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let opts = Opts::parse(args)?;
    match cmd.as_str() {
        "http-ceiling" => http_ceiling(&opts.str("bind")?).await,
        "db-ceiling" => db_ceiling(&opts).await,
        "claim-ceiling" => claim_ceiling(&opts).await,
        "preload" => preload_http(&opts).await,
        "worker" => worker_http(&opts).await,
        "webhooks" => webhooks_bench(&opts).await,
        _ => bail!(
            "usage: bench <http-ceiling|db-ceiling|claim-ceiling|preload|worker> --flag value ... \
             (see the comment at the top of examples/bench.rs)"
        ),
    }
}

/// `--name value` pairs.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let mut m = HashMap::new();
        while let Some(a) = args.next() {
            let name = a
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("expected --flag, got {a:?}"))?;
            let v = args
                .next()
                .ok_or_else(|| anyhow!("--{name} needs a value"))?;
            m.insert(name.to_string(), v);
        }
        Ok(Self(m))
    }
    fn str(&self, k: &str) -> Result<String> {
        self.0
            .get(k)
            .cloned()
            .ok_or_else(|| anyhow!("--{k} is required"))
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| anyhow!("--{k}: not a number: {v}")),
        }
    }
    fn levels(&self) -> Result<Vec<usize>> {
        self.str("conc")?
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| anyhow!("--conc: {s}")))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Webhook delivery

/// Arrivals at the receiver: when, and the delay since the event's commit (`data.committed_at`).
#[derive(Default)]
struct Arrivals {
    at: std::sync::Mutex<Vec<(Instant, Option<f64>)>>,
}

async fn webhooks_bench(opts: &Opts) -> Result<()> {
    use poem::web::Data;
    use poem::{EndpointExt, Route, Server, handler, listener::TcpListener, post};

    #[handler]
    fn hook(body: String, arrivals: Data<&Arc<Arrivals>>) -> poem::http::StatusCode {
        let delay = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["data"]["committed_at"].as_str().map(str::to_string))
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .map(|t| (Utc::now() - t).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        if let Ok(mut a) = arrivals.at.lock() {
            a.push((Instant::now(), delay));
        }
        poem::http::StatusCode::OK
    }

    let n: usize = opts.num("n", 5000)?;
    let rate: usize = opts.num("rate", 200)?;
    let seconds: u64 = opts.num("seconds", 10)?;
    let receiver = opts.str("receiver")?;
    let arrivals = Arc::new(Arrivals::default());
    let app = Route::new()
        .at("/hook", post(hook))
        .data(Arc::clone(&arrivals));
    tokio::spawn(Server::new(TcpListener::bind(receiver.clone())).run(app));
    let db = api::db::connect_url(&opts.str("url")?, 4, None).await?;
    let key_name = opts.str("key")?;
    let key_id = api::service::keys::account_of_key(&db, &key_name)
        .await?
        .ok_or_else(|| anyhow!("no key named {key_name}"))?
        .0
        .0;
    let fast = format!("http://{receiver}/hook");
    let seed_to = |count: usize, target: String| {
        let db = db.clone();
        async move {
            let now = Utc::now();
            let rows: Vec<entity::webhook_delivery::ActiveModel> = (0..count)
                .map(|_| {
                    use sea_orm::ActiveValue::Set;
                    let payload = json!({
                        "type": "batch.cancelled", "timestamp": now.to_rfc3339(),
                        "data": { "batch_id": Uuid::now_v7(), "committed_at": now.to_rfc3339() }
                    });
                    entity::webhook_delivery::ActiveModel {
                        id: Set(Uuid::now_v7()),
                        api_key_id: Set(key_id),
                        batch_id: Set(None),
                        event_type: Set("batch.cancelled".into()),
                        payload: Set(payload.to_string()),
                        target_url: Set(target.clone()),
                        status: Set("pending".into()),
                        attempt_count: Set(0),
                        next_attempt_at: Set(now),
                        locked_until: Set(None),
                        last_status_code: Set(None),
                        last_error: Set(None),
                        created_at: Set(now),
                        updated_at: Set(now),
                        delivered_at: Set(None),
                        held_at: Set(None),
                        resend_key: Set(None),
                        recovered_at: Set(None),
                    }
                })
                .collect();
            use sea_orm::EntityTrait;
            for chunk in rows.chunks(500) {
                entity::webhook_delivery::Entity::insert_many(chunk.to_vec())
                    .exec(&db)
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    let seed = |count: usize| seed_to(count, fast.clone());
    let count = || arrivals.at.lock().map(|a| a.len()).unwrap_or(0);
    // Throughput: N events committed at once, delivered as fast as the receiver answers.
    let t0 = Instant::now();
    seed(n).await?;
    let deadline = t0 + Duration::from_secs(300);
    while count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = count();
    let last = arrivals
        .at
        .lock()
        .ok()
        .and_then(|a| a.last().map(|x| x.0))
        .unwrap_or_else(Instant::now);
    let per_s = delivered as f64 / last.duration_since(t0).as_secs_f64().max(1e-6);
    eprintln!("webhooks: {delivered} of {n} delivered, {per_s:.0}/s");
    // Steady rate: RATE events per second, committed in tenths of a second.
    let before = count();
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        seed(per_tick).await?;
        sent += per_tick;
        tokio::time::sleep(tick.saturating_sub(t.elapsed())).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() < before + sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut delays: Vec<f64> = arrivals
        .at
        .lock()
        .map(|a| a[before..].iter().filter_map(|x| x.1).collect())
        .unwrap_or_default();
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
    };
    let steady_received = count() - before;
    // Isolation: a receiver that accepts connections and never answers holds TARPIT
    // deliveries, committed first, while N more go to the fast receiver: their deliveries/s.
    let tarpit: usize = opts.num("tarpit", 0)?;
    let mut tarpit_per_s = None;
    if tarpit > 0 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let dead = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        seed_to(tarpit, dead).await?;
        let before = count();
        let t0 = Instant::now();
        seed(n).await?;
        let deadline = t0 + Duration::from_secs(300);
        while count() < before + n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = count() - before;
        let per_s = got as f64 / t0.elapsed().as_secs_f64().max(1e-6);
        eprintln!("webhooks beside a tarpit: {got} of {n} delivered, {per_s:.0}/s");
        tarpit_per_s = Some(per_s);
    }
    // Backlog: BACKLOG more events at once, received for BACKLOG_SECONDS (the script reads the
    // server's peak RSS afterwards: memory with that many deliveries pending).
    let backlog: usize = opts.num("backlog", 0)?;
    let backlog_seconds: u64 = opts.num("backlog-seconds", 10)?;
    let before = count();
    if backlog > 0 {
        seed(backlog).await?;
        tokio::time::sleep(Duration::from_secs(backlog_seconds)).await;
    }
    println!(
        "{}",
        json!({
            "n": n, "delivered": delivered, "deliveries_per_s": per_s,
            "steady_rate": rate, "steady_sent": sent, "steady_received": steady_received,
            "delay_p50_ms": pct(0.5), "delay_p99_ms": pct(0.99),
            "tarpit": tarpit, "tarpit_deliveries_per_s": tarpit_per_s,
            "backlog": backlog, "backlog_seconds": backlog_seconds,
            "backlog_received": count() - before,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers

/// Counts completed operations (and their latencies) inside the measurement window only.
struct Window {
    start: Instant,
    end: Instant,
    ok: AtomicU64,
    units: AtomicU64,
    /// Every successful operation and unit of the run, warm-up and tail included (for CPU time
    /// per request, which the script measures over the whole process run).
    all_ops: AtomicU64,
    all_units: AtomicU64,
    errors: AtomicU64,
    lat_us: std::sync::Mutex<Vec<u32>>,
    first_error: std::sync::Mutex<Option<String>>,
    /// When the queue first ran dry (worker loops): the window ends there.
    dry_at: std::sync::Mutex<Option<Instant>>,
}

impl Window {
    fn new(warmup: Duration, seconds: f64) -> Arc<Self> {
        let start = Instant::now() + warmup;
        Arc::new(Self {
            start,
            end: start + Duration::from_secs_f64(seconds),
            ok: AtomicU64::new(0),
            units: AtomicU64::new(0),
            all_ops: AtomicU64::new(0),
            all_units: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            lat_us: Default::default(),
            first_error: Default::default(),
            dry_at: Default::default(),
        })
    }
    fn over(&self) -> bool {
        Instant::now() >= self.end
    }
    /// Records one operation that began at `began`; `units` is what it produced (items).
    fn record(&self, began: Instant, units: u64, err: Option<String>) {
        let now = Instant::now();
        if err.is_none() {
            self.all_ops.fetch_add(1, Ordering::Relaxed);
            self.all_units.fetch_add(units, Ordering::Relaxed);
        }
        if began < self.start || now > self.end {
            return;
        }
        match err {
            None => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.units.fetch_add(units, Ordering::Relaxed);
                let us = now.duration_since(began).as_micros().min(u32::MAX as u128) as u32;
                self.lat_us.lock().unwrap().push(us);
            }
            Some(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().unwrap().get_or_insert(e);
            }
        }
    }
    /// Notes that there was no more work; the rate is then taken over the span until now.
    fn mark_dry(&self) {
        self.dry_at.lock().unwrap().get_or_insert_with(Instant::now);
    }
    /// The level's JSON summary over the window (cut short where the work ran dry).
    fn summary(&self, seconds: f64) -> serde_json::Value {
        let dry = *self.dry_at.lock().unwrap();
        let seconds = match dry {
            Some(t) if t < self.end => t
                .saturating_duration_since(self.start)
                .as_secs_f64()
                .max(1e-3),
            _ => seconds,
        };
        let mut lat = std::mem::take(&mut *self.lat_us.lock().unwrap());
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((p / 100.0) * (lat.len() as f64 - 1.0)).round() as usize;
            lat[i.min(lat.len() - 1)] as f64 / 1000.0
        };
        let ok = self.ok.load(Ordering::Relaxed);
        let units = self.units.load(Ordering::Relaxed);
        json!({
            "ok": ok,
            "errors": self.errors.load(Ordering::Relaxed),
            "first_error": *self.first_error.lock().unwrap(),
            "seconds": seconds,
            "ran_dry": dry.is_some(),
            "ops_per_s": ok as f64 / seconds,
            "units_per_s": units as f64 / seconds,
            "p50_ms": pct(50.0),
            "p99_ms": pct(99.0),
            "p999_ms": pct(99.9),
            "all_ops": self.all_ops.load(Ordering::Relaxed),
            "all_units": self.all_units.load(Ordering::Relaxed),
        })
    }
}

fn warmup(seconds: f64) -> Duration {
    Duration::from_secs_f64((seconds / 5.0).clamp(0.3, 1.0))
}

// ---------------------------------------------------------------------------------------------
// L_http: the HTTP layer alone

async fn http_ceiling(bind: &str) -> Result<()> {
    use poem::http::{HeaderMap, StatusCode};
    use poem::listener::TcpListener;
    use poem::web::Json;
    use poem::{Response, Route, Server, handler, post};

    /// Same inputs as `create_batch` (the key header, an optional Idempotency-Key, a JSON body)
    /// and the same outputs (201, the created body, quota headers, x-request-id).
    #[handler]
    fn create(headers: &HeaderMap, body: Json<serde_json::Value>) -> Response {
        let Some(_key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) else {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .finish();
        };
        let _idem = headers.get("idempotency-key");
        let n = body.0["items"].as_array().map(|a| a.len()).unwrap_or(0) as i64;
        let rid = format!("req_{}", Uuid::now_v7().simple());
        let out = json!({
            "ok": true, "request_id": rid, "batch_id": Uuid::now_v7(), "idempotent_replay": false,
            "status": "queued", "total_count": n, "cost_per_video": COST,
            "required_credits": n * COST, "available_credits": 1_000_000_000_000i64,
            "remaining_credits": 1_000_000_000_000i64 - n * COST, "created_at": Utc::now(),
        });
        let x_request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        Response::builder()
            .status(StatusCode::CREATED)
            .content_type("application/json; charset=utf-8")
            .header("ratelimit-policy", "\"batch\";q=1000000000;w=60")
            .header("ratelimit", "\"batch\";r=999999999;t=31")
            .header("x-ratelimit-limit", "1000000000")
            .header("x-ratelimit-remaining", "999999999")
            .header("x-ratelimit-reset", "31")
            .header("x-request-id", x_request_id)
            .body(out.to_string())
    }

    let app = Route::new().at("/api/enterprise/video-batch", post(create));
    eprintln!("http-ceiling listening on {bind}");
    Server::new(TcpListener::bind(bind.to_string()))
        .run(app)
        .await
        .context("serving")
}

// ---------------------------------------------------------------------------------------------
// Raw statements on the server's driver (sea-orm over sqlx), the same SQL as api/src/service

/// Migrates URL (a fresh database) and adds one account (with one key) with a large wallet;
/// returns the server's pool layout on it.
async fn fresh_db(url: &str, max_connections: u32) -> Result<(Pools, i64)> {
    let db = api::db::connect_url(url, max_connections, None).await?;
    api::db::migrate(&db).await?;
    let writer = if db.get_database_backend() == DbBackend::Sqlite {
        api::db::connect_url(url, 1, None).await?
    } else {
        db.clone()
    };
    let now = Utc::now();
    // The account owns the wallet and everything the loops write (`key_id` is its id).
    let key_id = entity::account::Entity::insert(entity::account::ActiveModel {
        name: Set("bench".into()),
        disabled: Set(false),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec(&db)
    .await?
    .last_insert_id;
    let key = entity::api_key::Entity::insert(entity::api_key::ActiveModel {
        name: Set("bench".into()),
        key_sha256: Set("0".repeat(64)),
        disabled: Set(false),
        account_id: Set(Some(key_id)),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec(&db)
    .await?
    .last_insert_id;
    entity::credit_wallet::Entity::insert(entity::credit_wallet::ActiveModel {
        api_key_id: Set(key_id),
        balance: Set(1_000_000_000_000_000),
        held: Set(0),
        updated_at: Set(now),
    })
    .exec(&db)
    .await?;
    Ok((
        Pools {
            db,
            writer,
            runtime: bench_runtime()?,
            key,
        },
        key_id,
    ))
}

/// PostgreSQL only: fresh planner statistics. The PostgreSQL this was written on runs with
/// autovacuum off; without statistics, plans cached on a young database go stale as it grows
/// (see docs/benchmarks.md). The script does the same for the server's database.
async fn analyze(db: &DatabaseConnection) -> Result<()> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared("ANALYZE").await?;
    }
    Ok(())
}

/// The server's two pools: reads, and the writes' (SQLite: a pool of one connection, so
/// writers queue in the application; PostgreSQL: the same pool), as `api::db::writer_for`;
/// and the settings of `config/` the service functions read.
#[derive(Clone)]
struct Pools {
    db: DatabaseConnection,
    writer: DatabaseConnection,
    runtime: Arc<Runtime>,
    /// The bench key (`api_key.id`), named on the audit rows as the service names the caller's.
    key: i64,
}

/// The settings of `config/` (no keys are indexed: nothing here subscribes to webhooks).
fn bench_runtime() -> Result<Arc<Runtime>> {
    let settings = api::settings::ConfigSource {
        dir: "config".into(),
        environment: "local".into(),
        ..Default::default()
    }
    .load()
    .map_err(|e| anyhow!("loading config/: {e:?}"))?;
    Ok(Arc::new(Runtime::new(settings, &Default::default())))
}

/// One create as the service runs it, with the service's own functions, but committed on its
/// own (the design without group commit): the rate-limit hit (autocommit), the idempotency
/// lookup, then `service::batches::write_new_batch` in one transaction.
async fn raw_create(p: &Pools, key_id: i64, n_items: usize) -> Result<()> {
    let w = &p.writer;
    let now = Utc::now();
    rate_limit::hit(
        w,
        api::domain::ids::AccountId(key_id),
        rate_limit::SCOPE_BATCH,
        u32::MAX,
        now,
    )
    .await?;
    let rid = format!("req_{}", Uuid::now_v7().simple());
    if api::store::jobs::by_request_id(w, api::domain::ids::AccountId(key_id), &rid)
        .await?
        .is_some()
    {
        bail!("request id reused");
    }
    let items = (0..n_items)
        .map(|i| {
            let (prompt, params) = PROMPTS[i % PROMPTS.len()];
            NewItem {
                prompt: prompt.to_string(),
                params: params.map(str::to_string),
                source_idx: None,
            }
        })
        .collect();
    let unit = NewBatchUnit {
        key_id,
        rid,
        fingerprint: "f".repeat(64),
        batch: NewBatch {
            items,
            webhook_url: None,
            metadata: Some(r#"{"campaign":"bench"}"#.to_string()),
            completion_window: None,
        },
        batch_id: Uuid::now_v7(),
        n: n_items as i64,
        cost: COST,
        need: n_items as i64 * COST,
        now,
        // As the service does with the default window of config/base.toml.
        expires_at: Some(now + chrono::Duration::hours(24)),
        audit: AuditInfo {
            row: UsageRow {
                api_key_id: Some(p.key),
                account_id: Some(key_id),
                method: "POST".into(),
                path: "/api/enterprise/video-batch".into(),
                client_ip: Some("127.0.0.1".into()),
                user_agent: Some("oha/1".into()),
                ..Default::default()
            },
            started: Instant::now(),
            now,
            quota: None,
            record: None,
        },
        retry_of: None,
    };
    let txn = begin_write(w).await?;
    let memo = GroupMemo::default();
    let t = Txn::new(&txn, &memo);
    let written = write_new_batch(&t, &unit)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if written.is_none() {
        bail!("batch conflict");
    }
    api::store::appended::write_unit(&t).await?;
    drop(t);
    txn.commit().await?;
    Ok(())
}

/// utime + stime of this process, in clock ticks (for CPU time per operation).
fn self_cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Adds `cpu_ms_per_op` / `cpu_ms_per_unit` (whole level, warm-up included) to a summary.
fn add_cpu(s: &mut serde_json::Value, ticks: u64, hz: f64) {
    let ms = ticks as f64 * 1000.0 / hz;
    let ops = s["all_ops"].as_f64().unwrap_or(0.0);
    let units = s["all_units"].as_f64().unwrap_or(0.0);
    s["cpu_ms_per_op"] = if ops > 0.0 {
        json!(ms / ops)
    } else {
        json!(null)
    };
    s["cpu_ms_per_unit"] = if units > 0.0 {
        json!(ms / units)
    } else {
        json!(null)
    };
}

async fn db_ceiling(o: &Opts) -> Result<()> {
    let url = o.str("url")?;
    let seconds: f64 = o.num("seconds", 5.0)?;
    let items: usize = o.num("items", 2)?;
    let hz: f64 = o.num("clk-tck", 100.0)?;
    let (pools, key_id) = fresh_db(&url, o.num("max-connections", 16)?).await?;
    // Some rows first, then fresh planner statistics, as autovacuum would give the server.
    for _ in 0..500 {
        raw_create(&pools, key_id, items).await?;
    }
    analyze(&pools.db).await?;
    for conc in o.levels()? {
        let w = Window::new(warmup(seconds), seconds);
        let cpu0 = self_cpu_ticks();
        let tasks: Vec<_> = (0..conc)
            .map(|_| {
                let (pools, w) = (pools.clone(), Arc::clone(&w));
                tokio::spawn(async move {
                    while !w.over() {
                        let t = Instant::now();
                        let r = raw_create(&pools, key_id, items).await;
                        w.record(t, items as u64, r.err().map(|e| format!("{e:#}")));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        let mut s = w.summary(seconds);
        add_cpu(&mut s, self_cpu_ticks() - cpu0, hz);
        s["what"] = json!("L_db");
        s["conc"] = json!(conc);
        println!("{s}");
    }
    pools.db.close().await?;
    pools.writer.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// L_claim: claim 10 + complete each, as service::leases runs them

struct Claimed {
    item_id: Uuid,
    token: Uuid,
}

/// A claim of `max` items as the service runs it (`service::leases::claim_in`), committed on
/// its own.
async fn raw_claim(p: &Pools, worker: &str, max: u32) -> Result<Vec<Claimed>> {
    let txn = begin_write(&p.writer).await?;
    let memo = GroupMemo::default();
    let t = Txn::new(&txn, &memo);
    let items = claim_in(
        &t,
        worker,
        max,
        chrono::Duration::seconds(300),
        MAX_ATTEMPTS,
        &Default::default(),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    api::store::appended::write_unit(&t).await?;
    drop(t);
    txn.commit().await?;
    Ok(items
        .into_iter()
        .map(|i| Claimed {
            item_id: i.item_id,
            token: i.lease_token,
        })
        .collect())
}

/// A success report as the service runs it (`service::leases::complete_in`), committed on its
/// own.
async fn raw_complete(p: &Pools, item_id: Uuid, token: Uuid) -> Result<()> {
    let txn = begin_write(&p.writer).await?;
    let memo = GroupMemo::default();
    let t = Txn::new(&txn, &memo);
    complete_in(
        &t,
        &p.runtime,
        api::domain::ids::ItemId(item_id),
        api::domain::ids::LeaseToken(token),
        "https://cdn.example/v.mp4",
        None,
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    api::store::appended::write_unit(&t).await?;
    drop(t);
    txn.commit().await?;
    Ok(())
}

async fn claim_ceiling(o: &Opts) -> Result<()> {
    let url = o.str("url")?;
    let seconds: f64 = o.num("seconds", 5.0)?;
    let preload: usize = o.num("preload", 50_000)?;
    let per_batch: usize = o.num("batch-items", 100)?;
    let hz: f64 = o.num("clk-tck", 100.0)?;
    let (pools, key_id) = fresh_db(&url, o.num("max-connections", 16)?).await?;
    let db = pools.writer.clone();
    for conc in o.levels()? {
        let t = Instant::now();
        for _ in 0..preload.div_ceil(per_batch) {
            raw_create(&pools, key_id, per_batch).await?;
        }
        analyze(&db).await?;
        eprintln!(
            "claim-ceiling: preloaded {preload} items in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let w = Window::new(warmup(seconds), seconds);
        let cpu0 = self_cpu_ticks();
        let tasks: Vec<_> = (0..conc)
            .map(|i| {
                let (pools, w) = (pools.clone(), Arc::clone(&w));
                tokio::spawn(async move {
                    let worker = format!("bench-{i}");
                    while !w.over() {
                        let t = Instant::now();
                        match raw_claim(&pools, &worker, 10).await {
                            Err(e) => w.record(t, 0, Some(format!("claim: {e:#}"))),
                            Ok(items) if items.is_empty() => {
                                w.mark_dry();
                                break;
                            }
                            Ok(items) => {
                                w.record(t, 0, None);
                                for it in items {
                                    let t = Instant::now();
                                    let r = raw_complete(&pools, it.item_id, it.token).await;
                                    w.record(t, 1, r.err().map(|e| format!("complete: {e:#}")));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        let cpu = self_cpu_ticks() - cpu0;
        // Leave nothing running for the next level.
        {
            use entity::batch_item::{Column, Entity};
            Entity::update_many()
                .col_expr(Column::Status, "cancelled".into())
                .col_expr(Column::LeaseToken, Option::<Uuid>::None.into())
                .filter(Column::Status.is_in(["queued", "running"]))
                .exec(&db)
                .await?;
        }
        let mut s = w.summary(seconds);
        add_cpu(&mut s, cpu, hz);
        s["what"] = json!("L_claim");
        s["conc"] = json!(conc);
        println!("{s}");
    }
    drop(db);
    pools.writer.close().await?;
    pools.db.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The worker phase over HTTP

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn preload_http(o: &Opts) -> Result<()> {
    let base = o.str("base")?;
    let key = o.str("key")?;
    let items: usize = o.num("items", 50_000)?;
    let per_batch: usize = o.num("batch-items", 100)?;
    let http = client()?;
    let body = json!({
        "items": (0..per_batch).map(|i| {
            let (prompt, params) = PROMPTS[i % PROMPTS.len()];
            json!({ "prompt": prompt, "params": params.map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap()) })
        }).collect::<Vec<_>>()
    })
    .to_string();
    let batches = items.div_ceil(per_batch);
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (http, base, key, body, next) = (
                http.clone(),
                base.clone(),
                key.clone(),
                body.clone(),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < batches as u64 {
                    let r = http
                        .post(format!("{base}/api/enterprise/video-batch"))
                        .header("x-api-key", &key)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    if r.status() != 201 {
                        let s = r.status();
                        bail!(
                            "preload create: {s}: {}",
                            r.text().await.unwrap_or_default()
                        );
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    eprintln!(
        "preload: {batches} batches of {per_batch} items in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn worker_http(o: &Opts) -> Result<()> {
    let base = o.str("base")?;
    let secret = o.str("secret")?;
    let seconds: f64 = o.num("seconds", 5.0)?;
    let conc: usize = o.num("conc", 8)?;
    let http = client()?;
    let w = Window::new(warmup(seconds), seconds);
    let claims = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..conc)
        .map(|i| {
            let (http, base, secret) = (http.clone(), base.clone(), secret.clone());
            let (w, claims) = (Arc::clone(&w), Arc::clone(&claims));
            tokio::spawn(async move {
                let auth = format!("Bearer {secret}");
                let claim_body = json!({ "worker_id": format!("bench-{i}"), "max_items": 10 }).to_string();
                while !w.over() {
                    let t = Instant::now();
                    let r = async {
                        let r = http
                            .post(format!("{base}/api/internal/worker/claim"))
                            .header("authorization", &auth)
                            .header("content-type", "application/json")
                            .body(claim_body.clone())
                            .send()
                            .await?;
                        let status = r.status();
                        let v: serde_json::Value = r.json().await?;
                        if status != 200 {
                            bail!("claim: {status}: {v}");
                        }
                        Ok::<_, anyhow::Error>(v)
                    }
                    .await;
                    let items = match r {
                        Err(e) => {
                            w.record(t, 0, Some(format!("{e:#}")));
                            continue;
                        }
                        Ok(v) => v["items"].as_array().cloned().unwrap_or_default(),
                    };
                    if items.is_empty() {
                        w.mark_dry();
                        break;
                    }
                    w.record(t, 0, None);
                    if t >= w.start {
                        claims.fetch_add(1, Ordering::Relaxed);
                    }
                    for it in items {
                        let t = Instant::now();
                        let id = it["item_id"].as_str().unwrap_or_default();
                        let body = json!({ "lease_token": it["lease_token"], "result_url": "https://cdn.example/v.mp4" });
                        let r = http
                            .post(format!("{base}/api/internal/worker/items/{id}/complete"))
                            .header("authorization", &auth)
                            .header("content-type", "application/json")
                            .body(body.to_string())
                            .send()
                            .await;
                        let err = match r {
                            Err(e) => Some(format!("complete: {e}")),
                            Ok(r) if r.status() != 200 => Some(format!(
                                "complete: {}: {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Ok(r) => {
                                let _ = r.bytes().await;
                                None
                            }
                        };
                        w.record(t, 1, err);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let mut s = w.summary(seconds);
    s["what"] = json!("worker_http");
    s["conc"] = json!(conc);
    s["claims"] = json!(claims.load(Ordering::Relaxed));
    println!("{s}");
    Ok(())
}
