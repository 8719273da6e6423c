//! Typed settings: layered loading (base, environment, `--config` files, `APP__` variables),
//! validation with messages that name the file and field, and the per-key policy merge.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

pub use crate::domain::policy::{KeyPolicy, PolicyLimits, Secret};

/// The name of the key that `config/local.toml` ships for trying the service out.
pub const DEMO_KEY_NAME: &str = "demo";
/// SHA-256 of the documented demo key `vb_demo_local_only_not_for_production`.
pub const DEMO_KEY_SHA256: &str =
    "03a7d84a6304e7636d36f9c34a5a583705f89616c6c050738b5d4bfee0acd725";

/// A configuration problem, naming where it comes from and which field is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {field}: {message}")]
pub struct ConfigError {
    /// The file or environment variable that set the value.
    pub origin: String,
    /// Dotted path of the field, e.g. `keys.acme.key_sha256`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Where to find the configuration and what to layer on top of it.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// Folder with base.toml and `{environment}.toml` (`APP_CONFIG_DIR`, default `config`).
    pub dir: PathBuf,
    /// `APP_ENVIRONMENT`, default `local`.
    pub environment: String,
    /// Extra files given with `--config`, applied in order.
    pub extra_files: Vec<PathBuf>,
    /// Environment variables used for `APP__` overrides and `env:` secrets.
    pub env: HashMap<String, String>,
    /// Read the process environment again on reload.
    pub refresh_env: bool,
}

impl ConfigSource {
    /// Reads `APP_CONFIG_DIR`, `APP_ENVIRONMENT` and the variables from the process environment.
    pub fn from_process(extra_files: Vec<PathBuf>) -> Self {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self {
            dir: env
                .get("APP_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config")),
            environment: env
                .get("APP_ENVIRONMENT")
                .cloned()
                .unwrap_or_else(|| "local".to_string()),
            extra_files,
            env,
            refresh_env: true,
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.dir.join("base.toml"),
            self.dir.join(format!("{}.toml", self.environment)),
        ];
        files.extend(self.extra_files.iter().cloned());
        files
    }

    /// Loads, merges and validates every layer.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let env_name = &self.environment;
        if env_name.is_empty()
            || !env_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError {
                origin: "APP_ENVIRONMENT".into(),
                field: "environment".into(),
                message: format!("invalid environment name {env_name:?}"),
            });
        }
        let files = self.files();
        let mut layers = Vec::new();
        for (i, path) in files.iter().enumerate() {
            let text = std::fs::read_to_string(path).map_err(|e| {
                let message = if i == 1 && e.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "unknown environment {env_name:?}: {} does not exist",
                        path.display()
                    )
                } else {
                    format!("cannot read file: {e}")
                };
                ConfigError {
                    origin: path.display().to_string(),
                    field: if i == 1 {
                        "environment".into()
                    } else {
                        "-".into()
                    },
                    message,
                }
            })?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
                origin: path.display().to_string(),
                field: "-".into(),
                message: format!("not valid TOML: {}", e.message()),
            })?;
            layers.push((path.clone(), table));
        }

        let mut builder = config::Config::builder();
        for (path, _) in &layers {
            builder = builder.add_source(config::File::new(
                &path.to_string_lossy(),
                config::FileFormat::Toml,
            ));
        }
        let app_env: config::Map<String, String> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("APP__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("APP")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(app_env)),
        );
        let origins = Origins {
            layers: &layers,
            env: &self.env,
        };
        let merged = builder.build().map_err(|e| ConfigError {
            origin: "configuration".into(),
            field: "-".into(),
            message: e.to_string(),
        })?;
        let raw: RawSettings = serde_path_to_error::deserialize(merged).map_err(|e| {
            let field = e.path().to_string();
            ConfigError {
                origin: origins.of(&field),
                field,
                message: clean_serde_message(&e.inner().to_string()),
            }
        })?;
        raw.validate(&self.environment, &origins, &self.env)
    }
}

fn clean_serde_message(msg: &str) -> String {
    // config appends " for key `...`" or " in ..." on its own; keep the first clause.
    msg.split(" for key ").next().unwrap_or(msg).to_string()
}

struct Origins<'a> {
    layers: &'a [(PathBuf, toml::Table)],
    env: &'a HashMap<String, String>,
}

