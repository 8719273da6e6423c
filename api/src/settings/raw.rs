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
    pub(super) accounts: BTreeMap<String, RawAccount>,
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

/// `[accounts.NAME]`: what the keys of an account share.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub(super) cost_per_video: Option<i64>,
    pub(super) rate_limit_per_min: Option<i64>,
    pub(super) read_rate_limit_per_min: Option<i64>,
    pub(super) max_batch_items: Option<i64>,
    pub(super) max_prompt_chars: Option<i64>,
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
    pub(super) low_credit_threshold: Option<i64>,
    pub(super) max_running_items: Option<i64>,
    pub(super) completion_window: Option<String>,
}

/// `[keys.NAME]`: a key's own settings and, for a key without `account` (its own account),
/// everything `[accounts.NAME]` holds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) key_sha256: String,
    pub(super) account: Option<String>,
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

impl RawKey {
    /// The account settings written in a key's table, for a key that is its own account; the
    /// key's `disabled` is its own.
    pub(super) fn own_account(&self) -> RawAccount {
        RawAccount {
            cost_per_video: self.cost_per_video,
            rate_limit_per_min: self.rate_limit_per_min,
            read_rate_limit_per_min: self.read_rate_limit_per_min,
            max_batch_items: self.max_batch_items,
            max_prompt_chars: self.max_prompt_chars,
            webhook_url: self.webhook_url.clone(),
            webhook_secret: self.webhook_secret.clone(),
            webhook_previous_secret: self.webhook_previous_secret.clone(),
            webhook_previous_secret_expires_at: self.webhook_previous_secret_expires_at.clone(),
            webhook_events: self.webhook_events.clone(),
            initial_credits: self.initial_credits,
            disabled: false,
            low_credit_threshold: self.low_credit_threshold,
            max_running_items: self.max_running_items,
            completion_window: self.completion_window.clone(),
        }
    }

    /// The account settings a key of an `[accounts.NAME]` table sets, which belong there.
    pub(super) fn account_fields_set(&self) -> Vec<&'static str> {
        [
            ("cost_per_video", self.cost_per_video.is_some()),
            ("max_batch_items", self.max_batch_items.is_some()),
            ("max_prompt_chars", self.max_prompt_chars.is_some()),
            ("completion_window", self.completion_window.is_some()),
            ("webhook_url", self.webhook_url.is_some()),
            ("webhook_secret", self.webhook_secret.is_some()),
            (
                "webhook_previous_secret",
                self.webhook_previous_secret.is_some(),
            ),
            (
                "webhook_previous_secret_expires_at",
                self.webhook_previous_secret_expires_at.is_some(),
            ),
            ("webhook_events", self.webhook_events.is_some()),
            ("initial_credits", self.initial_credits != 0),
            ("low_credit_threshold", self.low_credit_threshold.is_some()),
            ("max_running_items", self.max_running_items.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect()
    }
}
