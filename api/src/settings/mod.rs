//! Typed settings: layered loading (base, environment, `--config` files, `APP__` variables),
//! validation with messages that name the file and field, and the per-key policy merge.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

mod check;
mod customers;
mod describe;
mod load;
mod raw;
mod validate;

pub use crate::domain::policy::{
    AccountPolicy, KeyPolicy, KeyScope, KeyVersion, PolicyLimits, PreviousKey, Secret,
};
pub use load::{ConfigError, ConfigSource};

/// The name of the key that `config/local.toml` ships for trying the service out.
pub const DEMO_KEY_NAME: &str = "demo";
/// SHA-256 of the documented demo key `vb_demo_local_only_not_for_production`.
pub const DEMO_KEY_SHA256: &str =
    "03a7d84a6304e7636d36f9c34a5a583705f89616c6c050738b5d4bfee0acd725";
/// Worker secrets the repository ships (`config/local.toml`, `config/test.toml`): public.
pub const SHIPPED_WORKER_SECRETS: [&str; 2] = ["local-worker-secret", "test-worker-secret"];
/// Admin tokens the repository ships (`config/local.toml`, `config/test.toml`): public.
pub const SHIPPED_ADMIN_TOKENS: [&str; 2] = ["local-admin-token", "test-admin-token"];

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `APP_ENVIRONMENT` it was loaded for.
    pub environment: String,
    /// HTTP server.
    pub server: ServerSettings,
    /// Database connection.
    pub database: DatabaseSettings,
    /// Customer accounts, by name, with `[defaults]` merged in: those of `[accounts]` and the
    /// own account of every key that names none.
    pub accounts: BTreeMap<String, Arc<AccountPolicy>>,
    /// Customer keys, by name.
    pub keys: BTreeMap<String, Arc<KeyPolicy>>,
    /// The `[defaults]` table, used for calls whose key is unknown.
    pub defaults: PolicyLimits,
    /// Worker API.
    pub worker: WorkerSettings,
    /// Webhook delivery.
    pub webhooks: WebhookSettings,
    /// Admin API.
    pub admin: AdminSettings,
    /// Logging.
    pub log: LogSettings,
    /// How long audit and webhook rows are kept.
    pub retention: RetentionSettings,
}

/// `[retention]`: days each kind of row is kept (0 keeps it forever). Batches, their items and
/// the credit ledger are always kept: they are the customer's record and hold the idempotency
/// keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Usage (audit) rows.
    pub usage_days: u32,
    /// Finished webhook deliveries and their attempts (pending ones are never pruned).
    pub webhook_days: u32,
    /// The daily usage rollup (calls per day and outcome, credits charged per day), which
    /// usage reports read; it outlives the raw usage rows. Default 0: kept.
    pub usage_rollup_days: u32,
}

/// `[server]`.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Address to listen on.
    pub bind: String,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Address of the operations listener (`/metrics`); equal to `bind` to share it.
    pub ops_bind: String,
    /// Request line and headers must arrive within this time.
    pub header_timeout: Duration,
    /// The whole request body must arrive within this time.
    pub body_timeout: Duration,
    /// Connections with nothing in flight are closed after this time.
    pub idle_timeout: Duration,
    /// Open connections at most per listener.
    pub max_connections: u32,
    /// Calls without a valid key per client address and minute before 429.
    pub unauthenticated_per_min: u32,
    /// A valid key's refused calls (address not allowed, body too large or too slow) per
    /// client address and minute audited one by one before 429.
    pub refused_per_min: u32,
}

impl ServerSettings {
    /// True when `/metrics` is served on the public listener: `ops_bind` equals `bind` (and is
    /// not port 0, which picks a free port for each listener).
    pub fn ops_shared(&self) -> bool {
        self.ops_bind == self.bind && !self.bind.ends_with(":0")
    }