impl Origins<'_> {
    /// The last layer that sets `field` (a dotted path), or the environment variable.
    fn of(&self, field: &str) -> String {
        let parts: Vec<&str> = field.split('.').filter(|p| !p.is_empty()).collect();
        let var = format!(
            "APP__{}",
            parts
                .iter()
                .map(|p| p.to_uppercase())
                .collect::<Vec<_>>()
                .join("__")
        );
        if self.env.contains_key(&var) {
            return format!("environment variable {var}");
        }
        for (path, table) in self.layers.iter().rev() {
            if has_path(table, &parts) {
                return path.display().to_string();
            }
        }
        // A missing field: blame the deepest layer that has the parent table.
        if parts.len() > 1 {
            for (path, table) in self.layers.iter().rev() {
                if has_path(table, &parts[..parts.len() - 1]) {
                    return path.display().to_string();
                }
            }
        }
        self.layers
            .first()
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_else(|| "configuration".into())
    }
}

fn has_path(table: &toml::Table, parts: &[&str]) -> bool {
    let mut cur = table;
    for (i, part) in parts.iter().enumerate() {
        match cur.get(*part) {
            Some(toml::Value::Table(t)) => cur = t,
            Some(_) => return i + 1 == parts.len(),
            None => return false,
        }
    }
    true
}

// ---------------------------------------------------------------- raw (as written)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    server: RawServer,
    database: RawDatabase,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    keys: BTreeMap<String, RawKey>,
    worker: RawWorker,
    #[serde(default)]
    webhooks: RawWebhooks,
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    retention: RawRetention,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    #[serde(default = "d_usage_days")]
    usage_days: i64,
    #[serde(default = "d_webhook_days")]
    webhook_days: i64,
}

fn d_usage_days() -> i64 {
    90
}
fn d_webhook_days() -> i64 {
    30
}

impl Default for RawRetention {
    fn default() -> Self {
        Self {
            usage_days: d_usage_days(),
            webhook_days: d_webhook_days(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: String,
    #[serde(default, deserialize_with = "string_or_list")]
    trusted_proxies: Vec<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: i64,
    #[serde(default = "default_grace")]
    shutdown_grace_seconds: i64,
    #[serde(default = "default_ops_bind")]
    ops_bind: String,
    #[serde(default = "default_header_timeout")]
    header_timeout_seconds: i64,
    #[serde(default = "default_body_timeout")]
    body_timeout_seconds: i64,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_seconds: i64,
    #[serde(default = "default_server_connections")]
    max_connections: i64,
    #[serde(default = "default_unauthenticated")]
    unauthenticated_per_min: i64,
}

fn default_ops_bind() -> String {
    "127.0.0.1:9100".into()
}
fn default_header_timeout() -> i64 {
    10
}
fn default_body_timeout() -> i64 {
    30
}
fn default_idle_timeout() -> i64 {
    60
}
fn default_server_connections() -> i64 {
    10_000
}
fn default_unauthenticated() -> i64 {
    30
}

fn default_max_body() -> i64 {
    1_048_576
}
fn default_grace() -> i64 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    #[serde(default = "default_max_connections")]
    max_connections: i64,
    #[serde(default = "default_write_lanes")]
    write_lanes: i64,
    #[serde(default = "default_sqlite_synchronous")]
    sqlite_synchronous: String,
}

fn default_write_lanes() -> i64 {
    4
}
fn default_sqlite_synchronous() -> String {
    "full".into()
}

fn default_max_connections() -> i64 {
    16
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default = "d_cost")]
    cost_per_video: i64,
    #[serde(default = "d_rate")]
    rate_limit_per_min: i64,
    #[serde(default = "d_read_rate")]
    read_rate_limit_per_min: i64,
    #[serde(default = "d_items")]
    max_batch_items: i64,
    #[serde(default = "d_prompt")]
    max_prompt_chars: i64,
    #[serde(default, deserialize_with = "string_or_list")]
    ip_allowlist: Vec<String>,
}

fn d_cost() -> i64 {
    10
}
fn d_rate() -> i64 {
    60
}
fn d_read_rate() -> i64 {
    600
}
fn d_items() -> i64 {
    100
}
fn d_prompt() -> i64 {
    4000
}

