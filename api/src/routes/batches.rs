//! `/api/enterprise`: the customer API (batches, credits, usage).
use std::sync::Arc;

use poem::web::Data;
use poem::{Body, Request};
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, ResponseContent, Tags};
use uuid::Uuid;

use crate::auth::{Caller, CustomerKey};
use crate::call::AuditTemplate;
use crate::domain::ids::{AccountId, BatchId};
use crate::error::ApiError;
use crate::schemas::batches::{
    Batch, BatchCreated, BatchList, BatchStatusFilter, CreateBatchRequest, ItemPage, ItemStatus,
    RetryFailedRequest,
};
use crate::schemas::credits::{Credits, Usage};
use crate::service::batches::{self, AuditInfo, CreateOutcome, Export};
use crate::service::credits;
use crate::service::retry;
use crate::state::AppState;

/// Groups of the customer API.
#[derive(Tags)]
pub enum CustomerTags {
    /// Create, read, list and cancel batches.
    Batches,
    /// Wallet and usage.
    Account,
    /// Your webhook deliveries and endpoints: inspect, resend, recover, enable.
    Webhooks,
}

/// The customer API.
pub struct CustomerApi;

/// Answer of `create_batch`.
#[derive(ApiResponse)]
pub enum CreateBatchResponse {
    /// The batch was created and its credits held.
    #[oai(status = 201)]
    Created(Json<BatchCreated>),
    /// A repeat of an earlier identical request: the stored answer, with credits as of now.
    #[oai(status = 200)]
    Replayed(
        Json<BatchCreated>,
        /// Always `true`.
        #[oai(header = "Idempotent-Replayed")]
        String,
    ),
}

/// An export's body: JSON Lines, or the very same lines as a download for a client whose
/// `Accept` names `application/octet-stream` and not `application/x-ndjson` (stock SDK
/// generators type that one as bytes).
#[derive(ResponseContent)]
pub enum ExportBody {
    /// JSON Lines.
    #[oai(content_type = "application/x-ndjson")]
    JsonLines(Binary<Body>),
    /// The same lines as a download.
    Download(Binary<Body>),
}

/// Answer of the results export.
#[derive(ApiResponse)]
pub enum Results {
    /// One JSON object per line and item, in request order: `item_id`, `index`, `status`,
    /// `attempts`, `error_code`, `message`, `result_url`, `result`, `error`.
    #[oai(status = 200)]
    Ok(ExportBody),
}

/// Answer of the error export.
#[derive(ApiResponse)]
pub enum Errors {
    /// One JSON object per line and failed or expired item, in request order: `item_id`,
    /// `index`, `status`, `attempts`, `error_code`, `message`, `prompt`, `params`.
    #[oai(status = 200)]
    Ok(ExportBody),
}

