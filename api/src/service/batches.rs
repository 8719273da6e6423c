//! Batches: the create path (idempotency, credit hold, items, audit in one transaction),
//! reads, listing and cancel.

use chrono::{DateTime, Utc};
use entity::batch_job;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use serde_json::json;
use uuid::Uuid;

use std::sync::Arc;

use crate::domain::failure::FailureCode;
use crate::domain::ids::{AccountId, BatchId};
use crate::domain::{NewBatch, RequestId};
use crate::error::{ApiError, ErrorCode};
use crate::schemas::batches::{
    Batch, BatchCreated, BatchItemView, BatchStatus, CreateBatchRequest, ItemStatus,
};
use crate::service::credits::{self, LedgerKind, NewEntry};
use crate::service::rate_limit;
use crate::service::usage::UsageRow;
use crate::service::webhooks;
use crate::state::{KeyEntry, Runtime};
use crate::store::commit::{self, Writes};
use crate::store::unit::Txn;
use crate::store::{counts, items, jobs, wallets};

use super::views::parse_json;
use super::views::{item_view, view};

/// How a create ended.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A new batch (201).
    Created(BatchCreated),
    /// The stored answer to an earlier identical request (200).
    Replayed(BatchCreated),
}

/// What the create transaction needs to audit itself.
#[derive(Clone)]
pub struct AuditInfo {
    /// Template of the usage row (method, path, ip, user agent…).
    pub row: UsageRow,
    /// When the call started.
    pub started: std::time::Instant,
    /// The service's time of the call (the batch's `created_at` and the audit minute).
    pub now: chrono::DateTime<Utc>,
    /// The call's quota, counted in the commit that writes the batch (over it, nothing is
    /// written and the call is answered 429). `None`: the call was counted already.
    pub quota: Option<crate::call::PendingQuota>,
    /// The call's record, where the create notes what it counted and wrote (none outside a
    /// request: the benchmark's loops).
    pub record: Option<Arc<crate::call::CallRecord>>,
}

/// Creates a batch, or replays / refuses a repeat of an earlier request id.
/// The order of checks after authentication follows the contract: idempotency, validation
/// and caps, credit hold.
pub async fn create(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: &Arc<Runtime>,
    key: &KeyEntry,
    req: &CreateBatchRequest,
    header_request_id: Option<&str>,
    audit: AuditInfo,
) -> Result<CreateOutcome, ApiError> {
    create_batch(
        db,
        writes,
        runtime,
        key,
        req,
        header_request_id,
        audit,
        None,
    )
    .await
}

/// What makes a create a retry of another batch's failed items.
#[derive(Clone, Debug)]
pub struct RetryOf {
    /// The batch retried.
    pub batch_id: Uuid,
    /// The fingerprint of the retry request (it stands for the request's items).
    pub fingerprint: String,
    /// Each item's index in the batch retried, in the order of the request's items.
    pub source_idx: Vec<i32>,
}