    /// True when `ip` is one of the trusted proxies.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// `[database]`.
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// `sqlite://...` or `postgres://...` (may hold a password: not printed).
    pub url: Secret,
    /// Pool size.
    pub max_connections: u32,
    /// PostgreSQL: group-commit lanes (connections committing groups side by side); a key's
    /// writes always use the same lane. SQLite has one writer and one lane.
    pub write_lanes: u32,
    /// SQLite `synchronous`: `full` (default: a 2xx is on disk even after a power cut) or
    /// `normal` (WAL: a power cut may lose the last commits, never corrupt).
    pub sqlite_synchronous: SqliteSynchronous,
    /// How long a call may wait for the store before it is answered 503.
    pub timeouts: StoreTimeouts,
    /// SQLite page cache of each pooled connection, in KiB.
    pub sqlite_cache_kib: u32,
    /// SQLite `max_page_count` of the writer (0: SQLite's own limit). For fault tests: it makes
    /// the store "full" at a chosen size.
    pub sqlite_max_page_count: u64,
}

/// `database.*_timeout_ms`: no call waits longer than these for the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreTimeouts {
    /// Waiting for a pooled connection, opening a new one included (the connect timeout).
    pub acquire: std::time::Duration,
    /// PostgreSQL `statement_timeout` of the API's statements (migrations have none).
    pub statement: std::time::Duration,
    /// PostgreSQL `lock_timeout` of the API's statements.
    pub lock: std::time::Duration,
    /// SQLite `busy_timeout`: waiting for another connection's write lock.
    pub busy: std::time::Duration,
}

impl Default for StoreTimeouts {
    /// The defaults of `config/base.toml`.
    fn default() -> Self {
        let wait = std::time::Duration::from_millis(1500);
        Self {
            acquire: wait,
            statement: std::time::Duration::from_secs(2),
            lock: wait,
            busy: wait,
        }
    }
}

/// `database.sqlite_synchronous`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqliteSynchronous {
    /// Every commit is fsynced before it is acknowledged.
    Full,
    /// WAL commits are fsynced at checkpoints.
    Normal,
}

/// `[worker]`.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Bearer secret of the worker API.
    pub secret: Secret,
    /// Default lease.
    pub lease_seconds: u32,
    /// Attempts before an item fails for good.
    pub max_attempts: u32,
}

/// `[webhooks]`.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Delay before each retry.
    pub retry_schedule: Vec<Duration>,
    /// Allow loopback/private targets (local testing only).
    pub allow_private_targets: bool,
    /// Acknowledges `allow_private_targets` on a non-loopback `server.bind` (customers who
    /// reach the server may then make it call the private network).
    pub allow_private_targets_on_public_bind: bool,
    /// Run the dispatcher inside `serve`.
    pub dispatch: bool,
    /// Deliveries sent at once.
    pub concurrency: u32,
    /// Deliveries of one key sent at once, across all its endpoints.
    pub per_key_concurrency: u32,
    /// An endpoint whose deliveries have all failed for this long is disabled.
    pub disable_after: Duration,
    /// How often an idle dispatcher looks for deliveries other nodes committed: always
    /// [`WebhookSettings::POLL`], not a configuration setting (a test lengthens it to show
    /// that its own node's events are sent without waiting for a poll).
    pub poll: Duration,
}

impl WebhookSettings {
    /// The dispatcher's poll interval.
    pub const POLL: Duration = Duration::from_millis(100);
}

/// `[admin]`.
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Bearer token of the admin API.
    pub token: Secret,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// Emit JSON lines instead of text.
    pub json: bool,
}

/// Events a key may subscribe to.
pub const WEBHOOK_EVENTS: [&str; 6] = [
    "batch.completed",
    "batch.cancelled",
    "batch.expired",
    "item.succeeded",
    "item.failed",
    "credits.low",
];

/// Events of a key that does not list `webhook_events` (`credits.low` is sent only to keys
/// with a `low_credit_threshold`).
pub const DEFAULT_WEBHOOK_EVENTS: [&str; 4] = [
    "batch.completed",
    "batch.cancelled",
    "batch.expired",
    "credits.low",
];

impl Settings {
    /// A key's policy by name.
    pub fn key(&self, name: &str) -> Option<&Arc<KeyPolicy>> {
        self.keys.get(name)
    }
}

/// Hides the password of a database URL.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
