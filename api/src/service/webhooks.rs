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

use std::net::{IpAddr, SocketAddr};

use entity::webhook_delivery;
use sea_orm::{ColumnTrait, DatabaseConnection, DbBackend, QueryFilter};

use crate::db::stmt;
use crate::state::{AppState, Runtime};

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

pub use crate::domain::target::refuse_reason;

/// Resolves the target now and checks every address (SSRF guard). Returns the host and the
/// addresses to connect to, so the request goes exactly where the check looked.
pub async fn check_target(
    url: &str,
    allow_private: bool,
) -> Result<(String, Vec<SocketAddr>), String> {
    let parsed = url::Url::parse(url).map_err(|_| format!("invalid URL {url:?}"))?;
    if parsed.scheme() != "https" && parsed.scheme() != "http" {
        return Err(format!(
            "scheme {:?} is not allowed; use https",
            parsed.scheme()
        ));
    }
    let host = parsed.host_str().ok_or("URL has no host")?.to_string();
    let port = parsed.port_or_known_default().ok_or("URL has no port")?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {bare}: {e}"))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("{bare} resolves to no address"));
    }
    if !allow_private {
        for a in &addrs {
            if let Some(why) = refuse_reason(a.ip()) {
                return Err(format!(
                    "target {bare} resolves to {} ({why}); refused",
                    a.ip()
                ));
            }
        }
    }
    Ok((bare, addrs))
}

/// The outcome of one HTTP attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// Transport or policy error.
    pub error: Option<String>,
    /// Seconds asked by `Retry-After`.
    pub retry_after: Option<u64>,
    /// Whether retrying can help (false for refused targets and 410).
    pub retryable: bool,
    /// Time spent.
    pub duration_ms: i64,
}

/// Signs and sends one attempt of a delivery.
pub async fn send(runtime: &Runtime, d: &webhook_delivery::Model) -> Attempt {
    let started = std::time::Instant::now();
    let settings = &runtime.settings.webhooks;
    let done = |status: Option<u16>,
                error: Option<String>,
                retry_after: Option<u64>,
                retryable: bool| Attempt {
        status,
        error,
        retry_after,
        retryable,
        duration_ms: started.elapsed().as_millis() as i64,
    };
    let Some(key) = runtime.by_id.get(&d.api_key_id) else {
        return done(
            None,
            Some("the key is no longer configured".into()),
            None,
            false,
        );
    };
    let Some(secret) = &key.policy.webhook_secret else {
        return done(
            None,
            Some("the key has no webhook_secret".into()),
            None,
            false,
        );
    };
    let (host, addrs) = match check_target(&d.target_url, settings.allow_private_targets).await {
        Ok(t) => t,
        Err(e) => return done(None, Some(e), None, false),
    };
    let msg_id = webhook_id(d.id);
    let ts = Utc::now().timestamp();
    let mut signatures = Vec::new();
    for s in std::iter::once(secret).chain(key.policy.webhook_previous_secret.as_ref()) {
        match decode_whsec(s.expose()) {
            Ok(k) => signatures.push(sign(&k, &msg_id, ts, &d.payload)),
            Err(e) => return done(None, Some(format!("webhook secret: {e}")), None, false),
        }
    }
    let client = match reqwest::Client::builder()
        // Proxy variables would resolve the target elsewhere and bypass the pinning below.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.timeout)
        .resolve_to_addrs(&host, &addrs)
        .user_agent(concat!(
            "video-batch-api-webhooks/",
            env!("CARGO_PKG_VERSION")
        ))
        .build()
    {
        Ok(c) => c,
        Err(e) => return done(None, Some(format!("client: {e}")), None, true),
    };
    let resp = client
        .post(&d.target_url)
        .header("content-type", "application/json")
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signatures.join(" "))
        .body(d.payload.clone())
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if r.status().is_success() {
                done(Some(status), None, None, true)
            } else {
                done(
                    Some(status),
                    Some(format!("HTTP {status}")),
                    retry_after,
                    status != 410,
                )
            }
        }
        Err(e) => done(None, Some(format!("request failed: {e}")), None, true),
    }
}