/// [`create`], or a retry of failed items when `retry` is given: the same checks, hold and
/// writes, with the new batch linked to the one it retries in the same transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn create_batch(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: &Arc<Runtime>,
    key: &KeyEntry,
    req: &CreateBatchRequest,
    header_request_id: Option<&str>,
    audit: AuditInfo,
    retry: Option<RetryOf>,
) -> Result<CreateOutcome, ApiError> {
    let (rid, chosen_by_client) = match (&req.request_id, header_request_id) {
        (Some(body), Some(header)) if **body != *header => {
            return Err(ApiError::validation(
                "request_id",
                "differs from the Idempotency-Key header; send one or make them equal",
            ));
        }
        (Some(id), _) => (RequestId::parse("request_id", id)?, true),
        (None, Some(id)) => (RequestId::parse("Idempotency-Key", id)?, true),
        (None, None) => (RequestId::generate(), false),
    };
    crate::context::set_call_request_id(Some(rid.as_str().to_string()));
    let record = audit.record.clone();
    let record = record.as_deref();
    let fingerprint = match &retry {
        Some(r) => r.fingerprint.clone(),
        None => crate::service::validate::fingerprint(req),
    };

    // A repeat of a committed request is answered before anything else. An id the server just
    // made up cannot have been used; a repeat still in flight is caught by the batch insert.
    if chosen_by_client
        && let Some(existing) = jobs::by_request_id(db, key.account, rid.as_str()).await?
    {
        crate::call::note(record, |s| s.batch_id = Some(existing.id));
        return replay(db, key.account, existing, &fingerprint).await;
    }

    let limits = &key.policy.account.limits;
    let mut batch = crate::service::validate::new_batch(
        req,
        limits,
        runtime.settings.webhooks.allow_private_targets,
    )?;
    if let Some(r) = &retry {
        for (item, idx) in batch.items.iter_mut().zip(&r.source_idx) {
            item.source_idx = Some(*idx);
        }
    }
    if batch.webhook_url.is_some() && key.policy.account.webhook_secret.is_none() {
        return Err(ApiError::validation(
            "webhook_url",
            "this account has no webhook signing secret configured; ask your administrator to set \
             one",
        ));
    }
    let n = batch.items.len() as i64;
    let cost = limits.cost_per_video;
    let need = n * cost;
    let now = audit.now;
    let batch_id = Uuid::now_v7();
    let expires_at = batch
        .completion_window
        .or(limits.completion_window)
        .and_then(|w| chrono::Duration::from_std(w).ok())
        // Whole microseconds: what both stores keep, so the answer equals the stored value.
        .map(|w| {
            use chrono::DurationRound;
            let at = now + w;
            at.duration_trunc(chrono::TimeDelta::microseconds(1))
                .unwrap_or(at)
        });

    let mut audit = audit;
    let quota = audit.quota.take();
    let unit = Arc::new(NewBatchUnit {
        key_id: key.account.0,
        rid: rid.as_str().to_string(),
        fingerprint: fingerprint.clone(),
        batch,
        batch_id,
        n,
        cost,
        need,
        now,
        expires_at,
        audit,
        retry_of: retry.map(|r| r.batch_id),
    });
    let watch = Arc::clone(runtime);
    let work = commit::work(move |txn| {
        let unit = Arc::clone(&unit);
        let runtime = Arc::clone(&watch);
        Box::pin(async move {
            let created = write_new_batch(txn, &unit).await?;
            if let Some(c) = &created {
                crate::service::webhooks::outbox::enqueue_low_credits(
                    txn,
                    &runtime,
                    AccountId(unit.key_id),
                    c.available_credits,
                    c.remaining_credits,
                    unit.now,
                )
                .await?;
            }
            Ok(created)
        })
    });
    // The call's quota, when it is counted here: in the group that writes the batch (one
    // commit for both); over the quota nothing is written. From here on the call is counted
    // by this service, whatever happens, and never again by the audit layer.
    let written = match quota {
        Some(q) => {
            crate::call::note(record, |s| s.quota_consulted = true);
            let (info, written) = rate_limit::admit_and_run(writes, key.account, &q, work).await?;
            let info = rate_limit::tighter(info, q.own.clone());
            crate::call::note(record, |s| s.rate = Some(info.clone()));
            written.ok_or_else(|| rate_limit::refusal(&q.key_name, &info, "account"))?
        }
        None => writes.run(Some(key.account.0), work).await?,
    };
    let Some(response) = written else {
        let existing = jobs::by_request_id(db, key.account, rid.as_str())
            .await?
            .ok_or_else(|| ApiError::internal("idempotency conflict row vanished"))?;
        crate::call::note(record, |s| s.batch_id = Some(existing.id));
        return replay(db, key.account, existing, &fingerprint).await;
    };

    crate::call::note(record, |s| {
        s.audited = true;
        s.batch_id = Some(batch_id);
        s.items = n as i32;
        s.credits = need;
    });
    metrics::counter!("batches_created_total").increment(1);
    tracing::info!(key = %key.policy.name, %batch_id, items = n, credits = need, "batch created");
    Ok(CreateOutcome::Created(response))
}