impl Default for RawDefaults {
    fn default() -> Self {
        Self {
            cost_per_video: d_cost(),
            rate_limit_per_min: d_rate(),
            read_rate_limit_per_min: d_read_rate(),
            max_batch_items: d_items(),
            max_prompt_chars: d_prompt(),
            ip_allowlist: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    key_sha256: String,
    cost_per_video: Option<i64>,
    rate_limit_per_min: Option<i64>,
    read_rate_limit_per_min: Option<i64>,
    max_batch_items: Option<i64>,
    max_prompt_chars: Option<i64>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    ip_allowlist: Option<Vec<String>>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_previous_secret: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    webhook_events: Option<Vec<String>>,
    #[serde(default)]
    initial_credits: i64,
    #[serde(default)]
    disabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    secret: String,
    #[serde(default = "d_lease")]
    lease_seconds: i64,
    #[serde(default = "d_attempts")]
    max_attempts: i64,
}

fn d_lease() -> i64 {
    300
}
fn d_attempts() -> i64 {
    3
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    #[serde(default = "d_timeout")]
    timeout_seconds: i64,
    #[serde(default = "d_schedule", deserialize_with = "string_or_list")]
    retry_schedule: Vec<String>,
    #[serde(default)]
    allow_private_targets: bool,
    #[serde(default = "d_true")]
    dispatch: bool,
    #[serde(default = "d_concurrency")]
    concurrency: i64,
}

fn d_timeout() -> i64 {
    15
}
fn d_schedule() -> Vec<String> {
    ["5s", "5m", "30m", "2h", "5h", "10h", "10h"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn d_true() -> bool {
    true
}
fn d_concurrency() -> i64 {
    32
}

impl Default for RawWebhooks {
    fn default() -> Self {
        Self {
            timeout_seconds: d_timeout(),
            retry_schedule: d_schedule(),
            allow_private_targets: false,
            dispatch: true,
            concurrency: d_concurrency(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: Option<String>,
}

/// Accepts `["a", "b"]`, `"a,b"` (handy in environment variables) or `""`.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

fn opt_string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    string_or_list(d).map(Some)
}

// ---------------------------------------------------------------- validated

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `APP_ENVIRONMENT` it was loaded for.
    pub environment: String,
    /// HTTP server.
    pub server: ServerSettings,
    /// Database connection.
    pub database: DatabaseSettings,
    /// Customer keys, by name, with `[defaults]` merged in.
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
    /// Run the dispatcher inside `serve`.
    pub dispatch: bool,
    /// Deliveries sent at once.
    pub concurrency: u32,
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
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "batch.completed",
    "batch.cancelled",
    "item.succeeded",
    "item.failed",
];

struct Check<'a> {
    origins: &'a Origins<'a>,
    env: &'a HashMap<String, String>,
}

impl Check<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origins.of(field),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn positive(&self, field: &str, v: i64) -> Result<u32, ConfigError> {
        if v <= 0 {
            return Err(self.err(field, format!("must be a positive number, got {v}")));
        }
        u32::try_from(v).map_err(|_| self.err(field, format!("is too large: {v}")))
    }

    fn secret(&self, field: &str, raw: &str) -> Result<Secret, ConfigError> {
        let value = match raw.strip_prefix("env:") {
            Some(var) => match self.env.get(var) {
                Some(v) if !v.is_empty() => v.clone(),
                Some(_) => {
                    return Err(self.err(field, format!("environment variable {var} is empty")));
                }
                None => {
                    return Err(self.err(field, format!("environment variable {var} is not set")));
                }
            },
            None => raw.to_string(),
        };
        if value.is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(Secret(SecretString::from(value)))
    }

    fn cidrs(&self, field: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        list.iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| self.err(field, format!("{s:?} is not an IP address or CIDR")))
            })
            .collect()
    }

    fn webhook_url(&self, field: &str, url: &str) -> Result<(), ConfigError> {
        match url::Url::parse(url) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => {
                Ok(())
            }
            _ => Err(self.err(field, format!("{url:?} is not an absolute http(s) URL"))),
        }
    }

    fn whsec(&self, field: &str, raw: &str) -> Result<Secret, ConfigError> {
        let secret = self.secret(field, raw)?;
        crate::domain::secret::decode_whsec(secret.expose()).map_err(|m| self.err(field, m))?;
        Ok(secret)
    }
}

