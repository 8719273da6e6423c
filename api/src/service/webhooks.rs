//! Webhooks (Standard Webhooks v1): secrets, signatures, and the outbox rows written in the
//! same transaction as the state change that causes them.
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use entity::{batch_item, batch_job};
use hmac::{Hmac, Mac};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait};
use serde_json::json;
use sha2::Sha256;
use uuid::Uuid;

use crate::db::stmt;
use crate::state::Runtime;

/// Decodes a `whsec_<base64>` secret to its key bytes (24–64 bytes).
pub fn decode_whsec(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| "must start with whsec_ (Standard Webhooks secret)".to_string())?;
    let bytes = STANDARD
        .decode(b64)
        .map_err(|_| "the part after whsec_ must be base64".to_string())?;
    if !(24..=64).contains(&bytes.len()) {
        return Err(format!(
            "decodes to {} bytes; 24 to 64 required",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-id` of a delivery.
pub fn webhook_id(delivery_id: Uuid) -> String {
    format!("msg_{}", delivery_id.simple())
}

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
pub async fn enqueue_item_event<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    batch_id: Uuid,
    item_id: Uuid,
    event: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vector of the Standard Webhooks specification.
    #[test]
    fn signature_matches_the_specification_vector() {
        let key = decode_whsec("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_outside_24_to_64_bytes_are_refused() {
        assert!(decode_whsec("whsec_AAAA").is_err());
        assert!(decode_whsec("nope").is_err());
    }
}
