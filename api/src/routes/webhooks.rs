//! `/api/enterprise/webhooks`: the customer's own webhook deliveries and endpoints.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::Request;
use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use uuid::Uuid;

use crate::auth::CustomerKey;
use crate::error::ApiError;
use crate::routes::batches::{CustomerTags, Read};
use crate::schemas::webhooks::{
    Delivery, DeliveryDetail, DeliveryList, DeliveryState, EnableEndpointRequest, EndpointEnabled,
    RecoverRequest, Recovered, WebhookEndpoint,
};
use crate::service::webhooks::customer::{self, ListQuery};
use crate::state::AppState;

/// Tells this node's dispatcher that the customer says these endpoints are back (no backoff
/// for them) and wakes it.
fn endpoints_back(state: &AppState, urls: impl IntoIterator<Item = String>) {
    if let Ok(mut back) = state.webhook_back.lock() {
        back.extend(urls);
    }
    state.webhook_wakeup.notify_one();
}

/// The customer's webhook operations.
pub struct CustomerWebhooksApi;

crate::routes::customer_api! {
impl CustomerWebhooksApi {
    /// List webhook deliveries
    ///
    /// The account's deliveries, newest first: one per event and endpoint, with where it stands and
    /// its last attempt. Filter by status, event type, batch and creation time; pass
    /// `next_cursor` as `cursor` for the next page. Deliveries removed by retention
    /// (`retention.webhook_days`) are no longer listed.
    ///
    /// Scope: `webhooks:read`.
    #[oai(
        path = "/webhooks/deliveries",
        method = "get",
        operation_id = "list_webhook_deliveries",
        tag = "CustomerTags::Webhooks"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_webhook_deliveries(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        /// Only deliveries in this state.
        status: Query<Option<DeliveryState>>,
        /// Only events of this type, e.g. `batch.completed`.
        #[oai(validator(max_length = 64, pattern = r"^[a-z]+\.[a-z_]+$"))]
        event_type: Query<Option<String>>,
        /// Only events about this batch.
        batch_id: Query<Option<Uuid>>,
        /// Only deliveries created at or after this time (RFC 3339).
        since: Query<Option<DateTime<Utc>>>,
        /// Page size, 1–100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(pattern = r"^[A-Za-z0-9_-]{22}$"))]
        cursor: Query<Option<String>>,
    ) -> Result<Read<DeliveryList>, ApiError> {
        let (data, next_cursor) = customer::list(
            &state.db,
            auth.0.key.account,
            &ListQuery {
                status: status.0,
                event_type: event_type.0,
                batch_id: batch_id.0,
                since: since.0,
                limit: u64::from(limit.0.unwrap_or(20)),
                cursor: cursor.0,
            },
        )
        .await?;
        Ok(Read::Ok(Json(DeliveryList {
            has_more: next_cursor.is_some(),
            data,
            next_cursor,
        })))
    }

    /// Get a webhook delivery
    ///
    /// The delivery with every attempt: when, the HTTP status or the kind of failure, the
    /// latency and the first 1 KB of the answer. Another account's delivery is 404.
    ///
    /// Scope: `webhooks:read`.
    #[oai(
        path = "/webhooks/deliveries/:delivery_id",
        method = "get",
        operation_id = "get_webhook_delivery",
        tag = "CustomerTags::Webhooks"
    )]
    async fn get_webhook_delivery(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        delivery_id: Path<Uuid>,
    ) -> Result<Read<DeliveryDetail>, ApiError> {
        Ok(Read::Ok(Json(
            customer::detail(&state.db, auth.0.key.account, delivery_id.0).await?,
        )))
    }

    /// Resend a webhook delivery
    ///
    /// A new attempt now for a delivered or failed delivery, with the same `webhook-id`
    /// (receivers deduplicate by it). A delivery with an attempt due or in flight is answered
    /// as it is: never two attempts at once. A repeat with the same `Idempotency-Key` sends
    /// nothing more. 409 while its endpoint is disabled; another account's delivery is 404.
    ///
    /// Scope: `webhooks:write`.
    #[oai(
        path = "/webhooks/deliveries/:delivery_id/resend",
        method = "post",
        operation_id = "resend_webhook_delivery",
        tag = "CustomerTags::Webhooks"
    )]
    async fn resend_webhook_delivery(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        delivery_id: Path<Uuid>,
        /// Makes the resend idempotent: a repeat with the same key sends nothing more.
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        req: &Request,
    ) -> Result<Read<Delivery>, ApiError> {
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key.0)?;
        let d = customer::resend(
            &state.db,
            &state.writes,
            auth.0.key.account,
            delivery_id.0,
            idempotency_key.0,
        )
        .await?;
        endpoints_back(&state, [d.target_url.clone()]);
        Ok(Read::Ok(Json(d)))
    }

    /// Recover failed webhooks
    ///
    /// Sends again, once each and oldest first, every delivery of the account that ended `failed`
    /// and was created at or after `since` (e.g. the start of an outage of your endpoint),
    /// under the usual per-endpoint limits. A repeat of the call queues nothing new.
    ///
    /// Scope: `webhooks:write`.
    #[oai(
        path = "/webhooks/recover",
        method = "post",
        operation_id = "recover_webhooks",
        tag = "CustomerTags::Webhooks"
    )]
    async fn recover_webhooks(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        body: Json<RecoverRequest>,
    ) -> Result<Read<Recovered>, ApiError> {
        let queued = customer::recover(&state.writes, auth.0.key.account, body.0.since).await?;
        let urls = customer::endpoints(&state.db, &auth.0.key).await?;
        endpoints_back(&state, urls.into_iter().map(|e| e.url));
        Ok(Read::Ok(Json(Recovered { queued })))
    }

    /// List webhook endpoints
    ///
    /// Each URL the account's webhooks go to, with its state: `enabled`, `failing` (every attempt
    /// since `failing_since` failed) or `disabled` (failing for `webhooks.disable_after`: new
    /// events are held until you enable it).
    ///
    /// Scope: `webhooks:read`.
    #[oai(
        path = "/webhooks/endpoints",
        method = "get",
        operation_id = "list_webhook_endpoints",
        tag = "CustomerTags::Webhooks"
    )]
    async fn list_webhook_endpoints(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
    ) -> Result<Read<Vec<WebhookEndpoint>>, ApiError> {
        Ok(Read::Ok(Json(
            customer::endpoints(&state.db, &auth.0.key).await?,
        )))
    }

    /// Enable a webhook endpoint
    ///
    /// Enables a disabled endpoint again and releases its held events, sent at once oldest
    /// first. A URL the account never sent to is 404.
    ///
    /// Scope: `webhooks:write`.
    #[oai(
        path = "/webhooks/endpoints/enable",
        method = "post",
        operation_id = "enable_webhook_endpoint",
        tag = "CustomerTags::Webhooks"
    )]
    async fn enable_webhook_endpoint(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        body: Json<EnableEndpointRequest>,
    ) -> Result<Read<EndpointEnabled>, ApiError> {
        let out = customer::enable(
            &state.db,
            &state.writes,
            auth.0.key.account,
            body.0.url.into_string(),
        )
        .await?;
        endpoints_back(&state, [out.endpoint.url.clone()]);
        Ok(Read::Ok(Json(out)))
    }
}
}