/// Everything the create's unit of work writes.
pub struct NewBatchUnit {
    pub key_id: i64,
    /// The request id (validated).
    pub rid: String,
    /// SHA-256 of the canonical request.
    pub fingerprint: String,
    pub batch: NewBatch,
    pub batch_id: Uuid,
    /// Items.
    pub n: i64,
    /// Credits per item.
    pub cost: i64,
    /// Credits to hold: `n * cost`.
    pub need: i64,
    pub now: DateTime<Utc>,
    /// The end of the batch's completion window, if it has one.
    pub expires_at: Option<DateTime<Utc>>,
    pub audit: AuditInfo,
    /// The batch whose failed items this one retries.
    pub retry_of: Option<Uuid>,
}

/// The create's writes, a unit of a group: the conditional wallet hold (a create refused for
/// want of credits has changed nothing), the batch row (the idempotency insert; when another
/// request with the same id holds it, the hold is undone and the answer is `None`) and the
/// items at the key's place in the fair queue, in one call ([`jobs::NewJob::insert_held`]);
/// then the hold's ledger row and the call's audit row, which the group writes with its other
/// units' rows. One unit of the write
/// pipeline (the benchmark runs it alone, one commit per create, for its ceiling).
pub async fn write_new_batch(
    txn: &Txn<'_>,
    u: &NewBatchUnit,
) -> Result<Option<BatchCreated>, ApiError> {
    let NewBatchUnit {
        key_id,
        ref rid,
        ref fingerprint,
        ref batch,
        batch_id,
        n,
        cost,
        need,
        now,
        expires_at,
        ref audit,
        retry_of,
    } = *u;
    // Stored for replays, which report the credits available at replay time instead.
    let mut response = BatchCreated {
        ok: true,
        request_id: rid.as_str().to_string(),
        batch_id,
        idempotent_replay: false,
        status: BatchStatus::Queued,
        total_count: n,
        cost_per_video: cost,
        required_credits: need,
        available_credits: 0,
        remaining_credits: 0,
        created_at: now,
        expires_at,
    };
    let response_json = serde_json::to_string(&response).map_err(ApiError::internal)?;
    let start_pos = txn
        .fair_start(key_id, n, || items::fair_start(txn, AccountId(key_id)))
        .await?;
    let job = jobs::NewJob {
        id: batch_id,
        key_id,
        request_id: rid,
        fingerprint,
        total: n as i32,
        cost_per_video: cost,
        required_credits: need,
        webhook_url: batch.webhook_url.clone(),
        metadata: batch.metadata.clone(),
        response: response_json,
        now,
        expires_at,
    };
    // Releases of this key earlier in the group are applied first: the hold, the remaining
    // credits and a low-credit crossing are decided on the exact wallet.
    txn.settle_wallet(key_id).await?;
    let held = match job.insert_held(txn, &batch.items, start_pos).await? {
        jobs::Held::Created(wallet) => wallet,
        jobs::Held::Repeat(_) => {
            // An earlier request with the same id won (in this group or committed): the hold
            // is given back, so the wallet is as it was; the caller answers as a repeat once
            // that request is committed.
            if !wallets::apply(txn, AccountId(key_id), LedgerKind::Release, need, now).await? {
                return Err(ApiError::internal("undoing a hold failed: held too small"));
            }
            return Ok(None);
        }
        jobs::Held::Refused => {
            // Nothing is written. A repeat of a request committed since the caller looked is
            // answered as one, not refused.
            if jobs::by_request_id(txn, AccountId(key_id), rid)
                .await?
                .is_some()
            {
                return Ok(None);
            }
            let w = wallets::read(txn, AccountId(key_id)).await?;
            return Err(ApiError::new(
                ErrorCode::InsufficientCredits,
                format!("batch needs {need} credits, {} available", w.available()),
            )
            .with_details(
                json!({ "required_credits": need, "available_credits": w.available() }),
            ));
        }
    };
    txn.append_ledger(
        NewEntry::new(key_id, LedgerKind::Hold, need)
            .batch(batch_id)
            .row(now),
    );
    if let Some(original) = retry_of {
        jobs::link_retry(txn, original, batch_id).await?;
    }

    let mut row = audit.row.clone();
    row.status = 201;
    row.request_id = Some(rid.as_str().to_string());
    row.batch_id = Some(batch_id);
    row.items = n as i32;
    row.credits = need;
    row.latency_us = audit.started.elapsed().as_micros() as i64;
    txn.append_usage(row, now);
    response.available_credits = held.available() + need;
    response.remaining_credits = held.available();
    Ok(Some(response))
}