/// Leases due deliveries to this dispatcher: one statement marks the attempt, so two
/// dispatchers (on any nodes) never send the same attempt.
pub async fn claim_due(
    db: &DatabaseConnection,
    limit: u32,
    lock_for: std::time::Duration,
) -> Result<Vec<webhook_delivery::Model>, DbErr> {
    let backend = db.get_database_backend();
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(lock_for).unwrap_or(chrono::Duration::seconds(60));
    let lock = if backend == DbBackend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE webhook_delivery SET attempt_count = attempt_count + 1, locked_until = $2, updated_at = $1 \
         WHERE id IN (SELECT id FROM webhook_delivery WHERE status = 'pending' AND next_attempt_at <= $1 \
         AND (locked_until IS NULL OR locked_until < $1) ORDER BY next_attempt_at LIMIT $3{lock}) \
         RETURNING id"
    );
    let txn = crate::db::begin_write(db).await?;
    let rows = txn
        .query_all_raw(stmt(
            backend,
            &sql,
            [now.into(), until.into(), i64::from(limit).into()],
        ))
        .await?;
    txn.commit().await?;
    let ids: Vec<Uuid> = rows
        .iter()
        .filter_map(|r| r.try_get("", "id").ok())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    webhook_delivery::Entity::find()
        .filter(webhook_delivery::Column::Id.is_in(ids))
        .all(db)
        .await
}

fn jittered(d: std::time::Duration) -> chrono::Duration {
    use rand::Rng;
    let ms = d.as_millis() as i64;
    let spread = ms / 10;
    let j = if spread > 0 {
        rand::rng().random_range(-spread..=spread)
    } else {
        0
    };
    chrono::Duration::milliseconds(ms + j)
}

/// Records an attempt and schedules the next one (or ends the delivery).
pub async fn record_attempt(
    db: &DatabaseConnection,
    runtime: &Runtime,
    d: &webhook_delivery::Model,
    a: &Attempt,
) -> Result<&'static str, DbErr> {
    let backend = db.get_database_backend();
    let now = Utc::now();
    let schedule = &runtime.settings.webhooks.retry_schedule;
    let success = a.status.is_some_and(|s| (200..300).contains(&s));
    let retries_used = (d.attempt_count - 1).max(0) as usize;
    let (status, next) = if success {
        ("succeeded", now)
    } else if !a.retryable || retries_used >= schedule.len() {
        ("failed", now)
    } else {
        let mut delay = jittered(schedule[retries_used]);
        if let Some(ra) = a.retry_after {
            delay = delay.max(chrono::Duration::seconds(ra.min(86_400) as i64));
        }
        ("pending", now + delay)
    };
    let txn = crate::db::begin_write(db).await?;
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO webhook_attempt (delivery_id, attempt, status_code, error, duration_ms, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        [
            d.id.into(),
            d.attempt_count.into(),
            a.status.map(i32::from).into(),
            a.error.clone().into(),
            a.duration_ms.into(),
            now.into(),
        ],
    ))
    .await?;
    txn.execute_raw(stmt(
        backend,
        "UPDATE webhook_delivery SET status = $2, next_attempt_at = $3, locked_until = NULL, \
         last_status_code = $4, last_error = $5, updated_at = $6, \
         delivered_at = CASE WHEN $2 = 'succeeded' THEN $6 ELSE delivered_at END \
         WHERE id = $1 AND attempt_count = $7",
        [
            d.id.into(),
            status.into(),
            next.into(),
            a.status.map(i32::from).into(),
            a.error.clone().into(),
            now.into(),
            d.attempt_count.into(),
        ],
    ))
    .await?;
    txn.commit().await?;
    Ok(status)
}

/// Deliveries newest first, optionally by status and key.
pub async fn list(
    db: &DatabaseConnection,
    status: Option<&str>,
    key_id: Option<i64>,
    limit: u64,
) -> Result<Vec<webhook_delivery::Model>, DbErr> {
    use sea_orm::{QueryOrder, QuerySelect};
    let mut q = webhook_delivery::Entity::find();
    if let Some(s) = status {
        q = q.filter(webhook_delivery::Column::Status.eq(s));
    }
    if let Some(k) = key_id {
        q = q.filter(webhook_delivery::Column::ApiKeyId.eq(k));
    }
    q.order_by_desc(webhook_delivery::Column::CreatedAt)
        .limit(limit)
        .all(db)
        .await
}

