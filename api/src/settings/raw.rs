//! The configuration as written: one struct per TOML table, unknown fields refused. Values
//! every deployment starts from are in `config/base.toml`, which the loader applies first (built
//! in), so no default is repeated here.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub(super) server: RawServer,
    pub(super) database: RawDatabase,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) keys: BTreeMap<String, RawKey>,
    pub(super) worker: RawWorker,
    #[serde(default)]
    pub(super) webhooks: RawWebhooks,
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) retention: RawRetention,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    #[serde(default = "d_usage_days")]
    pub(super) usage_days: i64,
    #[serde(default = "d_webhook_days")]
    pub(super) webhook_days: i64,
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
pub(super) struct RawServer {
    pub(super) bind: String,
    #[serde(default, deserialize_with = "string_or_list")]
    pub(super) trusted_proxies: Vec<String>,
    #[serde(default = "default_max_body")]
    pub(super) max_body_bytes: i64,
    #[serde(default = "default_grace")]
    pub(super) shutdown_grace_seconds: i64,
    #[serde(default = "default_ops_bind")]
    pub(super) ops_bind: String,
    #[serde(default = "default_header_timeout")]
    pub(super) header_timeout_seconds: i64,
    #[serde(default = "default_body_timeout")]
    pub(super) body_timeout_seconds: i64,
    #[serde(default = "default_idle_timeout")]
    pub(super) idle_timeout_seconds: i64,
    #[serde(default = "default_server_connections")]
    pub(super) max_connections: i64,
    #[serde(default = "default_unauthenticated")]
    pub(super) unauthenticated_per_min: i64,
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
pub(super) struct RawDatabase {
    pub(super) url: String,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: i64,
    #[serde(default = "default_write_lanes")]
    pub(super) write_lanes: i64,
    #[serde(default = "default_sqlite_synchronous")]
    pub(super) sqlite_synchronous: String,
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
pub(super) struct RawDefaults {
    #[serde(default = "d_cost")]
    pub(super) cost_per_video: i64,
    #[serde(default = "d_rate")]
    pub(super) rate_limit_per_min: i64,
    #[serde(default = "d_read_rate")]
    pub(super) read_rate_limit_per_min: i64,
    #[serde(default = "d_items")]
    pub(super) max_batch_items: i64,
    #[serde(default = "d_prompt")]
    pub(super) max_prompt_chars: i64,
    #[serde(default, deserialize_with = "string_or_list")]
    pub(super) ip_allowlist: Vec<String>,
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
pub(super) struct RawKey {
    pub(super) key_sha256: String,
    pub(super) cost_per_video: Option<i64>,
    pub(super) rate_limit_per_min: Option<i64>,
    pub(super) read_rate_limit_per_min: Option<i64>,
    pub(super) max_batch_items: Option<i64>,
    pub(super) max_prompt_chars: Option<i64>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub(super) ip_allowlist: Option<Vec<String>>,
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_secret: Option<String>,
    pub(super) webhook_previous_secret: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub(super) webhook_events: Option<Vec<String>>,
    #[serde(default)]
    pub(super) initial_credits: i64,
    #[serde(default)]
    pub(super) disabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    pub(super) secret: String,
    #[serde(default = "d_lease")]
    pub(super) lease_seconds: i64,
    #[serde(default = "d_attempts")]
    pub(super) max_attempts: i64,
}

fn d_lease() -> i64 {
    300
}
fn d_attempts() -> i64 {
    3
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhooks {
    #[serde(default = "d_timeout")]
    pub(super) timeout_seconds: i64,
    #[serde(default = "d_schedule", deserialize_with = "string_or_list")]
    pub(super) retry_schedule: Vec<String>,
    #[serde(default)]
    pub(super) allow_private_targets: bool,
    #[serde(default = "d_true")]
    pub(super) dispatch: bool,
    #[serde(default = "d_concurrency")]
    pub(super) concurrency: i64,
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
pub(super) struct RawAdmin {
    pub(super) token: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default)]
    pub(super) format: Option<String>,
}

/// Accepts `["a", "b"]`, `"a,b"` (handy in environment variables) or `""`.
pub(super) fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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

pub(super) fn opt_string_or_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    string_or_list(d).map(Some)
}