async fn replay(
    db: &DatabaseConnection,
    account: AccountId,
    existing: batch_job::Model,
    fingerprint: &str,
) -> Result<CreateOutcome, ApiError> {
    if existing.fingerprint != fingerprint {
        return Err(ApiError::new(
            ErrorCode::IdempotencyConflict,
            format!(
                "request_id {:?} was already used with a different request",
                existing.request_id
            ),
        )
        .with_details(json!({ "batch_id": existing.id })));
    }
    let mut stored: BatchCreated =
        serde_json::from_str(&existing.response).map_err(ApiError::internal)?;
    let available = credits::wallet(db, account).await?.available();
    stored.idempotent_replay = true;
    stored.available_credits = available;
    stored.remaining_credits = available;
    Ok(CreateOutcome::Replayed(stored))
}

/// One batch of an account, with its first page of items; another account's batch is not
/// found.
pub async fn get<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    batch: BatchId,
) -> Result<Batch, ApiError> {
    let batch_id = batch.0;
    let (job, open, mut rows) = jobs::owned_with_items(db, account, batch_id, ITEMS_PAGE + 1)
        .await?
        .ok_or_else(|| ApiError::not_found("batch", batch_id))?;
    let next = page_cursor(&mut rows, ITEMS_PAGE, |r| r.idx);
    let mut batch = view(&job, open, Some(rows.iter().map(item_view).collect()));
    batch.items_next_cursor = next;
    Ok(batch)
}

/// Cuts `rows` (read with one row more than a page) to `limit`: the cursor of the next page
/// (after the index `idx` gives of its last row) when more follow.
fn page_cursor<R>(rows: &mut Vec<R>, limit: u64, idx: impl Fn(&R) -> i32) -> Option<String> {
    if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_item_cursor(idx(r)))
    } else {
        None
    }
}

/// Items in one answer at most: `GET /video-batch/{id}` carries the first page.
pub const ITEMS_PAGE: u64 = 100;

/// The batch, if it belongs to the key (another key's batch is "not found").
async fn owned_batch<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    batch_id: Uuid,
) -> Result<batch_job::Model, ApiError> {
    jobs::owned(db, account, batch_id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch", batch_id))
}

/// Items after position `after` (exclusive) in request order, at most `limit`, through the
/// (batch_id, idx) index; the cursor of the next page when more follow.
async fn items_after<C: ConnectionTrait>(
    db: &C,
    batch_id: Uuid,
    status: Option<ItemStatus>,
    after: Option<i32>,
    limit: u64,
) -> Result<(Vec<BatchItemView>, Option<String>), ApiError> {
    let mut rows = items::page(
        db,
        batch_id,
        status.map(ItemStatus::as_str),
        after,
        limit + 1,
    )
    .await?;
    let next = page_cursor(&mut rows, limit, |r| r.idx);
    Ok((rows.iter().map(|r| item_view(&r.into())).collect(), next))
}

/// A page of a batch's items in request order, optionally of one status.
pub async fn items_page<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    batch: BatchId,
    status: Option<ItemStatus>,
    limit: u64,
    cursor: Option<&str>,
) -> Result<(Vec<BatchItemView>, Option<String>), ApiError> {
    let batch_id = batch.0;
    owned_batch(db, account, batch_id).await?;
    let after = cursor.map(decode_item_cursor).transpose()?;
    items_after(db, batch_id, status, after, limit).await
}