/// Starts a new attempt series of a delivery (same `webhook-id`).
pub async fn redeliver(db: &DatabaseConnection, id: Uuid) -> Result<bool, DbErr> {
    let now = Utc::now();
    let res = db
        .execute_raw(stmt(
            db.get_database_backend(),
            "UPDATE webhook_delivery SET status = 'pending', attempt_count = 0, next_attempt_at = $2, \
             locked_until = NULL, updated_at = $2 WHERE id = $1",
            [id.into(), now.into()],
        ))
        .await?;
    Ok(res.rows_affected() == 1)
}

/// Sends due deliveries until `stop` is notified.
pub async fn run_dispatcher(
    state: std::sync::Arc<AppState>,
    stop: std::sync::Arc<tokio::sync::Notify>,
) {
    tracing::info!("webhook dispatcher started");
    loop {
        let runtime = state.runtime();
        let settings = &runtime.settings.webhooks;
        let lock_for = settings.timeout + std::time::Duration::from_secs(30);
        let batch = match claim_due(&state.writer, settings.concurrency, lock_for).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "claiming webhook deliveries failed");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => continue,
                _ = stop.notified() => break,
            }
        }
        let sends = batch.into_iter().map(|d| {
            let (state, runtime) = (std::sync::Arc::clone(&state), std::sync::Arc::clone(&runtime));
            async move {
                let attempt = send(&runtime, &d).await;
                let result = match attempt.status {
                    Some(s) if (200..300).contains(&s) => "success",
                    Some(_) => "http_error",
                    None if attempt.retryable => "transport_error",
                    None => "refused",
                };
                metrics::counter!("webhook_attempts_total", "result" => result).increment(1);
                match record_attempt(&state.writer, &runtime, &d, &attempt).await {
                    Ok(outcome) => tracing::info!(
                        webhook_id = %webhook_id(d.id), event = %d.event_type, attempt = d.attempt_count,
                        status = ?attempt.status, error = ?attempt.error, outcome, "webhook attempt"
                    ),
                    Err(e) => tracing::error!(error = %e, "recording webhook attempt failed"),
                }
            }
        });
        futures::future::join_all(sends).await;
    }
    tracing::info!("webhook dispatcher stopped");
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

    #[tokio::test]
    async fn private_and_odd_targets_are_refused() {
        for url in [
            "http://127.0.0.1/hook",
            "http://[::1]/hook",
            "http://10.0.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]/hook",
            "http://localhost:9/hook",
            "http://192.168.1.10/",
            "http://[fd00::1]/",
            "http://0.0.0.0/",
            "https://[64:ff9b::a00:5]/",
            "https://[64:ff9b::7f00:1]/",
            "https://[64:ff9b:1::a00:5]/",
            "https://[2002:a00:5::1]/",
            "https://[2002:c0a8:101::1]/",
            "https://[2001:0:a00:5::1]/",
            "https://[2001:0:5db8:f00d:0:0:f5ff:fffa]/",
            "https://[fec0::1]/",
            "https://[::a00:5]/",
            "https://[::7f00:1]/",
            "https://198.18.0.1/",
            "https://198.19.255.254/",
            "https://192.0.0.8/",
            "https://240.0.0.1/",
            "https://255.255.255.255/",
            "https://100.64.0.1/",
            "file:///etc/passwd",
            "ftp://example.com/",
        ] {
            let err = check_target(url, false).await.expect_err(url);
            assert!(
                err.contains("refused") || err.contains("scheme"),
                "{url}: {err}"
            );
        }
        assert!(check_target("http://127.0.0.1:9/hook", true).await.is_ok());
        for public in [
            "https://93.184.216.34/hook",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/",
            "https://[64:ff9b::5db8:d822]/",
            "https://[2002:5db8:d822::1]/",
            "https://198.20.0.1/",
        ] {
            assert!(check_target(public, false).await.is_ok(), "{public}");
        }
    }

    #[test]
    fn secrets_outside_24_to_64_bytes_are_refused() {
        assert!(decode_whsec("whsec_AAAA").is_err());
        assert!(decode_whsec("nope").is_err());
    }
}
