//! A failing store: a full disk (SQLite at a page limit, and a real full file system), killed
//! connections and a database restart (PostgreSQL). Every 2xx is committed (read back through
//! a fresh connection), failures are `503 STORE_UNAVAILABLE` with `Retry-After` within 2 s,
//! reads are served while SQLite is full, and writes succeed again by themselves once the store
//! recovers; a retry with the same `request_id` never makes a second batch.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, assert_ledger_invariant, skipped};

/// Credits per item of the test key.
const COST: i64 = 10;
/// Items per batch created while the store fills.
const ITEMS: usize = 40;

fn builder(backend: Backend) -> crate::helpers::TestAppBuilder {
    TestApp::builder(backend).key(
        "acme",
        "initial_credits = 100000000\nrate_limit_per_min = 1000000\n\
         read_rate_limit_per_min = 1000000\nmax_batch_items = 500\ncost_per_video = 10",
    )
}

async fn scalar(db: &DatabaseConnection, sql: &str, values: Vec<sea_orm::Value>) -> i64 {
    let sql = match db.get_database_backend() {
        sea_orm::DbBackend::Sqlite => sql.replace("$1", "?"),
        _ => sql.to_string(),
    };
    db.query_one_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .await
    .expect("query")
    .expect("row")
    .try_get_by_index::<i64>(0)
    .expect("v")
}

/// What the calls made during a fault were answered.
#[derive(Default)]
struct Answers {
    /// request id → batch id, for creates answered 201.
    created: BTreeMap<String, String>,
    /// Request ids of creates answered 503.
    refused: Vec<String>,
    /// Items whose completion was answered 200.
    completed: Vec<String>,
    /// Items whose completion was answered 503.
    not_completed: Vec<String>,
    /// Grants answered 200, and 503.
    granted: usize,
    not_granted: usize,
}

/// Checks one 503: the one error shape, `STORE_UNAVAILABLE`, `Retry-After`.
async fn assert_store_unavailable(r: reqwest::Response) {
    assert_eq!(r.status(), 503);
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After missing");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["ok"], false);
    assert_eq!(body["error"], "STORE_UNAVAILABLE", "{body}");
}

/// Creates `n` batches of `ITEMS` items under request ids `{prefix}-{i}`, `concurrency` at a
/// time, recording every answer; any status but 201 and 503 fails the test.
async fn create_many(app: &TestApp, prefix: &str, n: usize, answers: &mut Answers) {
    let key = app.key("acme").to_string();
    let calls = (0..n).map(|i| {
        let rid = format!("{prefix}-{i}");
        let key = key.clone();
        async move {
            let r = app
                .create_batch(&key, &TestApp::batch_body(Some(&rid), ITEMS))
                .await;
            (rid, r)
        }
    });
    for (rid, r) in futures::future::join_all(calls).await {
        match r.status().as_u16() {
            201 => {
                let v: Value = r.json().await.expect("json");
                answers
                    .created
                    .insert(rid, v["batch_id"].as_str().expect("id").to_string());
            }
            503 => {
                assert_store_unavailable(r).await;
                answers.refused.push(rid);
            }
            s => panic!("create {rid}: {s} {}", r.text().await.unwrap_or_default()),
        }
    }
}