impl RawSettings {
    fn validate(
        self,
        environment: &str,
        origins: &Origins<'_>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let c = Check { origins, env };
        if self.server.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(c.err(
                "server.bind",
                format!("{:?} is not host:port", self.server.bind),
            ));
        }
        if self
            .server
            .ops_bind
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(c.err(
                "server.ops_bind",
                format!("{:?} is not host:port", self.server.ops_bind),
            ));
        }
        let trusted_proxies = c.cidrs("server.trusted_proxies", &self.server.trusted_proxies)?;
        let header_timeout = c.positive(
            "server.header_timeout_seconds",
            self.server.header_timeout_seconds,
        )?;
        let body_timeout = c.positive(
            "server.body_timeout_seconds",
            self.server.body_timeout_seconds,
        )?;
        let idle_timeout = c.positive(
            "server.idle_timeout_seconds",
            self.server.idle_timeout_seconds,
        )?;
        let server_connections =
            c.positive("server.max_connections", self.server.max_connections)?;
        let unauthenticated_per_min = c.positive(
            "server.unauthenticated_per_min",
            self.server.unauthenticated_per_min,
        )?;
        let max_body = c.positive("server.max_body_bytes", self.server.max_body_bytes)?;
        let grace = c.positive(
            "server.shutdown_grace_seconds",
            self.server.shutdown_grace_seconds,
        )?;
        let url = c.secret("database.url", &self.database.url)?;
        let u = url.expose();
        if !(u.starts_with("sqlite:")
            || u.starts_with("postgres://")
            || u.starts_with("postgresql://"))
        {
            return Err(c.err(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        let database = DatabaseSettings {
            url,
            max_connections: c
                .positive("database.max_connections", self.database.max_connections)?,
            write_lanes: c.positive("database.write_lanes", self.database.write_lanes)?,
            sqlite_synchronous: match self.database.sqlite_synchronous.as_str() {
                "full" => SqliteSynchronous::Full,
                "normal" => SqliteSynchronous::Normal,
                other => {
                    return Err(c.err(
                        "database.sqlite_synchronous",
                        format!("{other:?} is not full or normal"),
                    ));
                }
            },
        };
        let d = &self.defaults;
        let defaults = PolicyLimits {
            cost_per_video: c.positive("defaults.cost_per_video", d.cost_per_video)? as i64,
            rate_limit_per_min: c.positive("defaults.rate_limit_per_min", d.rate_limit_per_min)?,
            read_rate_limit_per_min: c.positive(
                "defaults.read_rate_limit_per_min",
                d.read_rate_limit_per_min,
            )?,
            max_batch_items: c.positive("defaults.max_batch_items", d.max_batch_items)?,
            max_prompt_chars: c.positive("defaults.max_prompt_chars", d.max_prompt_chars)?,
            ip_allowlist: c.cidrs("defaults.ip_allowlist", &d.ip_allowlist)?,
        };

        let mut keys = BTreeMap::new();
        let mut hashes: HashMap<String, String> = HashMap::new();
        for (name, k) in self.keys {
            let f = |field: &str| format!("keys.{name}.{field}");
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-'
                })
            {
                return Err(c.err(
                    &format!("keys.{name}"),
                    "key names are 1-64 characters of a-z, 0-9, _ and -",
                ));
            }
            let hash = k.key_sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.chars().all(|ch| ch.is_ascii_hexdigit()) {
                return Err(c.err(
                    &f("key_sha256"),
                    "must be 64 hexadecimal characters (SHA-256 of the key)",
                ));
            }
            if let Some(other) = hashes.insert(hash.clone(), name.clone()) {
                return Err(c.err(
                    &f("key_sha256"),
                    format!("the same key is already configured as {other:?}"),
                ));
            }
            let limits = PolicyLimits {
                cost_per_video: c.positive(
                    &f("cost_per_video"),
                    k.cost_per_video.unwrap_or(defaults.cost_per_video),
                )? as i64,
                rate_limit_per_min: match k.rate_limit_per_min {
                    Some(v) => c.positive(&f("rate_limit_per_min"), v)?,
                    None => defaults.rate_limit_per_min,
                },
                read_rate_limit_per_min: match k.read_rate_limit_per_min {
                    Some(v) => c.positive(&f("read_rate_limit_per_min"), v)?,
                    None => defaults.read_rate_limit_per_min,
                },
                max_batch_items: match k.max_batch_items {
                    Some(v) => c.positive(&f("max_batch_items"), v)?,
                    None => defaults.max_batch_items,
                },
                max_prompt_chars: match k.max_prompt_chars {
                    Some(v) => c.positive(&f("max_prompt_chars"), v)?,
                    None => defaults.max_prompt_chars,
                },
                ip_allowlist: match &k.ip_allowlist {
                    Some(list) => c.cidrs(&f("ip_allowlist"), list)?,
                    None => defaults.ip_allowlist.clone(),
                },
            };
            if let Some(url) = &k.webhook_url {
                c.webhook_url(&f("webhook_url"), url)?;
            }
            let webhook_secret = k
                .webhook_secret
                .as_deref()
                .map(|s| c.whsec(&f("webhook_secret"), s))
                .transpose()?;
            let webhook_previous_secret = k
                .webhook_previous_secret
                .as_deref()
                .map(|s| c.whsec(&f("webhook_previous_secret"), s))
                .transpose()?;
            if k.webhook_url.is_some() && webhook_secret.is_none() {
                return Err(c.err(&f("webhook_secret"), "is required when webhook_url is set"));
            }
            let webhook_events = k
                .webhook_events
                .unwrap_or_else(|| vec!["batch.completed".into(), "batch.cancelled".into()]);
            for e in &webhook_events {
                if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                    return Err(c.err(
                        &f("webhook_events"),
                        format!("unknown event {e:?}; known: {}", WEBHOOK_EVENTS.join(", ")),
                    ));
                }
            }
            if !(0..=crate::domain::money::MAX_BALANCE).contains(&k.initial_credits) {
                return Err(c.err(
                    &f("initial_credits"),
                    format!(
                        "must be between 0 and {}",
                        crate::domain::money::MAX_BALANCE
                    ),
                ));
            }
            keys.insert(
                name.clone(),
                Arc::new(KeyPolicy {
                    name,
                    key_sha256: hash,
                    limits,
                    webhook_url: k.webhook_url,
                    webhook_secret,
                    webhook_previous_secret,
                    webhook_events,
                    initial_credits: k.initial_credits,
                    disabled: k.disabled,
                }),
            );
        }

        let worker = WorkerSettings {
            secret: c.secret("worker.secret", &self.worker.secret)?,
            lease_seconds: c.positive("worker.lease_seconds", self.worker.lease_seconds)?,
            max_attempts: c.positive("worker.max_attempts", self.worker.max_attempts)?,
        };
        let mut retry_schedule = Vec::new();
        for s in &self.webhooks.retry_schedule {
            let d = humantime::parse_duration(s).map_err(|e| {
                c.err(
                    "webhooks.retry_schedule",
                    format!("{s:?} is not a duration like 5s, 5m or 2h: {e}"),
                )
            })?;
            retry_schedule.push(d);
        }
        let webhooks = WebhookSettings {
            timeout: Duration::from_secs(
                c.positive("webhooks.timeout_seconds", self.webhooks.timeout_seconds)?
                    .into(),
            ),
            retry_schedule,
            allow_private_targets: self.webhooks.allow_private_targets,
            dispatch: self.webhooks.dispatch,
            concurrency: c.positive("webhooks.concurrency", self.webhooks.concurrency)?,
        };
        let admin = AdminSettings {
            token: c.secret("admin.token", &self.admin.token)?,
        };
        let log = LogSettings {
            json: match self.log.format.as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(c.err("log.format", format!("{other:?} is not text or json")));
                }
            },
        };
        let days = |field: &str, v: i64| {
            u32::try_from(v)
                .ok()
                .filter(|d| *d <= 36_500)
                .ok_or_else(|| c.err(field, format!("must be 0 (keep) to 36500 days, got {v}")))
        };
        let retention = RetentionSettings {
            usage_days: days("retention.usage_days", self.retention.usage_days)?,
            webhook_days: days("retention.webhook_days", self.retention.webhook_days)?,
        };
        let settings = Settings {
            environment: environment.to_string(),
            retention,
            server: ServerSettings {
                bind: self.server.bind,
                trusted_proxies,
                max_body_bytes: max_body as usize,
                shutdown_grace: Duration::from_secs(grace.into()),
                ops_bind: self.server.ops_bind,
                header_timeout: Duration::from_secs(header_timeout.into()),
                body_timeout: Duration::from_secs(body_timeout.into()),
                idle_timeout: Duration::from_secs(idle_timeout.into()),
                max_connections: server_connections,
                unauthenticated_per_min,
            },
            database,
            keys,
            defaults,
            worker,
            webhooks,
            admin,
            log,
        };
        if environment == "production" {
            settings.check_production(&c)?;
        }
        if environment == "local" {
            settings.check_local(&c)?;
        }
        Ok(settings)
    }
}