/// Items read per query while streaming an export: with prompts, params and messages of a few
/// KB each, a page is a few MB of rows, of their JSON and of the chunk sent.
const EXPORT_CHUNK: u64 = 250;

/// Which items an export streams, and what it says of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    /// Every item's outcome (`/results`).
    Results,
    /// The failed and expired items, with their prompts and params (`/errors`).
    Errors,
}

/// The items of an export as JSON Lines, in request order, read 1,000 at a time through the
/// (batch_id, idx) index: memory stays flat however large the batch. Check ownership first
/// with [`check_owner`].
pub fn export_stream(
    db: DatabaseConnection,
    batch_id: Uuid,
    export: Export,
) -> impl futures::Stream<Item = Result<hyper::body::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(Some(-1i32), move |after| {
        let db = db.clone();
        async move {
            let after = after?;
            let read = match export {
                Export::Results => {
                    items::page(&db, batch_id, None, Some(after), EXPORT_CHUNK).await
                }
                Export::Errors => items::failures_after(&db, batch_id, after, EXPORT_CHUNK).await,
            };
            let rows = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, %batch_id, "streaming an export failed");
                    return Some((Err(std::io::Error::other("reading the items failed")), None));
                }
            };
            let last = rows.last().map(|r| r.idx)?;
            let mut out = Vec::with_capacity(rows.len() * 160);
            for r in &rows {
                let code = FailureCode::of_item(r.status, r.error_code.as_deref())
                    .map(FailureCode::as_str);
                let mut line = json!({
                    "item_id": r.id,
                    "index": r.idx,
                    "status": ItemStatus::from(r.status).as_str(),
                    "attempts": r.attempts,
                    "error_code": code,
                    "message": r.error,
                });
                match export {
                    Export::Results => {
                        line["result_url"] = json!(r.result_url);
                        line["result"] = json!(parse_json(r.result.as_deref()));
                        line["error"] = json!(r.error);
                    }
                    Export::Errors => {
                        line["prompt"] = json!(r.prompt);
                        line["params"] = json!(parse_json(r.params.as_deref()));
                    }
                }
                if let Some(i) = r.source_idx {
                    line["original_index"] = json!(i);
                }
                out.extend_from_slice(line.to_string().as_bytes());
                out.push(b'\n');
            }
            let next = (rows.len() as u64 == EXPORT_CHUNK).then_some(last);
            Some((Ok(hyper::body::Bytes::from(out)), next))
        }
    })
}

/// 404 unless the batch belongs to the account.
pub async fn check_owner<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    batch: BatchId,
) -> Result<(), ApiError> {
    owned_batch(db, account, batch.0).await.map(|_| ())
}

/// A page of an account's batches, newest first. The cursor is opaque to clients.
pub async fn list<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    status: Option<BatchStatus>,
    limit: u64,
    cursor: Option<&str>,
) -> Result<(Vec<Batch>, Option<String>), ApiError> {
    let before = cursor.map(decode_cursor).transpose()?;
    let mut jobs = jobs::page(
        db,
        account,
        status.map(BatchStatus::as_str),
        before,
        limit + 1,
    )
    .await?;
    let more = jobs.len() as u64 > limit;
    jobs.truncate(limit as usize);
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let open = counts::open_counts(db, &ids).await?;
    let next = if more {
        jobs.last().map(|j| encode_cursor(j.id))
    } else {
        None
    };
    Ok((
        jobs.iter()
            .map(|j| {
                view(
                    &j.into(),
                    open.get(&j.id).copied().unwrap_or_default(),
                    None,
                )
            })
            .collect(),
        next,
    ))
}

/// Cursors are URL-safe base64 without padding of a position: 16 bytes (a batch id, 22
/// characters) or 4 (an item index, 6 characters). Any string of that shape decodes to a
/// position (bits past the last byte are ignored), so every cursor the documents allow is a
/// valid place to resume from.
const CURSOR: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

fn bad_cursor() -> ApiError {
    ApiError::validation("cursor", "is not a cursor returned by this endpoint")
}

pub(crate) fn encode_cursor(id: Uuid) -> String {
    use base64::Engine;
    CURSOR.encode(id.as_bytes())
}