/// While the store is full: creates, completions and grants run concurrently until creates are
/// refused; reads are still answered.
async fn load_while_full(app: &TestApp, claimed: Vec<Value>) -> Answers {
    let mut answers = Answers::default();
    let completions = futures::future::join_all(claimed.iter().map(|item| async move {
        let r = app.complete(item).await;
        (item["item_id"].as_str().unwrap().to_string(), r)
    }));
    let grants = futures::future::join_all((0..10).map(|i| async move {
        app.admin_post(
            "/keys/acme/credits/grant",
            &json!({"amount": 7, "note": "fault test"}),
            Some(&format!("grant-{i}")),
        )
        .await
    }));
    let mut creates = Answers::default();
    let (done, granted, ()) = tokio::join!(
        completions,
        grants,
        create_many(app, "during", 40, &mut creates)
    );
    answers.created = creates.created;
    answers.refused = creates.refused;
    for (item, r) in done {
        match r.status().as_u16() {
            200 => answers.completed.push(item),
            503 => {
                assert_store_unavailable(r).await;
                answers.not_completed.push(item)
            }
            s => panic!("complete {item}: {s}"),
        }
    }
    for r in granted {
        match r.status().as_u16() {
            200 => answers.granted += 1,
            503 => {
                assert_store_unavailable(r).await;
                answers.not_granted += 1
            }
            s => panic!("grant: {s}"),
        }
    }
    // Until the store refuses creates for sure.
    let mut round = 0;
    while answers.refused.is_empty() {
        round += 1;
        assert!(round < 50, "the store never filled up");
        create_many(app, &format!("more{round}"), 8, &mut answers).await;
    }
    answers
}

/// Everything answered 2xx is committed, nothing answered 503 is (read through `fresh`), and
/// the wallet holds exactly the credits of the items still queued or running.
async fn assert_only_acknowledged(fresh: &DatabaseConnection, answers: &Answers, grants: i64) {
    for (rid, id) in &answers.created {
        let id = uuid::Uuid::parse_str(id).expect("uuid");
        let total = scalar(
            fresh,
            "SELECT COUNT(*) FROM batch_item WHERE batch_id = $1",
            vec![id.into()],
        )
        .await;
        assert_eq!(
            total, ITEMS as i64,
            "batch {rid} answered 201 is committed whole"
        );
    }
    for rid in &answers.refused {
        let n = scalar(
            fresh,
            "SELECT COUNT(*) FROM batch_job WHERE request_id = $1",
            vec![rid.clone().into()],
        )
        .await;
        assert_eq!(n, 0, "create {rid} answered 503 is not stored");
    }
    for item in &answers.completed {
        let id = uuid::Uuid::parse_str(item).expect("uuid");
        let n = scalar(
            fresh,
            "SELECT COUNT(*) FROM batch_item WHERE id = $1 AND status = 'succeeded'",
            vec![id.into()],
        )
        .await;
        assert_eq!(n, 1, "item {item} answered completed is succeeded");
    }
    for item in &answers.not_completed {
        let id = uuid::Uuid::parse_str(item).expect("uuid");
        let n = scalar(
            fresh,
            "SELECT COUNT(*) FROM batch_item WHERE id = $1 AND status = 'running'",
            vec![id.into()],
        )
        .await;
        assert_eq!(n, 1, "item {item} answered 503 is still running");
    }
    let granted = scalar(
        fresh,
        "SELECT COUNT(*) FROM credit_ledger WHERE kind = 'grant' AND amount = 7",
        vec![],
    )
    .await;
    assert_eq!(
        granted, grants,
        "grants answered 200 are in the ledger, no others"
    );
    let open = scalar(
        fresh,
        "SELECT COUNT(*) FROM batch_item WHERE status IN ('queued', 'running')",
        vec![],
    )
    .await;
    let held = scalar(fresh, "SELECT held FROM credit_wallet", vec![]).await;
    assert_eq!(held, COST * open, "held = cost x (queued + running) items");
    let usage = scalar(
        fresh,
        "SELECT COUNT(*) FROM usage_event WHERE path = '/api/enterprise/video-batch' AND status = 201",
        vec![],
    )
    .await;
    assert!(
        usage >= answers.created.len() as i64,
        "every 201 left its usage row ({usage} rows, {} creates)",
        answers.created.len()
    );
    assert_ledger_invariant(fresh).await;
    eprintln!(
        "full store: creates {} answered 201 (all committed) and {} answered 503 (none stored); \
         completions {} 200 and {} 503; grants {} 200 and {} 503",
        answers.created.len(),
        answers.refused.len(),
        answers.completed.len(),
        answers.not_completed.len(),
        answers.granted,
        answers.not_granted
    );
}