/// Whether the client asked for the download form: its `Accept` names
/// `application/octet-stream` and not JSON Lines (`*/*`, none, or both: JSON Lines).
fn wants_download(req: &Request) -> bool {
    let accept = req
        .headers()
        .get_all(poem::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    accept.contains("application/octet-stream") && !accept.contains("application/x-ndjson")
}

/// The body of an export of the account's batch (404 for another account's batch), streamed,
/// in the form the client asked for.
async fn export(
    state: &AppState,
    req: &Request,
    account: AccountId,
    batch_id: Uuid,
    export: Export,
) -> Result<ExportBody, ApiError> {
    crate::call::note_batch(req, batch_id);
    batches::check_owner(&state.db, account, BatchId(batch_id)).await?;
    let body = Binary(Body::from_bytes_stream(batches::export_stream(
        state.db.clone(),
        batch_id,
        export,
    )));
    Ok(if wants_download(req) {
        ExportBody::Download(body)
    } else {
        ExportBody::JsonLines(body)
    })
}

/// What a create needs to count and audit itself: the audit layer's usage-row template, the
/// key's secret version and the caller's quota.
fn audit_info(state: &AppState, req: &Request, caller: &Caller) -> AuditInfo {
    let mut template = req
        .extensions()
        .get::<AuditTemplate>()
        .cloned()
        .unwrap_or_else(|| AuditTemplate(Default::default(), std::time::Instant::now()));
    template.0.key_version = Some(caller.key_version);
    template.0.api_key_id = Some(caller.key.id);
    template.0.account_id = Some(caller.key.account.0);
    AuditInfo {
        row: template.0,
        started: template.1,
        now: state.clock.now(),
        quota: caller.quota.clone(),
        record: crate::call::of(req).cloned(),
    }
}

/// Answer of the read endpoints.
#[derive(ApiResponse)]
pub enum Read<T: poem_openapi::types::ToJSON + Send + Sync> {
    /// OK.
    #[oai(status = 200)]
    Ok(Json<T>),
}

crate::routes::customer_api! {
impl CustomerApi {
    /// Create a batch
    ///
    /// Holds `total_count * cost_per_video` credits from the account's wallet and queues the
    /// items. Idempotent by `request_id` (or the `Idempotency-Key` header), per account: a
    /// repeat with the same body, through any key of the account, returns the stored answer
    /// with status 200; the same id with another body is 409.
    ///
    /// Scope: `batches:write`.
    #[oai(
        path = "/video-batch",
        method = "post",
        operation_id = "create_batch",
        tag = "CustomerTags::Batches"
    )]
    async fn create_batch(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        /// Idempotency key; must equal `request_id` when both are sent.
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        body: Json<CreateBatchRequest>,
        req: &Request,
    ) -> Result<CreateBatchResponse, ApiError> {
        let caller = auth.0;
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key.0)?;
        let out = batches::create(
            &state.db,
            &state.writes,
            &caller.runtime,
            &caller.key,
            &body.0,
            idempotency_key.0.as_deref(),
            audit_info(&state, req, &caller),
        )
        .await?;
        Ok(match out {
            CreateOutcome::Created(b) => CreateBatchResponse::Created(Json(b)),
            CreateOutcome::Replayed(b) => CreateBatchResponse::Replayed(Json(b), "true".into()),
        })
    }

    /// Get a batch
    ///
    /// The batch with its counts and its first 100 items; `items_next_cursor` is present when
    /// more follow (page them with `GET /video-batch/{batch_id}/items`, or export every outcome
    /// with `GET /video-batch/{batch_id}/results`). Another account's batch is 404.
    ///
    /// Scope: `batches:read`.
    #[oai(
        path = "/video-batch/:batch_id",
        method = "get",
        operation_id = "get_batch",
        tag = "CustomerTags::Batches"
    )]
    async fn get_batch(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        batch_id: Path<Uuid>,
        req: &Request,
    ) -> Result<Read<Batch>, ApiError> {
        crate::call::note_batch(req, batch_id.0);
        Ok(Read::Ok(Json(
            batches::get(&state.db, auth.0.key.account, BatchId(batch_id.0)).await?,
        )))
    }

    /// List a batch's items
    ///
    /// In request order, optionally of one status. Pass `next_cursor` as `cursor` for the next
    /// page. Another account's batch is 404.
    ///
    /// Scope: `batches:read`.
    #[oai(
        path = "/video-batch/:batch_id/items",
        method = "get",
        operation_id = "list_batch_items",
        tag = "CustomerTags::Batches"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_batch_items(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        batch_id: Path<Uuid>,
        /// Only items in this status.
        status: Query<Option<ItemStatus>>,
        /// Page size, 1–1000 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(pattern = r"^[A-Za-z0-9_-]{6}$"))]
        cursor: Query<Option<String>>,
        req: &Request,
    ) -> Result<Read<ItemPage>, ApiError> {
        crate::call::note_batch(req, batch_id.0);
        let (data, next_cursor) = batches::items_page(
            &state.db,
            auth.0.key.account,
            BatchId(batch_id.0),
            status.0,
            u64::from(limit.0.unwrap_or(100)),
            cursor.0.as_deref(),
        )
        .await?;
        Ok(Read::Ok(Json(ItemPage {
            has_more: next_cursor.is_some(),
            data,
            next_cursor,
        })))
    }

    /// Export a batch's results
    ///
    /// Every item's outcome as JSON Lines (`application/x-ndjson`), streamed in request order,
    /// like a Batch API output file: fetch it once when the batch is final instead of polling
    /// every item. With `Accept: application/octet-stream` the same lines come as a download.
    /// Another account's batch is 404.
    ///
    /// Scope: `batches:read`.
    #[oai(
        path = "/video-batch/:batch_id/results",
        method = "get",
        operation_id = "get_batch_results",
        tag = "CustomerTags::Batches"
    )]
    async fn get_batch_results(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: CustomerKey,
        batch_id: Path<Uuid>,
    ) -> Result<Results, ApiError> {
        Ok(Results::Ok(
            export(&state, req, auth.0.key.account, batch_id.0, Export::Results).await?,
        ))
    }

    /// Export a batch's failures
    ///
    /// The failed and expired items as JSON Lines (`application/x-ndjson`), streamed in request
    /// order: `item_id`, `index`, `status`, `attempts`, `error_code`, `message`, `prompt` and
    /// `params` (and `original_index` in a retry), enough to act on each failure or resubmit
    /// it. Empty while nothing failed. With `Accept: application/octet-stream` the same lines
    /// come as a download. Another account's batch is 404.
    ///
    /// Scope: `batches:read`.
    #[oai(
        path = "/video-batch/:batch_id/errors",
        method = "get",
        operation_id = "get_batch_errors",
        tag = "CustomerTags::Batches"
    )]
    async fn get_batch_errors(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: CustomerKey,
        batch_id: Path<Uuid>,
    ) -> Result<Errors, ApiError> {
        Ok(Errors::Ok(
            export(&state, req, auth.0.key.account, batch_id.0, Export::Errors).await?,
        ))
    }

    /// Retry a batch's failed items
    ///
    /// Creates a new batch of exactly the failed items (and the expired ones with
    /// `include_expired`) of a finished batch, with their prompts and params; each new item
    /// carries its `original_index`, the new batch `retry_of`, and the original `retried_by`.
    /// It passes every check of a create: the create quota, the batch cap and a credit hold
    /// (402 when the wallet cannot hold it). Idempotent like a create; without a
    /// `request_id` a repeat answers the first retry (200). 409 `CONFLICT` (`details.reason`
    /// `batch_not_finished`) while the batch has queued or running items, 422
    /// `VALIDATION_ERROR` (`details.reason` `nothing_to_retry`) when none failed.
    ///
    /// Scope: `batches:write`.
    #[oai(
        path = "/video-batch/:batch_id/retry-failed",
        method = "post",
        operation_id = "retry_failed_items",
        tag = "CustomerTags::Batches"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn retry_failed_items(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        batch_id: Path<Uuid>,
        /// Idempotency key; must equal `request_id` when both are sent.
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        body: Json<Option<RetryFailedRequest>>,
        req: &Request,
    ) -> Result<CreateBatchResponse, ApiError> {
        crate::call::note_batch(req, batch_id.0);
        let caller = auth.0;
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key.0)?;
        let body = body.0.unwrap_or_default();
        let out = retry::retry_failed(
            &state.db,
            &state.writes,
            &caller.runtime,
            &caller.key,
            batch_id.0,
            retry::RetryRequest {
                request_id: body.request_id.map(|r| r.into_string()),
                include_expired: body.include_expired.unwrap_or(false),
            },
            idempotency_key.0.as_deref(),
            audit_info(&state, req, &caller),
        )
        .await?;
        Ok(match out {
            CreateOutcome::Created(b) => CreateBatchResponse::Created(Json(b)),
            CreateOutcome::Replayed(b) => CreateBatchResponse::Replayed(Json(b), "true".into()),
        })
    }

    /// List batches
    ///
    /// The account's batches (whichever of its keys created them), newest first, without items.
    /// Pass `next_cursor` as `cursor` for the next page.
    ///
    /// Scope: `batches:read`.
    #[oai(
        path = "/video-batch",
        method = "get",
        operation_id = "list_batches",
        tag = "CustomerTags::Batches"
    )]
    async fn list_batches(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        /// Only batches in this status.
        status: Query<Option<BatchStatusFilter>>,
        /// Page size, 1–100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(pattern = r"^[A-Za-z0-9_-]{22}$"))]
        cursor: Query<Option<String>>,
    ) -> Result<Read<BatchList>, ApiError> {
        let (data, next_cursor) = batches::list(
            &state.db,
            auth.0.key.account,
            status.0.map(Into::into),
            u64::from(limit.0.unwrap_or(20)),
            cursor.0.as_deref(),
        )
        .await?;
        Ok(Read::Ok(Json(BatchList {
            has_more: next_cursor.is_some(),
            data,
            next_cursor,
        })))
    }

    /// Cancel a batch
    ///
    /// Queued items are cancelled and their holds released at once; running items may finish.
    /// Cancelling a final batch changes nothing.
    ///
    /// Scope: `batches:write`.
    #[oai(
        path = "/video-batch/:batch_id/cancel",
        method = "post",
        operation_id = "cancel_batch",
        tag = "CustomerTags::Batches"
    )]
    async fn cancel_batch(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        batch_id: Path<Uuid>,
        req: &Request,
    ) -> Result<Read<Batch>, ApiError> {
        crate::call::note_batch(req, batch_id.0);
        let caller = auth.0;
        Ok(Read::Ok(Json({
            let batch = batches::cancel(
                &state.db,
                &state.writes,
                caller.runtime,
                caller.key.account,
                BatchId(batch_id.0),
            )
            .await?;
            // A cancel may have finished the batch: its event is sent at once.
            state.webhook_wakeup.notify_one();
            batch
        })))
    }

    /// Get credits
    ///
    /// The account's wallet (shared by all its keys): balance, held and available credits, and
    /// the latest ledger rows.
    ///
    /// Scope: `credits:read`.
    #[oai(
        path = "/credits",
        method = "get",
        operation_id = "get_credits",
        tag = "CustomerTags::Account"
    )]
    async fn get_credits(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        /// Ledger rows to return, 1–200 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Read<Credits>, ApiError> {
        let limit = u64::from(limit.0.unwrap_or(50));
        Ok(Read::Ok(Json(
            credits::view(&state.db, auth.0.key.account, limit, None).await?,
        )))
    }

    /// Get usage
    ///
    /// The account's calls (through all its keys) and credits charged per UTC day, `from` to
    /// `to` inclusive (default: the last 30 days), and the period's calls per key (`keys`). `from` must not be after `to`, and the period spans at
    /// most 366 days (422 otherwise).
    ///
    /// Scope: `usage:read`.
    #[oai(
        path = "/usage",
        method = "get",
        operation_id = "get_usage",
        tag = "CustomerTags::Account"
    )]
    async fn get_usage(
        &self,
        state: Data<&Arc<AppState>>,
        auth: CustomerKey,
        /// First day (UTC), e.g. 2026-11-01.
        #[oai(validator(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
        from: Query<Option<String>>,
        /// Last day (UTC), inclusive.
        #[oai(validator(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
        to: Query<Option<String>>,
    ) -> Result<Read<Usage>, ApiError> {
        Ok(Read::Ok(Json(
            crate::service::usage::report(
                &state.db,
                auth.0.key.account,
                state.clock.now().date_naive(),
                from.0.as_deref(),
                to.0.as_deref(),
            )
            .await?,
        )))
    }
}
}
