//! The outbox: delivery rows written in the same transaction as the state change that causes
//! them, so an event exists exactly when its change is committed.
use chrono::{DateTime, Utc};
use entity::batch_job;
use sea_orm::{ConnectionTrait, DbErr};
use serde_json::json;
use uuid::Uuid;

use crate::domain::ids::AccountId;
use crate::state::Runtime;
use crate::store::webhooks::NewDelivery;
use crate::store::{items, jobs};

async fn enqueue<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    batch_id: Option<Uuid>,
    target: &str,
    event: &str,
    data: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let payload = json!({ "type": event, "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "data": data });
    NewDelivery {
        key_id: account.0,
        batch_id,
        event_type: event,
        payload: payload.to_string(),
        target_url: target,
    }
    .insert(txn, now)
    .await
}

fn target(
    runtime: &Runtime,
    account: AccountId,
    batch_url: Option<&str>,
    event: &str,
) -> Option<String> {
    let key = runtime.accounts.get(&account.0)?;
    if !key.policy.webhook_events.iter().any(|e| e == event) {
        return None;
    }
    batch_url
        .map(str::to_string)
        .or_else(|| key.policy.webhook_url.clone())
}

/// Records `batch.completed` / `batch.cancelled` for a final batch (no target: nothing).
pub async fn enqueue_batch_event<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    job: &batch_job::Model,
    event: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let Some(url) = target(
        runtime,
        AccountId(job.api_key_id),
        job.webhook_url.as_deref(),
        event,
    ) else {
        return Ok(());
    };
    let view = crate::service::views::view(&job.into(), (0, 0), None);
    let data =
        serde_json::to_value(poem_openapi::types::ToJSON::to_json(&view)).unwrap_or_default();
    enqueue(
        txn,
        AccountId(job.api_key_id),
        Some(job.id),
        &url,
        event,
        data,
        now,
    )
    .await
}

/// Records `item.succeeded` / `item.failed` for keys that subscribe to them.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue_item_event<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    account: AccountId,
    batch_id: Uuid,
    item_id: Uuid,
    event: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    // Most keys do not subscribe to item events: decide before reading anything.
    let subscribed = runtime
        .accounts
        .get(&account.0)
        .is_some_and(|k| k.policy.webhook_events.iter().any(|e| e == event));
    if !subscribed {
        return Ok(());
    }
    let Some(job) = jobs::by_id(txn, batch_id).await? else {
        return Ok(());
    };
    let Some(url) = target(
        runtime,
        AccountId(job.api_key_id),
        job.webhook_url.as_deref(),
        event,
    ) else {
        return Ok(());
    };
    let Some(item) = items::by_id(txn, item_id).await? else {
        return Ok(());
    };
    let mut data = serde_json::to_value(poem_openapi::types::ToJSON::to_json(
        &crate::service::views::view(&(&job).into(), (0, 0), None),
    ))
    .unwrap_or_default();
    data["item"] =
        poem_openapi::types::ToJSON::to_json(&crate::service::views::item_view(&(&item).into()))
            .unwrap_or_default();
    enqueue(
        txn,
        AccountId(job.api_key_id),
        Some(job.id),
        &url,
        event,
        data,
        now,
    )
    .await
}

/// Records `credits.low` when a movement took the key's available credits from at or above
/// its `low_credit_threshold` to below it: once per crossing, whatever the concurrency, since
/// every movement of a wallet runs under its row lock and sees the exact amounts before and
/// after. Crossing back above needs no record: the next crossing below is a crossing again.
pub async fn enqueue_low_credits<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    account: AccountId,
    before: i64,
    after: i64,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let Some(key) = runtime.accounts.get(&account.0) else {
        return Ok(());
    };
    let Some(threshold) = key.policy.low_credit_threshold else {
        return Ok(());
    };
    if !(before >= threshold && after < threshold) {
        return Ok(());
    }
    metrics::counter!("credits_low_events_total").increment(1);
    tracing::info!(account = %key.policy.name, available = after, threshold, "credits low");
    let Some(url) = target(runtime, account, None, "credits.low") else {
        return Ok(());
    };
    // `key` names the key of an account that is a key's own (as before accounts existed).
    let mut data = json!({
        "account": key.policy.name,
        "threshold": threshold,
        "available": after,
    });
    if key.policy.implicit {
        data["key"] = json!(key.policy.name);
    }
    enqueue(txn, account, None, &url, "credits.low", data, now).await
}