/// Seeds batches and claims items, so that completions run while the store fails.
async fn seed(app: &TestApp) -> Vec<Value> {
    let mut answers = Answers::default();
    create_many(app, "seed", 3, &mut answers).await;
    assert_eq!(answers.created.len(), 3);
    app.claim("w1", 60).await
}

async fn wait_until(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if ok().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(app: &TestApp) -> u16 {
    let started = Instant::now();
    let r = app
        .client
        .get(format!("{}/readyz", app.ops_base))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .expect("/readyz answers within 1 s");
    assert!(started.elapsed() < Duration::from_secs(1));
    r.status().as_u16()
}

/// After the store has room again: writes succeed without a restart, `/readyz` is 200, and
/// every refused create retried with its request id makes exactly one batch.
async fn assert_recovers(app: &TestApp, answers: &Answers) {
    let key = app.key("acme").to_string();
    wait_until(
        "a create succeeds again",
        Duration::from_secs(5),
        async || {
            let r = app.create_batch(&key, &TestApp::batch_body(None, 1)).await;
            r.status() == 201
        },
    )
    .await;
    wait_until("/readyz is 200", Duration::from_secs(5), async || {
        readyz(app).await == 200
    })
    .await;
    for rid in &answers.refused {
        for _ in 0..2 {
            let r = app
                .create_batch(&key, &TestApp::batch_body(Some(rid), ITEMS))
                .await;
            assert!(
                r.status() == 201 || r.status() == 200,
                "retry of {rid}: {}",
                r.status()
            );
        }
        let n = scalar(
            &app.db(),
            "SELECT COUNT(*) FROM batch_job WHERE request_id = $1",
            vec![rid.clone().into()],
        )
        .await;
        assert_eq!(n, 1, "one batch for {rid}");
    }
}

/// SQLite at a page limit (SQLite `FULL` on a single-row insert rolls the whole transaction
/// back by itself): creates, completions and grants answered 2xx are all committed, the rest
/// are 503 and not stored, reads are 200 meanwhile, and raising the limit lets writes succeed
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_sqlite_store_loses_no_acknowledged_call() {
    let app = builder(Backend::Sqlite).build().await;
    let claimed = seed(&app).await;
    assert!(!claimed.is_empty());
    let state = app.state();
    let pages = scalar(&state.writer, "PRAGMA page_count", vec![]).await;
    state
        .page_limit
        .set(&state.writer, pages as u64 + 40)
        .await
        .unwrap();

    let answers = load_while_full(&app, claimed).await;
    assert!(
        !answers.created.is_empty(),
        "some creates fit before it filled"
    );
    wait_until("/readyz says 503", Duration::from_secs(1), async || {
        readyz(&app).await == 503
    })
    .await;

    // Full: reads are served, writes are 503.
    let key = app.key("acme").to_string();
    let some = answers.created.values().next().unwrap();
    assert_eq!(app.get_batch(&key, some).await.status(), 200);
    assert_eq!(app.credits_status(&key).await, 200);
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("store_errors_total{kind=\"full\"}") && !l.ends_with(" 0")),
        "store_errors_total counts full: {metrics}"
    );

    let fresh = app.fresh_db().await;
    assert_only_acknowledged(&fresh, &answers, answers.granted as i64).await;

    state.page_limit.set(&state.writer, 0).await.unwrap();
    assert_recovers(&app, &answers).await;
    assert_ledger_invariant(&app.fresh_db().await).await;
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mb: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system but for `leave` bytes with a file; returns its path.
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        let len = f.metadata().expect("len").len();
        f.set_len(len.saturating_sub(leave)).expect("truncate");
        f.sync_all().expect("sync");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The same on a real file system that runs out of space (a 64 MB tmpfs filled by a file):
