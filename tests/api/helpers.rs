//! Test harness: `TestApp` runs the real application on a random port against its own
//! database (a temporary SQLite file, or a fresh PostgreSQL schema when `TEST_DATABASE_URL`
//! is set), with one helper per endpoint.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use api::settings::ConfigSource;
use api::state::AppState;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Where a test's data lives.
#[derive(Clone, Debug)]
pub enum Backend {
    /// A temporary SQLite file in WAL mode.
    Sqlite,
    /// A fresh schema in the database of `TEST_DATABASE_URL`.
    Postgres(String),
}

impl Backend {
    /// PostgreSQL when `TEST_DATABASE_URL` is set.
    pub fn postgres() -> Option<Backend> {
        match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            _ => {
                skipped("TEST_DATABASE_URL not set: PostgreSQL variant not run");
                None
            }
        }
    }

    /// True for PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }
}

/// Says that a test did not run its body, on the terminal even when the harness captures test
/// output (a direct write to stderr is not captured), as a line CI counts: `.ci/run` allows
/// only the PostgreSQL variants' "TEST_DATABASE_URL not set" in the SQLite run and fails on any
/// other skip when `CI=true`. The line names the test (the harness names its thread after it).
pub fn skipped(why: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// Runs a test body on SQLite and, when configured, on PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    $crate::helpers::bounded(super::$name($crate::helpers::Backend::Sqlite)).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    if let Some(b) = $crate::helpers::Backend::postgres() {
                        $crate::helpers::bounded(super::$name(b)).await;
                    }
                }
            }
        )*
    };
}

/// The longest a test may run: a test that hangs fails with this message instead of holding
/// the whole run until CI gives up on it.
pub const TEST_LIMIT: std::time::Duration = std::time::Duration::from_secs(420);

/// Runs a test body, failing it when it takes longer than [`TEST_LIMIT`].
pub async fn bounded(body: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, body).await.is_err() {
        panic!("the test did not finish within {} s", TEST_LIMIT.as_secs());
    }
}

/// The plaintext of a test key.
pub fn key_plaintext(name: &str) -> String {
    format!("vb_test_{name}_secret_value")
}

