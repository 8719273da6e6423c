//! The customer's webhook operations: its deliveries and their attempts, resend, recover after
//! an outage, and its endpoints (disabled after failing for `webhooks.disable_after`, enabled
//! again by the customer). Another key's deliveries are not found.
use chrono::{DateTime, Utc};
use entity::webhook_delivery;
use sea_orm::DatabaseConnection;
use uuid::Uuid;

use crate::domain::ids::AccountId;
use crate::error::{ApiError, ErrorCode};
use crate::schemas::webhooks::{
    Delivery, DeliveryAttempt, DeliveryDetail, DeliveryState, EndpointEnabled, EndpointState,
    WebhookEndpoint,
};
use crate::service::batches::{decode_cursor, encode_cursor};
use crate::state::KeyEntry;
use crate::store::commit::Writes;
use crate::store::webhooks::{self, DeliveryFilter};

/// The wire view of a delivery.
pub fn view(d: &webhook_delivery::Model) -> Delivery {
    let status = DeliveryState::of(&d.status, d.held_at.is_some());
    Delivery {
        delivery_id: d.id,
        webhook_id: super::webhook_id(d.id),
        event_type: d.event_type.clone(),
        batch_id: d.batch_id,
        target_url: d.target_url.clone(),
        status,
        attempts: d.attempt_count,
        next_attempt_at: (status == DeliveryState::Pending).then_some(d.next_attempt_at),
        last_status_code: d.last_status_code,
        last_error: d.last_error.clone(),
        created_at: d.created_at,
        delivered_at: d.delivered_at,
    }
}

/// What a list call asks for.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub status: Option<DeliveryState>,
    pub event_type: Option<String>,
    pub batch_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub limit: u64,
    pub cursor: Option<String>,
}

/// A page of the key's deliveries, newest first, and the cursor of the next page.
pub async fn list(
    db: &DatabaseConnection,
    account: AccountId,
    q: &ListQuery,
) -> Result<(Vec<Delivery>, Option<String>), ApiError> {
    let filter = DeliveryFilter {
        status: q.status.map(DeliveryState::as_filter),
        event_type: q.event_type.as_deref(),
        batch_id: q.batch_id,
        since: q.since,
        before: q.cursor.as_deref().map(decode_cursor).transpose()?,
    };
    let mut rows = webhooks::page_of_key(db, account, &filter, q.limit + 1).await?;
    let next = if rows.len() as u64 > q.limit {
        rows.truncate(q.limit as usize);
        rows.last().map(|d| encode_cursor(d.id))
    } else {
        None
    };
    Ok((rows.iter().map(view).collect(), next))
}

/// The key's delivery `id`, or 404.
async fn owned(
    db: &DatabaseConnection,
    account: AccountId,
    id: Uuid,
) -> Result<webhook_delivery::Model, ApiError> {
    webhooks::by_id(db, id)
        .await?
        .filter(|d| d.api_key_id == account.0)
        .ok_or_else(|| ApiError::not_found("webhook delivery", id))
}

/// A delivery with its attempts.
pub async fn detail(
    db: &DatabaseConnection,
    account: AccountId,
    id: Uuid,
) -> Result<DeliveryDetail, ApiError> {
    let d = owned(db, account, id).await?;
    let attempt_log = webhooks::attempts_of(db, id)
        .await?
        .into_iter()
        .map(|a| DeliveryAttempt {
            attempt: a.attempt,
            at: a.created_at,
            status_code: a.status_code,
            error_kind: a.error_kind,
            error: a.error,
            latency_ms: a.duration_ms,
            response_excerpt: a.response_excerpt,
        })
        .collect();
    Ok(DeliveryDetail {
        delivery: view(&d),
        attempt_log,
    })
}

/// Sends a delivered or failed delivery again (same `webhook-id`). A delivery whose attempt is
/// due or in flight is answered as it is (never two attempts at once); one held by a disabled
/// endpoint is 409; a repeat with the `Idempotency-Key` of the last resend changes nothing.
pub async fn resend(
    db: &DatabaseConnection,
    writes: &Writes,
    account: AccountId,
    id: Uuid,
    idempotency_key: Option<String>,
) -> Result<Delivery, ApiError> {
    let d = owned(db, account, id).await?;
    if d.held_at.is_some() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "the endpoint {} is disabled: enable it (POST /webhooks/endpoints/enable) to send \
                 its held events",
                d.target_url
            ),
        ));
    }
    let replay = idempotency_key.is_some() && d.resend_key == idempotency_key;
    if d.status != "pending" && !replay {
        writes
            .run(Some(account.0), move |txn| {
                let key = idempotency_key.clone();
                Box::pin(async move {
                    Ok(webhooks::resend(txn, account, id, key.as_deref(), Utc::now()).await?)
                })
            })
            .await?;
    }
    Ok(view(&owned(db, account, id).await?))
}

/// Sends again each failed delivery of the key created at or after `since` (once per
/// delivery, oldest first): how many were queued.
pub async fn recover(
    writes: &Writes,
    account: AccountId,
    since: DateTime<Utc>,
) -> Result<u64, ApiError> {
    writes
        .run(Some(account.0), move |txn| {
            Box::pin(async move { Ok(webhooks::recover(txn, account, since, Utc::now()).await?) })
        })
        .await
}

fn endpoint_view(e: &webhooks::Endpoint) -> WebhookEndpoint {
    WebhookEndpoint {
        url: e.url.clone(),
        state: if e.disabled_at.is_some() {
            EndpointState::Disabled
        } else if e.failing_since.is_some() {
            EndpointState::Failing
        } else {
            EndpointState::Enabled
        },
        failing_since: e.failing_since,
        last_success_at: e.last_success_at,
        last_failure_at: e.last_failure_at,
        disabled_at: e.disabled_at,
    }
}

/// The endpoints the key's account sends to: every URL it has sent to, and its configured URL.
pub async fn endpoints(
    db: &DatabaseConnection,
    key: &KeyEntry,
) -> Result<Vec<WebhookEndpoint>, ApiError> {
    let mut out: Vec<WebhookEndpoint> = webhooks::endpoints(db, key.account)
        .await?
        .iter()
        .map(endpoint_view)
        .collect();
    if let Some(url) = &key.policy.account.webhook_url
        && !out.iter().any(|e| &e.url == url)
    {
        out.push(WebhookEndpoint {
            url: url.clone(),
            state: EndpointState::Enabled,
            failing_since: None,
            last_success_at: None,
            last_failure_at: None,
            disabled_at: None,
        });
        out.sort_by(|a, b| a.url.cmp(&b.url));
    }
    Ok(out)
}

/// Enables the key's endpoint `url` again and releases its held deliveries; 404 for a URL the
/// key never sent to.
pub async fn enable(
    db: &DatabaseConnection,
    writes: &Writes,
    account: AccountId,
    url: String,
) -> Result<EndpointEnabled, ApiError> {
    let target = url.clone();
    let released = writes
        .run(Some(account.0), move |txn| {
            let url = target.clone();
            Box::pin(
                async move { Ok(webhooks::enable_endpoint(txn, account, &url, Utc::now()).await?) },
            )
        })
        .await?;
    let Some(released) = released else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no webhook was ever sent to {url} by this key"),
        ));
    };
    let endpoint = webhooks::endpoints(db, account)
        .await?
        .iter()
        .find(|e| e.url == url)
        .map(endpoint_view)
        .ok_or_else(|| ApiError::internal("an enabled endpoint vanished"))?;
    Ok(EndpointEnabled { endpoint, released })
}
