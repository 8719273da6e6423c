//! Bodies of the customer's webhook operations: deliveries with their attempts, resend,
//! recover, and endpoints.
use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use uuid::Uuid;

use crate::schemas::text::Text;

/// Where a delivery stands.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum DeliveryState {
    /// An attempt is due or in flight.
    Pending,
    /// Its endpoint is disabled: it waits until the endpoint is enabled again.
    Held,
    /// The endpoint answered 2xx.
    Delivered,
    /// Every attempt failed (or the target was refused); resend or recover it.
    Failed,
}

impl DeliveryState {
    /// The state of a stored delivery.
    pub fn of(status: &str, held: bool) -> Self {
        match status {
            "succeeded" => Self::Delivered,
            "failed" => Self::Failed,
            _ if held => Self::Held,
            _ => Self::Pending,
        }
    }

    /// The stored status a filter on this state reads (`held` is a pending delivery on hold).
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Held => "held",
            Self::Delivered => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// One event sent (or to be sent) to one endpoint.
#[derive(Object, Clone, Debug)]
pub struct Delivery {
    /// Delivery id (use it to read or resend the delivery).
    pub delivery_id: Uuid,
    /// The `webhook-id` header, the same on every attempt and resend: receivers deduplicate by it.
    pub webhook_id: String,
    /// Event type, e.g. `batch.completed`.
    pub event_type: String,
    /// The batch the event is about.
    #[oai(nullable)]
    pub batch_id: Option<Uuid>,
    /// Where it is sent.
    pub target_url: String,
    // Where it stands.
    pub status: DeliveryState,
    /// Attempts of the current series (a resend or recover starts a new series).
    pub attempts: i32,
    /// When the next attempt is due (pending only).
    #[oai(nullable)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// HTTP status of the last attempt.
    #[oai(nullable)]
    pub last_status_code: Option<i32>,
    /// Error of the last attempt.
    #[oai(nullable)]
    pub last_error: Option<String>,
    /// When the event happened.
    pub created_at: DateTime<Utc>,
    /// When the endpoint last answered 2xx.
    #[oai(nullable)]
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A page of deliveries, newest first.
#[derive(Object, Clone, Debug)]
pub struct DeliveryList {
    /// The deliveries.
    pub data: Vec<Delivery>,
    /// More deliveries follow.
    pub has_more: bool,
    /// Pass as `cursor` for the next page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// One HTTP attempt of a delivery.
#[derive(Object, Clone, Debug)]
pub struct DeliveryAttempt {
    /// Attempt number within its series, from 1.
    pub attempt: i32,
    /// When it was made.
    pub at: DateTime<Utc>,
    /// HTTP status of the answer, when one came.
    #[oai(nullable)]
    pub status_code: Option<i32>,
    /// Why it failed: `http` (a non-2xx answer), `dns`, `connect`, `timeout`, `tls`,
    /// `refused_target` (a private or invalid address), `request`, `config`; null on success.
    #[oai(nullable)]
    pub error_kind: Option<String>,
    /// The error, in words.
    #[oai(nullable)]
    pub error: Option<String>,
    /// Time from sending to the answer (or the failure), in milliseconds.
    pub latency_ms: i64,
    /// The first 1 KB of the answer's body.
    #[oai(nullable)]
    pub response_excerpt: Option<String>,
}

/// A delivery with every attempt it has made.
#[derive(Object, Clone, Debug)]
pub struct DeliveryDetail {
    /// The delivery.
    #[oai(flatten)]
    pub delivery: Delivery,
    /// Its attempts, oldest first (of every series).
    pub attempt_log: Vec<DeliveryAttempt>,
}

/// What to recover.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct RecoverRequest {
    /// Deliveries created at or after this time that ended `failed` are sent again.
    pub since: DateTime<Utc>,
}

/// What a recover queued.
#[derive(Object, Clone, Debug)]
pub struct Recovered {
    /// Deliveries queued again (each is sent once more; a repeat of the call queues none).
    pub queued: u64,
}

/// The state of an endpoint.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum EndpointState {
    /// Deliveries are sent; the last one succeeded (or none was made yet).
    Enabled,
    /// Deliveries are sent, but every attempt since `failing_since` failed.
    Failing,
    /// Every attempt failed for `webhooks.disable_after`: new events are held until enabled.
    Disabled,
}

/// One URL the key's webhooks are sent to.
#[derive(Object, Clone, Debug)]
pub struct WebhookEndpoint {
    /// The URL.
    pub url: String,
    // Its state.
    pub state: EndpointState,
    /// Start of the current run of failures.
    #[oai(nullable)]
    pub failing_since: Option<DateTime<Utc>>,
    /// Last 2xx answer.
    #[oai(nullable)]
    pub last_success_at: Option<DateTime<Utc>>,
    /// Last failed attempt.
    #[oai(nullable)]
    pub last_failure_at: Option<DateTime<Utc>>,
    /// When it was disabled.
    #[oai(nullable)]
    pub disabled_at: Option<DateTime<Utc>>,
}

/// The endpoint to enable.
#[derive(Object, Clone, Debug)]
#[oai(deny_unknown_fields)]
pub struct EnableEndpointRequest {
    /// The URL, as `GET /webhooks/endpoints` lists it.
    #[oai(validator(min_length = 1, max_length = 2048))]
    pub url: Text,
}

/// An endpoint enabled again.
#[derive(Object, Clone, Debug)]
pub struct EndpointEnabled {
    /// The endpoint now.
    #[oai(flatten)]
    pub endpoint: WebhookEndpoint,
    /// Held deliveries released (sent now, oldest first).
    pub released: u64,
}
