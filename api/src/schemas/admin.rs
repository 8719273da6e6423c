//! Bodies of the admin API.
use crate::schemas::text::Text;
use poem_openapi::Object;

use crate::schemas::credits::LedgerEntry;

/// Grant credits.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct GrantRequest {
    /// Credits to add (positive, at most 10^12 at once).
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000000")))]
    pub amount: i64,
    /// Why (e.g. an invoice number).
    pub note: Option<Text>,
}

/// Adjust credits.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct AdjustRequest {
    /// Credits to add or (negative) remove, at most 10^12 either way; the balance never drops
    /// below what is held.
    #[oai(validator(minimum(value = "-1000000000000"), maximum(value = "1000000000000")))]
    pub amount: i64,
    /// Why.
    pub note: Option<Text>,
}

/// An account's wallet.
#[derive(Object, Clone, Debug)]
pub struct AdminWallet {
    /// Account name (a key without `account` is its own account, named after it).
    pub account: String,
    /// The key named in the path, for `/keys/{key}/...` (its account's wallet).
    #[oai(skip_serializing_if_is_none)]
    pub key: Option<String>,
    /// Credits owned.
    pub balance: i64,
    /// Credits reserved.
    pub held: i64,
    /// `balance - held`.
    pub available: i64,
    /// Latest ledger rows, newest first.
    pub ledger: Vec<LedgerEntry>,
}

/// A configured key and its effective policy (secrets redacted).
#[derive(Object, Clone, Debug)]
pub struct KeyInfo {
    /// Name.
    pub name: String,
    /// The key's account (its own name when it names none).
    pub account: String,
    /// First 12 hex characters of the key's SHA-256.
    pub key_sha256_prefix: String,
    /// Refused when true.
    pub disabled: bool,
    /// Credits per item (the account's).
    pub cost_per_video: i64,
    /// Batch creations per minute through this key: the account's limit, or the key's own
    /// when tighter.
    pub rate_limit_per_min: u32,
    /// Other calls per minute through this key: the account's limit, or the key's own when
    /// tighter.
    pub read_rate_limit_per_min: u32,
    /// Items per batch.
    pub max_batch_items: u32,
    /// Characters per prompt.
    pub max_prompt_chars: u32,
    /// Allowed networks (empty: any).
    pub ip_allowlist: Vec<String>,
    /// What the key may do: `batches:write`, `batches:read`, `credits:read`, `usage:read`,
    /// `webhooks:read`, `webhooks:write`.
    pub scopes: Vec<String>,
    /// Webhook target.
    #[oai(nullable)]
    pub webhook_url: Option<String>,
    /// A signing secret is configured.
    pub webhook_secret_set: bool,
    /// Subscribed events.
    pub webhook_events: Vec<String>,
    /// During a rotation: when the key it replaced stops working.
    #[oai(nullable)]
    pub previous_key_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `credits.low` is sent when available credits cross below this.
    #[oai(nullable)]
    pub low_credit_threshold: Option<i64>,
    /// At most this many of the account's items run at once (null: unlimited).
    #[oai(nullable)]
    pub max_running_items: Option<u32>,
}

/// A configured account: its keys, effective policy (secrets redacted) and wallet.
#[derive(Object, Clone, Debug)]
pub struct AccountInfo {
    /// Name.
    pub name: String,
    /// True for a key's own account (the key names no `account`; same name as the key).
    pub own_account_of_key: bool,
    /// Every key of it is refused when true.
    pub disabled: bool,
    /// Its keys' names.
    pub keys: Vec<String>,
    /// Credits per item.
    pub cost_per_video: i64,
    /// Batch creations per minute, across all its keys.
    pub rate_limit_per_min: u32,
    /// Other calls per minute, across all its keys.
    pub read_rate_limit_per_min: u32,
    /// Items per batch.
    pub max_batch_items: u32,
    /// Characters per prompt.
    pub max_prompt_chars: u32,
    /// Default completion window, e.g. `24h` (null: none).
    #[oai(nullable)]
    pub completion_window: Option<String>,
    /// Webhook target.
    #[oai(nullable)]
    pub webhook_url: Option<String>,
    /// A signing secret is configured.
    pub webhook_secret_set: bool,
    /// Subscribed events.
    pub webhook_events: Vec<String>,
    /// `credits.low` is sent when available credits cross below this.
    #[oai(nullable)]
    pub low_credit_threshold: Option<i64>,
    /// At most this many of its items run at once (null: unlimited).
    #[oai(nullable)]
    pub max_running_items: Option<u32>,
    /// Credits owned.
    pub balance: i64,
    /// Credits reserved by unfinished batches.
    pub held: i64,
    /// `balance - held`.
    pub available: i64,
}

/// Outcome of a reload.
#[derive(Object, Clone, Debug)]
pub struct ReloadResult {
    /// Always true (a failed reload is an error response).
    pub ok: bool,
    /// Accounts now configured (each key without `account` is one).
    pub accounts: u32,
    /// Keys now configured.
    pub keys: u32,
    /// Enabled keys.
    pub enabled_keys: u32,
}

/// A webhook delivery and its state.
#[derive(Object, Clone, Debug)]
pub struct WebhookDeliveryView {
    /// Delivery id (use it to redeliver).
    pub id: uuid::Uuid,
    /// The `webhook-id` header, stable across attempts.
    pub webhook_id: String,
    /// Key name, for a key that is its own account (null for an `[accounts]` account, whose
    /// keys share its deliveries).
    #[oai(nullable)]
    pub key: Option<String>,
    /// Account name.
    #[oai(nullable)]
    pub account: Option<String>,
    /// Batch concerned.
    #[oai(nullable)]
    pub batch_id: Option<uuid::Uuid>,
    /// Event type.
    pub event_type: String,
    /// Target URL.
    pub target_url: String,
    /// pending, succeeded or failed.
    pub status: String,
    /// Attempts made in the current series.
    pub attempt_count: i32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: chrono::DateTime<chrono::Utc>,
    /// HTTP status of the last attempt.
    #[oai(nullable)]
    pub last_status_code: Option<i32>,
    /// Error of the last attempt.
    #[oai(nullable)]
    pub last_error: Option<String>,
    /// Created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Delivered (succeeded).
    #[oai(nullable)]
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Filter of the webhook list.
#[derive(poem_openapi::Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for an attempt.
    Pending,
    /// Delivered.
    Succeeded,
    /// Exhausted or refused.
    Failed,
}

impl DeliveryStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}
