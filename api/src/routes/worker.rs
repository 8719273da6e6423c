//! `/api/internal/worker`: the GPU workers' API.
use std::sync::Arc;

use chrono::Duration;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use uuid::Uuid;

use crate::auth::WorkerAuth;
use crate::domain::ids::{ItemId, LeaseToken};
use crate::error::ApiError;
use crate::schemas::worker::{
    ClaimRequest, ClaimResponse, CompleteRequest, FailRequest, HeartbeatRequest, ItemState,
};
use crate::service::leases;
use crate::state::AppState;

/// Groups of the worker API.
#[derive(Tags)]
pub enum WorkerTags {
    /// Claim items and report their outcome.
    Items,
}

/// The worker API.
pub struct WorkerApi;

#[OpenApi(prefix_path = "/")]
impl WorkerApi {
    /// Claim items
    ///
    /// Leases up to `max_items` queued items, fair across keys. An empty list means no work.
    #[oai(
        path = "/claim",
        method = "post",
        operation_id = "claim_items",
        tag = "WorkerTags::Items"
    )]
    async fn claim(
        &self,
        state: Data<&Arc<AppState>>,
        auth: WorkerAuth,
        body: Json<ClaimRequest>,
    ) -> Result<Json<ClaimResponse>, ApiError> {
        let secs = body
            .0
            .lease_seconds
            .unwrap_or(auth.0.settings.worker.lease_seconds);
        let items = leases::claim(
            &state.writes,
            Arc::clone(&auth.0),
            &body.0.worker_id,
            body.0.max_items,
            Duration::seconds(secs.into()),
        )
        .await?;
        Ok(Json(ClaimResponse { items }))
    }

    /// Extend a lease
    #[oai(
        path = "/items/:item_id/heartbeat",
        method = "post",
        operation_id = "heartbeat_item",
        tag = "WorkerTags::Items"
    )]
    async fn heartbeat(
        &self,
        state: Data<&Arc<AppState>>,
        auth: WorkerAuth,
        item_id: Path<Uuid>,
        body: Json<HeartbeatRequest>,
    ) -> Result<Json<ItemState>, ApiError> {
        let secs = body
            .0
            .lease_seconds
            .unwrap_or(auth.0.settings.worker.lease_seconds);
        Ok(Json(
            leases::heartbeat(
                &state.db,
                &state.writes,
                ItemId(item_id.0),
                LeaseToken(body.0.lease_token),
                Duration::seconds(secs.into()),
            )
            .await?,
        ))
    }

    /// Report success
    ///
    /// Charges the item's cost. A stale token is 409 `LEASE_LOST` and changes nothing.
    #[oai(
        path = "/items/:item_id/complete",
        method = "post",
        operation_id = "complete_item",
        tag = "WorkerTags::Items"
    )]
    async fn complete(
        &self,
        state: Data<&Arc<AppState>>,
        auth: WorkerAuth,
        item_id: Path<Uuid>,
        body: Json<CompleteRequest>,
    ) -> Result<Json<ItemState>, ApiError> {
        let result = body
            .0
            .result
            .as_ref()
            .map(|r| serde_json::to_string(r).unwrap_or_default());
        let state_now = leases::complete(
            &state.db,
            &state.writes,
            auth.0,
            ItemId(item_id.0),
            LeaseToken(body.0.lease_token),
            body.0.result_url.into_string(),
            result,
        )
        .await?;
        // Item and batch events this report wrote are sent at once.
        state.webhook_wakeup.notify_one();
        Ok(Json(state_now))
    }

    /// Report failure
    ///
    /// Requeues while attempts remain and the failure is retryable (`retryable`, or by default
    /// its `error_code`); otherwise fails the item and releases its hold. The item keeps the
    /// code and message, and the customer sees them.
    #[oai(
        path = "/items/:item_id/fail",
        method = "post",
        operation_id = "fail_item",
        tag = "WorkerTags::Items"
    )]
    async fn fail(
        &self,
        state: Data<&Arc<AppState>>,
        auth: WorkerAuth,
        item_id: Path<Uuid>,
        body: Json<FailRequest>,
    ) -> Result<Json<ItemState>, ApiError> {
        let report = leases::Reported::from_request(body.0)?;
        let state_now =
            leases::fail(&state.db, &state.writes, auth.0, ItemId(item_id.0), report).await?;
        state.webhook_wakeup.notify_one();
        Ok(Json(state_now))
    }
}