/// SHA-256 hex.
pub fn sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Where the database of a test lives, shared by every node of the test.
struct Store {
    backend: Backend,
    url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let (Backend::Postgres(url), Some(schema)) = (&self.backend, &self.schema) {
            let (url, schema) = (url.clone(), schema.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    if let Ok(db) = sea_orm::Database::connect(url).await {
                        // A test that failed may leave a connection in a transaction that
                        // holds a lock in the schema and is closed only after this returns:
                        // give up (the schema stays behind) rather than wait for it forever.
                        let _ = db.execute_unprepared("SET lock_timeout = '10s'").await;
                        let _ = db
                            .execute_unprepared(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Builds a `TestApp`.
pub struct TestAppBuilder {
    backend: Backend,
    sqlite_dir: Option<PathBuf>,
    keys: Vec<(String, String)>,
    extra: String,
    tweaks: Vec<Tweak>,
    public_targets_only: bool,
    own_database: bool,
}

/// A change to the loaded, typed settings of a test app (applied on every start).
pub type Tweak = Arc<dyn Fn(&mut api::settings::Settings) + Send + Sync>;

impl TestAppBuilder {
    /// Webhook targets must be public addresses, as in production (test apps allow private
    /// ones by default so that local receivers work).
    pub fn public_targets_only(mut self) -> Self {
        self.public_targets_only = true;
        self
    }

    /// Changes the typed settings after they are loaded, as a test needs them (e.g.
    /// `.settings(|s| s.worker.max_attempts = 1)`); kept for restarts and peers.
    pub fn settings(
        mut self,
        tweak: impl Fn(&mut api::settings::Settings) + Send + Sync + 'static,
    ) -> Self {
        self.tweaks.push(Arc::new(tweak));
        self
    }

    /// Adds a key `[keys.NAME]` with extra TOML lines (e.g. `initial_credits = 100`).
    pub fn key(mut self, name: &str, lines: &str) -> Self {
        self.keys.push((name.to_string(), lines.to_string()));
        self
    }

    /// Keeps the SQLite file in `dir` (e.g. on a small file system) instead of a temporary
    /// folder of its own.
    pub fn sqlite_in(mut self, dir: &std::path::Path) -> Self {
        self.sqlite_dir = Some(dir.to_path_buf());
        self
    }

    /// Uses the PostgreSQL database at `url` as it is (no schema of its own).
    pub fn postgres_at(mut self, url: &str) -> Self {
        self.backend = Backend::Postgres(url.to_string());
        self.own_database = true;
        self
    }

    /// Appends TOML (replacing sections is not supported: use distinct sections).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Starts the application.
    pub async fn build(self) -> TestApp {
        let (url, schema, dir) = match &self.backend {
            Backend::Sqlite => match &self.sqlite_dir {
                Some(dir) => (
                    format!("sqlite://{}/test.db?mode=rwc", dir.display()),
                    None,
                    None,
                ),
                None => {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let url = format!("sqlite://{}/test.db?mode=rwc", dir.path().display());
                    (url, None, Some(dir))
                }
            },
            Backend::Postgres(url) if self.own_database => (url.clone(), None, None),
            Backend::Postgres(url) => {
                let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
                let admin = sea_orm::Database::connect(url.clone())
                    .await
                    .expect("connect postgres");
                admin
                    .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
                    .await
                    .expect("create schema");
                (url.clone(), Some(schema), None)
            }
        };
        let config_dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store {
            backend: self.backend.clone(),
            url,
            schema,
            _dir: dir,
        });
        let mut app = TestApp {
            store,
            config_dir: Arc::new(config_dir),
            keys: HashMap::new(),
            base: String::new(),
            port: 0,
            ops_base: String::new(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            state: None,
            shutdown: None,
            handle: None,
            listener: None,
            tweaks: self.tweaks.clone(),
            public_targets_only: self.public_targets_only,
        };
        app.write_config(&self.keys, &self.extra);
        for (name, _) in &self.keys {
            app.keys.insert(name.clone(), key_plaintext(name));
        }
        app.start().await;
        app
    }
}

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    store: Arc<Store>,
    /// Folder holding base.toml and test.toml of this app.
    pub config_dir: Arc<tempfile::TempDir>,
    /// Key name → plaintext.
    pub keys: HashMap<String, String>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The port.
    pub port: u16,
    /// `http://127.0.0.1:OPS_PORT` of the ops listener (`/metrics`); empty when it could not
    /// be bound.
    pub ops_base: String,
    /// HTTP client.
    pub client: reqwest::Client,
    state: Option<Arc<AppState>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Another handle on the server's listening socket, so that a restart keeps the port.
    listener: Option<std::net::TcpListener>,
    tweaks: Vec<Tweak>,
    public_targets_only: bool,
}

/// The worker secret of every test app.
pub const WORKER_SECRET: &str = "test-worker-secret";
/// The admin token of every test app.
pub const ADMIN_TOKEN: &str = "test-admin-token";

impl TestApp {
    /// A builder on `backend`.
    pub fn builder(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            sqlite_dir: None,
            keys: Vec::new(),
            extra: String::new(),
            tweaks: Vec::new(),
            public_targets_only: false,
            own_database: false,
        }
    }

    /// Writes the config folder (base.toml with everything, empty test.toml).
    pub fn write_config(&self, keys: &[(String, String)], extra: &str) {
        let mut toml = format!(
            "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\n[database]\nurl = \"{}\"\nmax_connections = 16\n\n\
             [worker]\nsecret = \"{WORKER_SECRET}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n\
             [webhooks]\nallow_private_targets = {}\nretry_schedule = [\"1s\", \"1s\"]\n\n",
            self.store.url, !self.public_targets_only
        );
        for (name, lines) in keys {
            if lines
                .lines()
                .any(|l| l.trim_start().starts_with("key_sha256"))
            {
                // The test gives the key's hash itself (a rotated key).
                toml.push_str(&format!("[keys.{name}]\n{lines}\n\n"));
            } else {
                toml.push_str(&format!(
                    "[keys.{name}]\nkey_sha256 = \"{}\"\n{lines}\n\n",
                    sha256(&key_plaintext(name))
                ));
            }
        }
        toml.push_str(extra);
        std::fs::write(self.config_dir.path().join("base.toml"), toml).expect("write base.toml");
        std::fs::write(self.config_dir.path().join("test.toml"), "").expect("write test.toml");
    }

    /// The config source of this app.
    pub fn source(&self) -> ConfigSource {
        ConfigSource {
            dir: self.config_dir.path().to_path_buf(),
            environment: "test".into(),
            extra_files: Vec::<PathBuf>::new(),
            env: HashMap::new(),
            refresh_env: false,
        }
    }

    async fn connect(&self, settings: &api::settings::DatabaseSettings) -> DatabaseConnection {
        let db = api::db::connect_url_with(
            &self.store.url,
            16,
            self.store.schema.as_deref(),
            settings.timeouts,
        )
        .await
        .expect("connect");
        api::db::migrate(&db).await.expect("migrate");
        db
    }

    async fn start(&mut self) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        self.start_on(listener).await;
    }

    /// Starts the application on `listener`, keeping another handle on it.
    async fn start_on(&mut self, listener: std::net::TcpListener) {
        let mut settings = self.source().load().expect("valid test config");
        for tweak in &self.tweaks {
            tweak(&mut settings);
        }
        let db = self.connect(&settings.database).await;
        let state = api::startup::prepare_with_db(settings, Some(self.source()), db)
            .await
            .expect("prepare");
        listener.set_nonblocking(true).expect("non-blocking");
        self.listener = Some(listener.try_clone().expect("dup the listener"));
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let app = api::Application::with_listener(Arc::clone(&state), listener)
            .await
            .expect("bind");
        self.port = app.port();
        self.base = format!("http://127.0.0.1:{}", self.port);
        // Empty when the ops listener could not be bound (the API serves without it).
        self.ops_base = app
            .ops_port()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .unwrap_or_default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.handle = Some(tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        })));
        self.shutdown = Some(tx);
        self.state = Some(state);
    }

    /// A second node: another application on the same database and config.
    pub async fn peer(&self) -> TestApp {
        self.peer_with(|_| {}).await
    }

    /// A second node whose settings `tweak` changes further (e.g. only one node dispatches).
    pub async fn peer_with(
        &self,
        tweak: impl Fn(&mut api::settings::Settings) + Send + Sync + 'static,
    ) -> TestApp {
        let mut tweaks = self.tweaks.clone();
        tweaks.push(Arc::new(tweak));
        let mut peer = TestApp {
            store: Arc::clone(&self.store),
            config_dir: Arc::clone(&self.config_dir),
            keys: self.keys.clone(),
            base: String::new(),
            port: 0,
            ops_base: String::new(),
            client: self.client.clone(),
            state: None,
            shutdown: None,
            handle: None,
            listener: None,
            tweaks,
            public_targets_only: self.public_targets_only,
        };
        peer.start().await;
        peer
    }

    /// Stops the server and starts it again on the same database and port, as a restarted
    /// process behind a fixed address would be. The listening socket is never released (no
    /// other process can take the port); while no server runs, every connection to it is
    /// accepted and closed at once without an answer, and the server starts again once
    /// `refused` connections were turned away, so the test knows that calls failed meanwhile.
    pub async fn restart_in_place(&mut self, refused: usize) {
        let held = self.listener.take().expect("a running server");
        self.stop().await;
        let down = tokio::net::TcpListener::from_std(held).expect("listener");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for _ in 0..refused {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (stream, _) = tokio::time::timeout(left, down.accept())
                .await
                .expect("no call reached the stopped server within 60 s")
                .expect("accept");
            drop(stream);
        }
        self.start_on(down.into_std().expect("std listener")).await;
    }

    /// Stops the server and starts it again on the same database (a restart).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// Stops the server gracefully (and closes its port).
    pub async fn stop(&mut self) {
        self.listener = None;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    /// Freezes this node's clock at `at`: rate-limit windows, audit minutes and "today" stay
    /// put, so a test that counts calls against one window never races the wall clock.
    pub fn freeze_clock_at(&self, at: chrono::DateTime<chrono::Utc>) {
        self.state().clock.freeze(at);
    }

    /// Freezes this node's clock now and returns the frozen time.
    pub fn freeze_clock(&self) -> chrono::DateTime<chrono::Utc> {
        let at = chrono::Utc::now();
        self.freeze_clock_at(at);
        at
    }

    /// Application state.
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(self.state.as_ref().expect("started"))
    }

    /// Group commits of this node's write pipeline while `calls` runs, and their output. The
    /// lease reaper (the only background work that commits through the pipeline when no
    /// stranger calls) is paused meanwhile, so the count is the calls' own.
    pub async fn commits_during<T>(&self, calls: impl Future<Output = T>) -> (u64, T) {
        let state = self.state();
        let _paused = state.reaper_gate.lock().await;
        let before = state.writes.commits();
        let out = calls.await;
        (state.writes.commits() - before, out)
    }

    /// A new pool of its own on this app's database: what it reads was committed, never
    /// only seen by the connection that wrote it.
    pub async fn fresh_db(&self) -> DatabaseConnection {
        api::db::connect_url(&self.store.url, 2, self.store.schema.as_deref())
            .await
            .expect("connect")
    }

    /// Ends the lease of item `item_id` a minute ago, as if its worker had gone silent: the
    /// reaper settles it at its next pass (tests need no short lease racing their own calls).
    pub async fn expire_lease(&self, item_id: &str) {
        use sea_orm::{ActiveModelTrait, Set};
        entity::batch_item::ActiveModel {
            id: Set(item_id.parse().expect("item id")),
            lease_expires_at: Set(Some(chrono::Utc::now() - chrono::Duration::minutes(1))),
            ..Default::default()
        }
        .update(&self.db())
        .await
        .expect("expire the lease");
    }

    /// The database.
    pub fn db(&self) -> DatabaseConnection {
        self.state().db.clone()
    }

    /// Runs a query returning one i64 (`SELECT ... AS v`).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let db = self.db();
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                sql.to_string(),
            ))
            .await
            .expect("query")
            .expect("row");
        row.try_get::<Option<i64>>("", "v").expect("v").unwrap_or(0)
    }

    /// The plaintext of a key.
    pub fn key(&self, name: &str) -> &str {
        self.keys.get(name).expect("known key")
    }

    /// Reads the key's batch `id` until `done` holds for it (at most 30 s), and returns it.
    pub async fn wait_batch(&self, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let b: Value = self.get_batch(key, id).await.json().await.unwrap();
            if done(&b) {
                return b;
            }
            assert!(std::time::Instant::now() < deadline, "{b}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// `GET /api/enterprise{path}` with the key: status and body.
    pub async fn customer_get(&self, key: &str, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}/api/enterprise{path}", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// A body with `n` items.
    pub fn batch_body(request_id: Option<&str>, n: usize) -> Value {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({ "prompt": format!("prompt number {i}"), "params": { "duration_s": 5 } }))
            .collect();
        match request_id {
            Some(id) => json!({ "request_id": id, "items": items }),
            None => json!({ "items": items }),
        }
    }

    /// Creates a batch of `n` items under `request_id` (asserting 201) and returns its id.
    pub async fn created_batch_id(&self, key: &str, request_id: &str, n: usize) -> String {
        let r = self
            .create_batch(key, &Self::batch_body(Some(request_id), n))
            .await;
        assert_eq!(r.status(), 201, "create {request_id}");
        r.json::<Value>().await.expect("JSON")["batch_id"]
            .as_str()
            .expect("batch_id")
            .to_string()
    }

    /// POST /api/enterprise/video-batch.
    pub async fn create_batch(&self, key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/enterprise/video-batch", self.base))
            .header("x-api-key", key)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// GET /api/enterprise/video-batch/{id}.
    pub async fn get_batch(&self, key: &str, id: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/api/enterprise/video-batch/{id}", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request")
    }

    /// GET /api/enterprise/video-batch?query.
    pub async fn list_batches(&self, key: &str, query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/api/enterprise/video-batch?{query}", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request")
    }

    /// POST /api/enterprise/video-batch/{id}/cancel.
    pub async fn cancel_batch(&self, key: &str, id: &str) -> reqwest::Response {
        self.client
            .post(format!(
                "{}/api/enterprise/video-batch/{id}/cancel",
                self.base
            ))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request")
    }

    /// The key's wallet (`GET /api/enterprise/credits`, which must answer 200), typed.
    pub async fn wallet(&self, key: &str) -> crate::wire::Credits {
        let r = self
            .client
            .get(format!("{}/api/enterprise/credits?limit=200", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request");
        crate::wire::expect(r, 200).await
    }

    /// GET /api/enterprise/credits as JSON, whatever the status (for refusals).
    pub async fn credits(&self, key: &str) -> Value {
        self.client
            .get(format!("{}/api/enterprise/credits?limit=200", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json")
    }

    /// The ops listener's `/metrics` exposition (asserting a 200).
    pub async fn metrics_text(&self) -> String {
        let r = self
            .client
            .get(format!("{}/metrics", self.ops_base))
            .send()
            .await
            .expect("scrape");
        assert_eq!(r.status(), 200);
        r.text().await.expect("text")
    }

    /// Creates a one-item batch for `key` and cancels it at once (which emits
    /// `batch.cancelled`); returns the batch id.
    pub async fn create_and_cancel(&self, key: &str, rid: &str) -> String {
        let r = self
            .create_batch(key, &TestApp::batch_body(Some(rid), 1))
            .await;
        assert_eq!(r.status(), 201, "create {rid}");
        let id = r.json::<Value>().await.expect("json")["batch_id"]
            .as_str()
            .expect("batch_id")
            .to_string();
        assert_eq!(
            self.cancel_batch(key, &id).await.status(),
            200,
            "cancel {rid}"
        );
        id
    }

    /// `GET /api/enterprise/credits` with `key`; returns the status.
    pub async fn credits_status(&self, key: &str) -> u16 {
        self.client
            .get(format!("{}/api/enterprise/credits", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    /// POST to the worker API.
    pub async fn worker_post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/internal/worker{path}", self.base))
            .bearer_auth(WORKER_SECRET)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Claims items; returns the items array.
    pub async fn claim(&self, worker: &str, max: u32) -> Vec<Value> {
        let r = self
            .worker_post("/claim", &json!({ "worker_id": worker, "max_items": max }))
            .await;
        assert_eq!(r.status(), 200, "claim failed");
        let v: Value = r.json().await.expect("json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Sends a worker call as a worker does: an answer of 503 (nothing was stored; on a busy
    /// machine a claim or a report may wait longer than the lock timeout for its batch row) is
    /// sent again, up to 20 times, 100 ms apart. Returns the last answer.
    async fn worker_retrying(&self, path: &str, body: &Value) -> reqwest::Response {
        let mut r = self.worker_post(path, body).await;
        for _ in 0..20 {
            if r.status() != 503 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            r = self.worker_post(path, body).await;
        }
        r
    }

    /// Claims items as a worker does (a 503 is retried, see [`Self::worker_retrying`]); the
    /// claim must then succeed. Returns the items array.
    pub async fn claim_retrying(&self, worker: &str, max: u32) -> Vec<Value> {
        let r = self
            .worker_retrying("/claim", &json!({ "worker_id": worker, "max_items": max }))
            .await;
        assert_eq!(r.status(), 200, "claim failed");
        let v: Value = r.json().await.expect("json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Completes `item` as a worker does (a 503 is retried, see [`Self::worker_retrying`]).
    /// Returns the last status.
    pub async fn complete_retrying(&self, item: &Value) -> u16 {
        self.worker_retrying(
            &format!("/items/{}/complete", item["item_id"].as_str().unwrap()),
            &json!({ "lease_token": item["lease_token"], "result_url": "https://cdn.example/v.mp4" }),
        )
        .await
        .status()
        .as_u16()
    }

    /// Completes a claimed item.
    pub async fn complete(&self, item: &Value) -> reqwest::Response {
        self.worker_post(
            &format!("/items/{}/complete", item["item_id"].as_str().unwrap()),
            &json!({ "lease_token": item["lease_token"], "result_url": "https://cdn.example/v.mp4" }),
        )
        .await
    }

    /// Fails a claimed item.
    pub async fn fail(&self, item: &Value, retryable: bool) -> reqwest::Response {
        self.worker_post(
            &format!("/items/{}/fail", item["item_id"].as_str().unwrap()),
            &json!({ "lease_token": item["lease_token"], "error": "renderer crashed", "retryable": retryable }),
        )
        .await
    }

    /// GETs `/api/admin{path}` with the admin token and returns its JSON (asserting a 200).
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self
            .client
            .get(format!("{}/api/admin{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.expect("JSON")
    }

    /// POSTs `body` to `/api/admin{path}` with the admin token (and an `Idempotency-Key`).
    pub async fn admin_post(
        &self,
        path: &str,
        body: &Value,
        idem: Option<&str>,
    ) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}/api/admin{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(body);
        if let Some(k) = idem {
            r = r.header("Idempotency-Key", k);
        }
        r.send().await.expect("request")
    }

    /// Checks the ledger invariant of every key (see [`assert_ledger_invariant`]).
    pub async fn assert_ledger_invariant(&self) {
        assert_ledger_invariant(&self.db()).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Checks the ledger invariant of every key: balance = grants + adjusts - charges and
/// held = holds - charges - releases, and the wallet rule `balance >= held >= 0`.
pub async fn assert_ledger_invariant(db: &DatabaseConnection) {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT w.api_key_id AS k, w.balance AS balance, w.held AS held, \
             CAST(COALESCE(SUM(CASE WHEN l.kind IN ('grant','adjust') THEN l.amount WHEN l.kind = 'charge' THEN -l.amount ELSE 0 END), 0) AS BIGINT) AS exp_balance, \
             CAST(COALESCE(SUM(CASE WHEN l.kind = 'hold' THEN l.amount WHEN l.kind IN ('charge','release') THEN -l.amount ELSE 0 END), 0) AS BIGINT) AS exp_held \
             FROM credit_wallet w LEFT JOIN credit_ledger l ON l.api_key_id = w.api_key_id \
             GROUP BY w.api_key_id, w.balance, w.held"
                .to_string(),
        ))
        .await
        .expect("ledger query");
    assert!(
        !rows.is_empty(),
        "no wallet to check: the invariant would hold vacuously"
    );
    let orphans = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS v FROM credit_ledger l WHERE NOT EXISTS \
             (SELECT 1 FROM credit_wallet w WHERE w.api_key_id = l.api_key_id)"
                .to_string(),
        ))
        .await
        .expect("orphan query")
        .expect("row")
        .try_get::<i64>("", "v")
        .expect("v");
    assert_eq!(orphans, 0, "ledger rows of a key without a wallet");
    for r in rows {
        let k: i64 = r.try_get("", "k").unwrap();
        let balance: i64 = r.try_get("", "balance").unwrap();
        let held: i64 = r.try_get("", "held").unwrap();
        let eb: i64 = r.try_get("", "exp_balance").unwrap();
        let eh: i64 = r.try_get("", "exp_held").unwrap();
        assert_eq!(balance, eb, "key {k}: balance disagrees with the ledger");
        assert_eq!(held, eh, "key {k}: held disagrees with the ledger");
        assert!(held >= 0 && balance >= held, "key {k}: wallet rule broken");
    }
}

/// Every (table, column) of the current schema whose value, read as text, contains `needle`
/// (each table and column is listed from the catalog, so a new one is searched too).
pub async fn columns_containing(db: &DatabaseConnection, needle: &str) -> Vec<(String, String)> {
    let backend = db.get_database_backend();
    let listing = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT CAST(table_name AS TEXT) AS t, CAST(column_name AS TEXT) AS c \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             ORDER BY table_name, ordinal_position"
        }
        _ => {
            "SELECT m.name AS t, p.name AS c FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table' ORDER BY m.name, p.cid"
        }
    };
    let columns = db
        .query_all_raw(Statement::from_string(backend, listing.to_string()))
        .await
        .expect("list columns");
    assert!(columns.len() > 20, "the catalog lists the schema's columns");
    let mut found = Vec::new();
    for row in columns {
        let (t, c): (String, String) =
            (row.try_get("", "t").unwrap(), row.try_get("", "c").unwrap());
        let sql = format!(
            "SELECT COUNT(*) AS v FROM \"{t}\" WHERE CAST(\"{c}\" AS TEXT) LIKE '%{}%'",
            needle.replace('\'', "''")
        );
        let n: i64 = db
            .query_one_raw(Statement::from_string(backend, sql))
            .await
            .expect("search a column")
            .expect("row")
            .try_get("", "v")
            .unwrap();
        if n > 0 {
            found.push((t, c));
        }
    }
    found
}

/// A webhook outbox row as a test checks it.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    /// The delivery id.
    pub id: String,
    /// The batch it is about.
    pub batch_id: Option<String>,
    /// `event_type`.
    pub event_type: String,
    /// Where it goes.
    pub target_url: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    /// The row's `attempt_count`.
    pub attempt_count: i64,
    /// How many `webhook_attempt` rows it has.
    pub attempts: i64,
}

/// Every webhook outbox row, with its attempts.
pub async fn outbox_rows(db: &DatabaseConnection) -> Vec<OutboxRow> {
    use sea_orm::{EntityTrait, QueryOrder};
    let deliveries = entity::webhook_delivery::Entity::find()
        .order_by_asc(entity::webhook_delivery::Column::CreatedAt)
        .all(db)
        .await
        .expect("outbox query");
    let attempts = entity::webhook_attempt::Entity::find()
        .all(db)
        .await
        .expect("attempts query");
    deliveries
        .into_iter()
        .map(|d| OutboxRow {
            id: d.id.to_string(),
            batch_id: d.batch_id.map(|b| b.to_string()),
            event_type: d.event_type,
            target_url: d.target_url,
            status: d.status,
            attempt_count: i64::from(d.attempt_count),
            attempts: attempts.iter().filter(|a| a.delivery_id == d.id).count() as i64,
        })
        .collect()
}

/// Waits (up to 60 s) until the outbox holds `n` rows and none is pending any more, so nothing
/// will be sent again, and returns them: a test checks what was (not) delivered from the rows
/// instead of waiting and seeing nothing arrive.
pub async fn wait_outbox_final(db: &DatabaseConnection, n: usize) -> Vec<OutboxRow> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let rows = outbox_rows(db).await;
        if rows.len() >= n && rows.iter().all(|r| r.status != "pending") {
            return rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox did not settle on {n} final rows: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Claims items from the server at `base` (tests that run the real binary).
pub async fn claim_at(
    client: &reqwest::Client,
    base: &str,
    worker: &str,
    max: u32,
    lease: Option<u32>,
) -> Vec<Value> {
    let mut body = json!({ "worker_id": worker, "max_items": max });
    if let Some(l) = lease {
        body["lease_seconds"] = json!(l);
    }
    let v: Value = client
        .post(format!("{base}/api/internal/worker/claim"))
        .bearer_auth(WORKER_SECRET)
        .json(&body)
        .send()
        .await
        .expect("claim")
        .json()
        .await
        .expect("claim body");
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Completes a claimed item at `base`; returns the status code.
pub async fn complete_at(client: &reqwest::Client, base: &str, item: &Value) -> u16 {
    client
        .post(format!("{base}/api/internal/worker/items/{}/complete", item["item_id"].as_str().unwrap()))
        .bearer_auth(WORKER_SECRET)
        .json(&json!({ "lease_token": item["lease_token"], "result_url": "https://cdn.example/v.mp4" }))
        .send()
        .await
        .expect("complete")
        .status()
        .as_u16()
}

/// A fresh PostgreSQL database beside the one of `TEST_DATABASE_URL`, for tests that run the
/// real binary (which takes a database URL, not a schema).
pub struct PgDatabase {
    admin: DatabaseConnection,
    name: String,
    /// Its URL.
    pub url: String,
}

impl PgDatabase {
    /// Creates it.
    pub async fn create(base_url: &str, prefix: &str) -> PgDatabase {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let admin = sea_orm::Database::connect(base_url.to_string())
            .await
            .expect("connect postgres");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = format!(
            "{}/{name}",
            base_url.rsplit_once('/').expect("database URL").0
        );
        PgDatabase { admin, name, url }
    }

    /// Drops it (disconnecting whoever is still connected).
    pub async fn drop_now(self) {
        let _ = self
            .admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// A database of its own for a test that runs the real binary: the SQLite file `{name}.db` in
/// `dir`, or a fresh PostgreSQL database `vb_{name}_…` (dropped with the returned handle).
pub async fn own_database(
    backend: &Backend,
    dir: &std::path::Path,
    name: &str,
) -> (String, Option<PgDatabase>) {
    match backend {
        Backend::Sqlite => (
            format!("sqlite://{}/{name}.db?mode=rwc", dir.display()),
            None,
        ),
        Backend::Postgres(base) => {
            let pg = PgDatabase::create(base, &format!("vb_{name}")).await;
            (pg.url.clone(), Some(pg))
        }
    }
}

/// Waits until the real binary at `base` answers `/readyz` with 200 (at most 30 s).
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not become ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Starts the real binary with `cmd` (stderr is taken over) and returns it with the port it
/// bound: the config binds port 0 and the binary prints the port it got, so no port is ever
/// picked, released and hoped to be free later.
pub fn spawn_server(cmd: std::process::Command) -> (std::process::Child, u16) {
    let (child, port, _stderr) = spawn_server_logged(cmd);
    (child, port)
}

/// Like [`spawn_server`], also returning every line the server writes to stderr (the thread
/// ends when the server closes it, i.e. when it exits).
pub fn spawn_server_logged(
    mut cmd: std::process::Command,
) -> (
    std::process::Child,
    u16,
    std::thread::JoinHandle<Vec<String>>,
) {
    use std::io::BufRead;
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the server");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<Result<u16, String>>();
    let stderr_lines = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut lines = std::io::BufReader::new(stderr).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on port ").nth(1) {
                let port = rest
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|p| p.parse().ok());
                let _ = tx.send(port.ok_or_else(|| line.clone()));
                seen.push(line);
                break;
            }
            seen.push(line);
        }
        let _ = tx.send(Err(seen.join("\n")));
        // Keep draining (and keeping) so the server never blocks on a full pipe.
        seen.extend(lines.map_while(Result::ok));
        seen
    });
    let port = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the server printed nothing within 60 s")
        .unwrap_or_else(|out| panic!("the server did not start:\n{out}"));
    (child, port, stderr_lines)
}

/// A webhook delivery of `key_id` to `target` as the outbox holds it: `status`, due at `due`,
/// written at `at`, no attempt yet (tests insert it straight into the outbox).
pub fn delivery_row(
    key_id: i64,
    target: &str,
    status: &str,
    due: chrono::DateTime<chrono::Utc>,
    at: chrono::DateTime<chrono::Utc>,
) -> entity::webhook_delivery::ActiveModel {
    use sea_orm::ActiveValue::Set;
    entity::webhook_delivery::ActiveModel {
        id: Set(uuid::Uuid::now_v7()),
        api_key_id: Set(key_id),
        batch_id: Set(None),
        event_type: Set("batch.completed".into()),
        payload: Set("{}".into()),
        target_url: Set(target.into()),
        status: Set(status.into()),
        attempt_count: Set(0),
        next_attempt_at: Set(due),
        locked_until: Set(None),
        last_status_code: Set(None),
        last_error: Set(None),
        created_at: Set(at),
        updated_at: Set(at),
        delivered_at: Set(None),
        held_at: Set(None),
        resend_key: Set(None),
        recovered_at: Set(None),
    }
}

/// The count of `app`'s rate-limit windows of `scope` (read through the writer, which the
/// test leaves free).
pub async fn count_window(app: &TestApp, scope: &str) -> i64 {
    let writer = app.state().writer.clone();
    writer
        .query_one_raw(Statement::from_sql_and_values(
            writer.get_database_backend(),
            "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) AS v FROM rate_limit_window WHERE scope = $1",
            [scope.into()],
        ))
        .await
        .expect("query")
        .expect("row")
        .try_get::<i64>("", "v")
        .expect("v")
}