impl Settings {
    fn check_production(&self, c: &Check<'_>) -> Result<(), ConfigError> {
        for k in self.keys.values() {
            if k.name == DEMO_KEY_NAME || k.key_sha256 == DEMO_KEY_SHA256 {
                return Err(c.err(
                    &format!("keys.{}", k.name),
                    "the demo key must not be configured in production",
                ));
            }
        }
        if self.worker.secret.expose().len() < 32 {
            return Err(c.err(
                "worker.secret",
                "must be at least 32 characters in production",
            ));
        }
        if self.admin.token.expose().len() < 32 {
            return Err(c.err(
                "admin.token",
                "must be at least 32 characters in production",
            ));
        }
        if self.webhooks.allow_private_targets {
            return Err(c.err(
                "webhooks.allow_private_targets",
                "must be false in production",
            ));
        }
        Ok(())
    }

    /// The demo key is public: `local` serves it on loopback addresses only.
    fn check_local(&self, c: &Check<'_>) -> Result<(), ConfigError> {
        let has_demo = self
            .keys
            .values()
            .any(|k| !k.disabled && (k.name == DEMO_KEY_NAME || k.key_sha256 == DEMO_KEY_SHA256));
        let loopback = self
            .server
            .bind
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if has_demo && !loopback {
            return Err(c.err(
                "server.bind",
                format!(
                    "{:?} is reachable from other machines while the public demo key is configured; \
                     bind 127.0.0.1 or remove keys.{DEMO_KEY_NAME}",
                    self.server.bind
                ),
            ));
        }
        Ok(())
    }