/// SQLite meets `FULL` or `IOERR` on the WAL and the database file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_file_system_loses_no_acknowledged_call() {
    let Some(fs) = Tmpfs::mount(64) else {
        skipped("mounting a tmpfs was refused (needs root): the full-file-system test did not run");
        return;
    };
    let app = builder(Backend::Sqlite).sqlite_in(fs.path()).build().await;
    let claimed = seed(&app).await;
    // A pool of its own, not the server's (opened before the file system fills: opening a
    // SQLite connection may need to write).
    let fresh = app.fresh_db().await;
    let filler = fs.fill(1024 * 1024);
    let answers = load_while_full(&app, claimed).await;
    wait_until("/readyz says 503", Duration::from_secs(1), async || {
        readyz(&app).await == 503
    })
    .await;

    // Reads are served from what is stored; on a file system this full, SQLite may not even
    // grow its shared-memory index for a new read, and then a read is 503 too, never 500.
    let key = app.key("acme").to_string();
    for id in answers.created.values().take(3) {
        let status = app.get_batch(&key, id).await.status().as_u16();
        assert!([200, 503].contains(&status), "read while full: {status}");
    }
    let status = app.credits_status(&key).await;
    assert!([200, 503].contains(&status), "read while full: {status}");

    // What is committed stays so, and what was rolled back stays absent, once space returns:
    // checked then, through a pool of its own (opened before the file system filled).
    std::fs::remove_file(filler).expect("free the space");
    assert_only_acknowledged(&fresh, &answers, answers.granted as i64).await;
    drop(fresh);
    assert_recovers(&app, &answers).await;
    assert_ledger_invariant(&app.fresh_db().await).await;
}

/// A PostgreSQL cluster of the test's own (initdb in a temporary folder), so that the test may
/// kill its connections and stop it without touching the shared one.
struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePg {
    fn start() -> Option<PrivatePg> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()?;
        let dir = tempfile::tempdir().ok()?;
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .ok()
            .filter(|s| s.success())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let pg = PrivatePg { dir, bin, port };
        let data = pg.data();
        pg.run(&[
            "initdb",
            "-D",
            &data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ])
        .then_some(())?;
        pg.up().then_some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, args: &[&str]) -> bool {
        let program = self.bin.join(args[0]);
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn up(&self) -> bool {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &log,
            "-w",
            "start",
        ])
    }

    fn down(&self) -> bool {
        self.run(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.run(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
    }
}

/// A private cluster when the PostgreSQL tests run (`TEST_DATABASE_URL` set).
fn private_postgres() -> Option<PrivatePg> {
    Backend::postgres()?;
    let pg = PrivatePg::start();
    if pg.is_none() {
        skipped("could not start a private PostgreSQL cluster (needs root and initdb)");
    }
    pg
}

/// Creates under request ids `{prefix}-{n}` from `clients` tasks until `stop`, one batch of
/// one item each; returns (request id, status, latency) of every call.
async fn create_until(
    app: &TestApp,
    prefix: &str,
    clients: usize,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<(String, u16, Duration)> {
    let key = app.key("acme").to_string();
    let tasks = (0..clients).map(|c| {
        let key = key.clone();
        let stop = stop.clone();
        async move {
            let mut out = Vec::new();
            let mut n = 0;
            while !*stop.borrow() {
                let rid = format!("{prefix}-{c}-{n}");
                n += 1;
                let started = Instant::now();
                let r = app
                    .create_batch(&key, &TestApp::batch_body(Some(&rid), 1))
                    .await;
                let status = r.status().as_u16();
                if status == 503 {
                    assert_store_unavailable(r).await;
                }
                out.push((rid, status, started.elapsed()));
            }
            out
        }
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Every create answered 201 is committed; each refused one retried with its request id ends
/// with exactly one batch.
async fn assert_creates_settle(app: &TestApp, calls: &[(String, u16, Duration)]) {
    let fresh = app.fresh_db().await;
    let key = app.key("acme").to_string();
    for (rid, status, _) in calls {
        let stored = scalar(
            &fresh,
            "SELECT COUNT(*) FROM batch_job WHERE request_id = $1",
            vec![rid.clone().into()],
        )
        .await;
        if *status == 201 {
            assert_eq!(stored, 1, "create {rid} answered 201 is committed");
            continue;
        }
        let r = app
            .create_batch(&key, &TestApp::batch_body(Some(rid), 1))
            .await;
        assert!(
            [200, 201].contains(&r.status().as_u16()),
            "retry {rid}: {}",
            r.status()
        );
        let after = scalar(
            &fresh,
            "SELECT COUNT(*) FROM batch_job WHERE request_id = $1",
            vec![rid.clone().into()],
        )
        .await;
        assert_eq!(after, 1, "one batch for {rid}");
    }
    assert_ledger_invariant(&fresh).await;
}

/// The server's connections are killed (`pg_terminate_backend`) again and again while groups of
/// creates commit: no create is answered 201 that is not committed, none is answered 500, and
/// the first call after the last kill succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_postgres() {
    let Some(pg) = private_postgres() else { return };
    let app = builder(Backend::Sqlite)
        .postgres_at(&pg.url())
        .build()
        .await;
    let killer_db = api::db::connect_url(&pg.url(), 1, None).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let killer = async {
        let mut kills = 0;
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            killer_db
                .execute_unprepared(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .await
                .unwrap();
            kills += 1;
        }
        stop_tx.send(true).unwrap();
        kills
    };
    let (calls, kills) = tokio::join!(create_until(&app, "kill", 8, &stop), killer);
    assert_eq!(kills, 15);
    let statuses: BTreeMap<u16, usize> = calls.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.1).or_default() += 1;
        m
    });
    assert!(
        statuses.keys().all(|s| [201, 503].contains(s)),
        "only 201 and 503: {statuses:?}"
    );
    assert!(statuses.get(&201).copied().unwrap_or(0) > 0, "{statuses:?}");
    // The first call after the kills succeeds.
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("after-kills"), 1))
        .await;
    assert_eq!(r.status(), 201, "the next call succeeds");
    assert_creates_settle(&app, &calls).await;
}

