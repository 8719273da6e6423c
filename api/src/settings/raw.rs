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
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) keys: BTreeMap<String, RawKey>,
    pub(super) worker: RawWorker,
    pub(super) webhooks: RawWebhooks,
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) log: RawLog,
    pub(super) retention: RawRetention,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub(super) usage_days: i64,
    pub(super) webhook_days: i64,
    #[serde(default)]
    pub(super) usage_rollup_days: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) bind: String,
    #[serde(deserialize_with = "string_or_list")]
    pub(super) trusted_proxies: Vec<String>,
    pub(super) max_body_bytes: i64,
    pub(super) shutdown_grace_seconds: i64,
    pub(super) ops_bind: String,
    pub(super) header_timeout_seconds: i64,
    pub(super) body_timeout_seconds: i64,
    pub(super) idle_timeout_seconds: i64,
    pub(super) max_connections: i64,
    pub(super) unauthenticated_per_min: i64,
    pub(super) refused_per_min: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) url: String,
    pub(super) max_connections: i64,
    pub(super) write_lanes: i64,
    pub(super) sqlite_synchronous: String,
    pub(super) acquire_timeout_ms: i64,
    pub(super) statement_timeout_ms: i64,
    pub(super) lock_timeout_ms: i64,
    pub(super) busy_timeout_ms: i64,
    pub(super) sqlite_cache_kib: i64,
    #[serde(default)]
    pub(super) sqlite_max_page_count: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) cost_per_video: i64,
    pub(super) rate_limit_per_min: i64,
    pub(super) read_rate_limit_per_min: i64,
    pub(super) max_batch_items: i64,
    pub(super) max_prompt_chars: i64,
    #[serde(deserialize_with = "string_or_list")]
    pub(super) ip_allowlist: Vec<String>,
    pub(super) completion_window: String,
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
    #[serde(alias = "previous_webhook_secret")]
    pub(super) webhook_previous_secret: Option<String>,
    #[serde(alias = "previous_webhook_secret_expires_at")]
    pub(super) webhook_previous_secret_expires_at: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub(super) webhook_events: Option<Vec<String>>,
    #[serde(default)]
    pub(super) initial_credits: i64,
    #[serde(default)]
    pub(super) disabled: bool,
    pub(super) previous_key_sha256: Option<String>,
    pub(super) previous_key_expires_at: Option<String>,
    pub(super) low_credit_threshold: Option<i64>,
    pub(super) max_running_items: Option<i64>,
    pub(super) completion_window: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub(super) scopes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    pub(super) secret: String,
    pub(super) lease_seconds: i64,
    pub(super) max_attempts: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhooks {
    pub(super) timeout_seconds: i64,
    #[serde(deserialize_with = "string_or_list")]
    pub(super) retry_schedule: Vec<String>,
    pub(super) allow_private_targets: bool,
    pub(super) allow_private_targets_on_public_bind: bool,
    pub(super) dispatch: bool,
    pub(super) concurrency: i64,
    pub(super) per_key_concurrency: i64,
    pub(super) disable_after: String,
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