    /// A key's policy by name.
    pub fn key(&self, name: &str) -> Option<&Arc<KeyPolicy>> {
        self.keys.get(name)
    }

    /// The effective policy as TOML-like text with secrets redacted (`config check`).
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "environment = {:?}", self.environment);
        let _ = writeln!(out, "server.bind = {:?}", self.server.bind);
        let _ = writeln!(out, "server.ops_bind = {:?}", self.server.ops_bind);
        let _ = writeln!(
            out,
            "server.trusted_proxies = {:?}",
            self.server
                .trusted_proxies
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        );
        let _ = writeln!(
            out,
            "database = {:?}",
            redact_url(self.database.url.expose())
        );
        let _ = writeln!(
            out,
            "worker.secret = \"[redacted]\"  admin.token = \"[redacted]\""
        );
        let _ = writeln!(
            out,
            "retention.usage_days = {}  retention.webhook_days = {}",
            self.retention.usage_days, self.retention.webhook_days
        );
        for k in self.keys.values() {
            let l = &k.limits;
            let _ = writeln!(out, "\n[keys.{}]", k.name);
            let _ = writeln!(out, "key_sha256 = \"{}…\"", &k.key_sha256[..12]);
            let _ = writeln!(out, "disabled = {}", k.disabled);
            let _ = writeln!(out, "cost_per_video = {}", l.cost_per_video);
            let _ = writeln!(out, "rate_limit_per_min = {}", l.rate_limit_per_min);
            let _ = writeln!(
                out,
                "read_rate_limit_per_min = {}",
                l.read_rate_limit_per_min
            );
            let _ = writeln!(out, "max_batch_items = {}", l.max_batch_items);
            let _ = writeln!(out, "max_prompt_chars = {}", l.max_prompt_chars);
            let _ = writeln!(
                out,
                "ip_allowlist = {:?}",
                l.ip_allowlist
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
            );
            let _ = writeln!(out, "webhook_url = {:?}", k.webhook_url);
            let _ = writeln!(
                out,
                "webhook_secret = {}",
                if k.webhook_secret.is_some() {
                    "\"[redacted]\""
                } else {
                    "none"
                }
            );
            let _ = writeln!(out, "webhook_events = {:?}", k.webhook_events);
            let _ = writeln!(out, "initial_credits = {}", k.initial_credits);
        }
        out
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