/// The database stops for a few seconds under create load from 8 clients: calls fail with 503
/// within 2 s, `/readyz` answers within 1 s and says 503, writes succeed within 5 s of the
/// database's return, every acknowledged batch is there, and retries make one batch each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_postgres() {
    let Some(pg) = private_postgres() else { return };
    let app = builder(Backend::Sqlite)
        .postgres_at(&pg.url())
        .build()
        .await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let outage = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(pg.down(), "stopping the cluster");
        let stopped = Instant::now();
        let mut ready_503 = None;
        while stopped.elapsed() < Duration::from_secs(4) {
            if readyz(&app).await == 503 && ready_503.is_none() {
                ready_503 = Some(stopped.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(pg.up(), "starting the cluster again");
        let back = Instant::now();
        let key = app.key("acme").to_string();
        wait_until(
            "a create succeeds again",
            Duration::from_secs(5),
            async || {
                app.create_batch(&key, &TestApp::batch_body(None, 1))
                    .await
                    .status()
                    == 201
            },
        )
        .await;
        let recovered = back.elapsed();
        wait_until("/readyz is 200", Duration::from_secs(5), async || {
            readyz(&app).await == 200
        })
        .await;
        stop_tx.send(true).unwrap();
        (ready_503, recovered)
    };
    let (calls, (ready_503, recovered)) =
        tokio::join!(create_until(&app, "restart", 8, &stop), outage);
    let ready_503 = ready_503.expect("/readyz said 503 during the outage");
    assert!(
        ready_503 < Duration::from_secs(1),
        "/readyz 503 after {ready_503:?}"
    );
    let slowest = calls.iter().map(|c| c.2).max().unwrap_or_default();
    let refused = calls.iter().filter(|c| c.1 == 503).count();
    eprintln!(
        "database restart: {} calls, {refused} answered 503, slowest {slowest:?}, /readyz 503 after {ready_503:?}, writes back {recovered:?} after the database",
        calls.len()
    );
    assert!(refused > 0, "the outage was seen");
    assert!(
        calls.iter().all(|c| [201, 503].contains(&c.1)),
        "only 201 and 503"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "every call answered within 2 s: slowest {slowest:?}"
    );
    assert_creates_settle(&app, &calls).await;
}
