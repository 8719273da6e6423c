//! The outbox: delivery rows written in the same transaction as the state change that causes
//! them, so an event exists exactly when its change is committed.
use chrono::{DateTime, Utc};
use entity::{batch_item, batch_job};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait};
use serde_json::json;
use uuid::Uuid;

use crate::db::stmt;
use crate::state::Runtime;

async fn enqueue<C: ConnectionTrait>(
    txn: &C,
    key_id: i64,
    batch_id: Uuid,
    target: &str,
    event: &str,
    data: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let payload = json!({ "type": event, "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "data": data });
    txn.execute_raw(stmt(
        txn.get_database_backend(),
        "INSERT INTO webhook_delivery (id, api_key_id, batch_id, event_type, payload, target_url, status, \
         attempt_count, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $7)",
        [
            Uuid::now_v7().into(),
            key_id.into(),
            batch_id.into(),
            event.into(),
            payload.to_string().into(),
            target.into(),
            now.into(),
        ],
    ))
    .await?;
    Ok(())
}

fn target(runtime: &Runtime, key_id: i64, batch_url: Option<&str>, event: &str) -> Option<String> {
    let key = runtime.by_id.get(&key_id)?;
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
    let Some(url) = target(runtime, job.api_key_id, job.webhook_url.as_deref(), event) else {
        return Ok(());
    };
    let view = crate::service::batches::view(job, (0, 0), None);
    let data =
        serde_json::to_value(poem_openapi::types::ToJSON::to_json(&view)).unwrap_or_default();
    enqueue(txn, job.api_key_id, job.id, &url, event, data, now).await
}

/// Records `item.succeeded` / `item.failed` for keys that subscribe to them.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue_item_event<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    key_id: i64,
    batch_id: Uuid,
    item_id: Uuid,
    event: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    // Most keys do not subscribe to item events: decide before reading anything.
    let subscribed = runtime
        .by_id
        .get(&key_id)
        .is_some_and(|k| k.policy.webhook_events.iter().any(|e| e == event));
    if !subscribed {
        return Ok(());
    }
    let Some(job) = batch_job::Entity::find_by_id(batch_id).one(txn).await? else {
        return Ok(());
    };
    let Some(url) = target(runtime, job.api_key_id, job.webhook_url.as_deref(), event) else {
        return Ok(());
    };
    let Some(item) = batch_item::Entity::find_by_id(item_id).one(txn).await? else {
        return Ok(());
    };
    let mut data = serde_json::to_value(poem_openapi::types::ToJSON::to_json(
        &crate::service::batches::view(&job, (0, 0), None),
    ))
    .unwrap_or_default();
    data["item"] = poem_openapi::types::ToJSON::to_json(&crate::service::batches::item_view(&item))
        .unwrap_or_default();
    enqueue(txn, job.api_key_id, job.id, &url, event, data, now).await
}