pub(crate) fn decode_cursor(c: &str) -> Result<Uuid, ApiError> {
    use base64::Engine;
    CURSOR
        .decode(c)
        .ok()
        .and_then(|b| Uuid::from_slice(&b).ok())
        .ok_or_else(bad_cursor)
}

fn encode_item_cursor(idx: i32) -> String {
    use base64::Engine;
    CURSOR.encode(idx.to_be_bytes())
}

fn decode_item_cursor(c: &str) -> Result<i32, ApiError> {
    use base64::Engine;
    CURSOR
        .decode(c)
        .ok()
        .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
        .map(i32::from_be_bytes)
        .ok_or_else(bad_cursor)
}

/// Cancels a batch: queued items become cancelled and their holds are released at once;
/// running items may finish. Idempotent. The batch becomes `cancelled` when nothing runs.
pub async fn cancel(
    db: &DatabaseConnection,
    writes: &Writes,
    runtime: Arc<Runtime>,
    account: AccountId,
    batch: BatchId,
) -> Result<Batch, ApiError> {
    let batch_id = batch.0;
    writes
        .run(Some(account.0), move |txn| {
            let runtime = Arc::clone(&runtime);
            Box::pin(async move { cancel_in(txn, &runtime, account, batch_id).await })
        })
        .await?;
    get(db, account, batch).await
}

