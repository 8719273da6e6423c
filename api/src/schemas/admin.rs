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

/// A key's wallet.
#[derive(Object, Clone, Debug)]
pub struct AdminWallet {
    /// Key name.
    pub key: String,
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
    /// First 12 hex characters of the key's SHA-256.
    pub key_sha256_prefix: String,
    /// Refused when true.
    pub disabled: bool,
    /// Credits per item.
    pub cost_per_video: i64,
    /// Batch creations per minute.
    pub rate_limit_per_min: u32,
    /// Other calls per minute.
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
    /// At most this many of the key's items run at once (null: unlimited).
    #[oai(nullable)]
    pub max_running_items: Option<u32>,
}

/// Outcome of a reload.
#[derive(Object, Clone, Debug)]
pub struct ReloadResult {
    /// Always true (a failed reload is an error response).
    pub ok: bool,
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
    /// Key name.
    #[oai(nullable)]
    pub key: Option<String>,
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