async fn cancel_in(
    txn: &Txn<'_>,
    runtime: &Runtime,
    account: AccountId,
    batch_id: Uuid,
) -> Result<(), ApiError> {
    let now = Utc::now();
    // A final batch is answered as it is, with nothing written.
    let seen = jobs::owned(txn, account, batch_id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch", batch_id))?;
    if seen.status.is_final() {
        return Ok(());
    }
    // Lock the batch row first: every transition of this batch serialises on it.
    if !jobs::lock_owned(txn, account, batch_id, now).await? {
        return Err(ApiError::not_found("batch", batch_id));
    }
    let job = jobs::by_id(txn, batch_id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch", batch_id))?;
    if job.status.is_final() {
        return Ok(());
    }
    let n = close_queued(
        txn,
        &job,
        entity::status::ItemState::Cancelled,
        "cancelled before running",
        now,
    )
    .await?;
    jobs::record_cancel(txn, batch_id, n as i32, now).await?;
    finalize_if_done(txn, runtime, batch_id, now).await?;
    Ok(())
}

/// Closes a batch's queued items as `status` (`cancelled`, `expired`) and releases their holds
/// in one ledger row noted `note`: how many. Call with the batch row locked.
pub(crate) async fn close_queued(
    txn: &Txn<'_>,
    job: &batch_job::Model,
    status: entity::status::ItemState,
    note: &str,
    now: DateTime<Utc>,
) -> Result<i64, ApiError> {
    let n = items::close_queued(txn, job.id, status, now).await? as i64;
    if n > 0 {
        let amount = n * job.cost_per_video;
        let release = NewEntry::new(job.api_key_id, LedgerKind::Release, amount)
            .batch(job.id)
            .note(Some(note));
        if !credits::apply_in(txn, release).await? {
            return Err(ApiError::internal(format!(
                "release of {amount} failed for batch {}",
                job.id
            )));
        }
    }
    Ok(n)
}

/// Marks the batch final when no item is open, and records its webhook event in the same
/// transaction. Call with the batch row locked.
pub async fn finalize_if_done<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    batch_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<batch_job::Model>, DbErr> {
    if !jobs::finish_if_done(txn, batch_id, now).await? {
        return Ok(None);
    }
    let job = jobs::by_id(txn, batch_id)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("batch_job {batch_id}")))?;
    let event = match job.status {
        entity::status::BatchState::Cancelled => "batch.cancelled",
        entity::status::BatchState::Expired => "batch.expired",
        _ => "batch.completed",
    };
    webhooks::enqueue_batch_event(txn, runtime, &job, event, now).await?;
    Ok(Some(job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NewItem;
    use crate::store::unit::GroupMemo;
    use sea_orm::{DatabaseTransaction, Statement, TransactionTrait};

    /// A migrated SQLite database with key 1 and a wallet of `balance` credits.
    async fn db_with_wallet(balance: i64) -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/b.db?mode=rwc", dir.path().display());
        let db = crate::db::connect_url(&url, 1, None).await.unwrap();
        crate::db::migrate(&db).await.unwrap();
        db.execute_unprepared(&format!(
            "INSERT INTO account (id, name, disabled, created_at, updated_at) \
             VALUES (1, 'k', FALSE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'); \
             INSERT INTO api_key (id, name, key_sha256, account_id, created_at, updated_at) \
             VALUES (1, 'k', 'h', 1, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'); \
             INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) \
             VALUES (1, {balance}, 0, '2026-01-01T00:00:00Z')"
        ))
        .await
        .unwrap();
        (dir, db)
    }

    /// A create of two items at 10 credits each with request id `rid`.
    fn unit(rid: &str) -> NewBatchUnit {
        let now = Utc::now();
        NewBatchUnit {
            key_id: 1,
            rid: rid.to_string(),
            fingerprint: "f".repeat(64),
            batch: NewBatch {
                items: vec![
                    NewItem {
                        prompt: "a".into(),
                        params: None,
                        source_idx: None,
                    };
                    2
                ],
                webhook_url: None,
                metadata: None,
                completion_window: None,
            },
            batch_id: Uuid::now_v7(),
            n: 2,
            cost: 10,
            need: 20,
            now,
            expires_at: None,
            audit: AuditInfo {
                quota: None,
                record: None,
                row: UsageRow::default(),
                started: std::time::Instant::now(),
                now,
            },
            retry_of: None,
        }
    }

    /// Runs the create `u` as one unit in `txn` (with the memo of its group); writes what it
    /// appended when it holds. Returns its outcome and whether it changed nothing.
    async fn run(
        txn: &DatabaseTransaction,
        memo: &GroupMemo,
        u: &NewBatchUnit,
    ) -> (Result<Option<BatchCreated>, ApiError>, bool) {
        let t = Txn::new(txn, memo);
        let r = write_new_batch(&t, u).await;
        let untouched = t.changed_nothing();
        if r.is_ok() {
            crate::store::appended::write_unit(&t).await.unwrap();
        }
        (r, untouched)
    }

    async fn held(db: &DatabaseConnection) -> (i64, i64) {
        let w = wallets::read(db, AccountId(1)).await.unwrap();
        (w.balance, w.held)
    }

    async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
        db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap()
    }

    /// On SQLite a group leaves the releases of its units to one wallet update at its end; a
    /// create later in the same group still sees them: threshold 100, 150 available, a release
    /// of 100 earlier in the group, a create of 20: 250 → 230, no crossing.
    #[tokio::test]
    async fn a_create_sees_the_releases_earlier_in_its_group() {
        let (_dir, db) = db_with_wallet(1000).await;
        db.execute_unprepared("UPDATE credit_wallet SET held = 850")
            .await
            .unwrap();
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        memo.defer_wallets([(1, (0, -100))].into_iter().collect());
        let (r, _) = run(&txn, &memo, &unit("after-release")).await;
        let created = r.unwrap().expect("created");
        assert_eq!(created.available_credits, 250, "the release counts");
        assert_eq!(created.remaining_credits, 230);
        assert!(
            memo.take_wallets().is_empty(),
            "applied once, by the create"
        );
        txn.commit().await.unwrap();
        assert_eq!(held(&db).await, (1000, 770));

        // The reverse: without the release the create would not cross either way, but a
        // create that needs the released credits is no longer refused.
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        db_set(&txn, "UPDATE credit_wallet SET held = 990").await;
        memo.defer_wallets([(1, (0, -20))].into_iter().collect());
        let (r, _) = run(&txn, &memo, &unit("needs-release")).await;
        let created = r.unwrap().expect("created: 10 + 20 released cover 20");
        assert_eq!(created.remaining_credits, 10);
        txn.commit().await.unwrap();
        assert_eq!(held(&db).await, (1000, 990));
    }

    async fn db_set(txn: &DatabaseTransaction, sql: &str) {
        txn.execute_unprepared(sql).await.unwrap();
    }

    #[tokio::test]
    async fn a_create_refused_for_credits_changes_nothing() {
        let (_dir, db) = db_with_wallet(15).await;
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        let (r, untouched) = run(&txn, &memo, &unit("a")).await;
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientCredits);
        assert!(untouched, "a refused create leaves nothing to roll back");
        txn.commit().await.unwrap();
        assert_eq!(held(&db).await, (15, 0));
        assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM batch_job").await, 0);
    }

    /// Two creates with one request id in one group: the second finds the first's batch row,
    /// gives its hold back and answers as a repeat. One batch, one hold, one ledger row.
    #[tokio::test]
    async fn a_repeat_in_the_same_group_gives_its_hold_back() {
        let (_dir, db) = db_with_wallet(1000).await;
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        let (first, _) = run(&txn, &memo, &unit("same")).await;
        assert!(first.unwrap().is_some());
        let (second, _) = run(&txn, &memo, &unit("same")).await;
        assert!(second.unwrap().is_none(), "answered as a repeat");
        txn.commit().await.unwrap();
        assert_eq!(held(&db).await, (1000, 20), "held once");
        assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM batch_job").await, 1);
        assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM batch_item").await, 2);
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) AS n FROM credit_ledger WHERE kind = 'hold'"
            )
            .await,
            1
        );
    }

    /// A repeat of a committed request whose hold no longer fits the wallet is a repeat, not a
    /// 402 (the order of checks: idempotency before credits), and changes nothing.
    #[tokio::test]
    async fn a_repeat_that_no_longer_fits_the_wallet_is_a_repeat() {
        let (_dir, db) = db_with_wallet(30).await;
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        assert!(run(&txn, &memo, &unit("r")).await.0.unwrap().is_some());
        txn.commit().await.unwrap();
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        let (again, untouched) = run(&txn, &memo, &unit("r")).await;
        assert!(again.unwrap().is_none());
        assert!(untouched);
        txn.commit().await.unwrap();
        assert_eq!(held(&db).await, (30, 20));
    }

    /// A batch larger than one call takes (more than 1,000 items) is written step by step,
    /// with the same outcome: held once, every item queued in order.
    #[tokio::test]
    async fn a_batch_too_large_for_one_call_is_written_in_steps() {
        let (_dir, db) = db_with_wallet(100_000).await;
        let mut u = unit("big");
        u.batch.items = vec![
            NewItem {
                prompt: "p".into(),
                params: None,
                source_idx: None,
            };
            1200
        ];
        u.n = 1200;
        u.need = 12_000;
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        let created = run(&txn, &memo, &u).await.0.unwrap().unwrap();
        assert_eq!(created.remaining_credits, 88_000);
        txn.commit().await.unwrap();
        assert_eq!(held(&db).await, (100_000, 12_000));
        assert_eq!(
            count(&db, "SELECT COUNT(*) AS n FROM batch_item").await,
            1200
        );
        assert_eq!(
            count(&db, "SELECT MAX(idx) - MIN(idx) + 1 AS n FROM batch_item").await,
            1200
        );
    }

    /// Batches of one key created in one group take consecutive places in the fair queue,
    /// although the group asks the database only once.
    #[tokio::test]
    async fn batches_of_one_group_queue_one_after_the_other() {
        let (_dir, db) = db_with_wallet(1000).await;
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        for rid in ["x", "y", "z"] {
            assert!(run(&txn, &memo, &unit(rid)).await.0.unwrap().is_some());
        }
        txn.commit().await.unwrap();
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT fair_pos FROM batch_item ORDER BY fair_pos",
            ))
            .await
            .unwrap();
        let pos: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("", "fair_pos").unwrap())
            .collect();
        assert_eq!(pos, (0..6).collect::<Vec<_>>());
    }
}
