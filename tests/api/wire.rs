//! The wire shapes of the contract as a client decodes them: typed, and refusing any field
//! they do not name, so that a field added, renamed or dropped by the server fails here
//! instead of passing unseen. `expect` states the status a call must answer with.
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Decodes the body of a response that must have `status` (panics with the body otherwise).
pub async fn expect<T: DeserializeOwned>(resp: reqwest::Response, status: u16) -> T {
    let got = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e} in {text}"))
}

/// `GET /api/enterprise/credits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credits {
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub ledger: Vec<LedgerEntry>,
}

/// One ledger row.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    pub id: i64,
    pub kind: String,
    pub amount: i64,
    pub batch_id: Option<String>,
    pub item_id: Option<String>,
    pub note: Option<String>,
    pub created_at: String,
}

/// The error body of every API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub ok: bool,
    pub error: String,
    pub message: String,
    pub request_id: Option<String>,
    pub details: Option<serde_json::Value>,
}

crate::both_backends!(the_wire_bodies_of_the_contract_are_pinned);

/// Replaces what differs from run to run (UUIDs, timestamps, request ids made by the server)
/// with placeholders, so that a body can be compared whole.
fn redact(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) if uuid::Uuid::parse_str(&s).is_ok() => Value::String("<uuid>".into()),
        Value::String(s) if chrono::DateTime::parse_from_rfc3339(&s).is_ok() => {
            Value::String("<time>".into())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(redact).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, redact(v))).collect()),
        other => other,
    }
}

/// The bodies customers and generated SDKs parse, pinned whole: the create answer, the batch,
/// the wallet and an error. A field added, renamed, retyped or dropped fails here.
async fn the_wire_bodies_of_the_contract_are_pinned(backend: crate::helpers::Backend) {
    use serde_json::{Value, json};
    let app = crate::helpers::TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let body = json!({
        "request_id": "order-42",
        "items": [
            { "prompt": "a red fox at dawn", "params": { "duration_s": 5 } },
            { "prompt": "a city at night in the rain" }
        ],
        "metadata": { "campaign": "q4" }
    });
    let created: Value = expect(app.create_batch(&key, &body).await, 201).await;
    assert_eq!(
        redact(created.clone()),
        json!({
            "ok": true, "request_id": "order-42", "batch_id": "<uuid>",
            "idempotent_replay": false, "status": "queued", "total_count": 2,
            "cost_per_video": 10, "required_credits": 20, "available_credits": 100,
            "remaining_credits": 80, "created_at": "<time>", "expires_at": "<time>"
        })
    );
    let id = created["batch_id"].as_str().unwrap();
    let batch: Value = expect(app.get_batch(&key, id).await, 200).await;
    assert_eq!(
        redact(batch),
        json!({
            "batch_id": "<uuid>", "request_id": "order-42", "status": "queued",
            "counts": { "total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0,
                        "cancelled": 0, "expired": 0 },
            "cost_per_video": 10, "required_credits": 20, "webhook_url": null,
            "metadata": { "campaign": "q4" }, "created_at": "<time>", "updated_at": "<time>",
            "cancel_requested_at": null, "completed_at": null, "expires_at": "<time>",
            "error_counts": {}, "retry_of": null, "retried_by": null,
            "items": [
                { "item_id": "<uuid>", "index": 0, "prompt": "a red fox at dawn",
                  "params": { "duration_s": 5 }, "status": "queued", "attempts": 0,
                  "result_url": null, "result": null, "message": null, "error": null },
                { "item_id": "<uuid>", "index": 1, "prompt": "a city at night in the rain",
                  "params": null, "status": "queued", "attempts": 0,
                  "result_url": null, "result": null, "message": null, "error": null }
            ]
        })
    );
    let wallet = app.wallet(&key).await;
    assert_eq!(
        (wallet.balance, wallet.held, wallet.available),
        (100, 20, 80)
    );
    let kinds: Vec<(&str, i64)> = wallet
        .ledger
        .iter()
        .map(|e| (e.kind.as_str(), e.amount))
        .collect();
    assert_eq!(kinds, [("hold", 20), ("grant", 100)], "newest first");
    assert!(wallet.ledger[0].batch_id.as_deref() == Some(id) && wallet.ledger[0].item_id.is_none());
    assert!(wallet.ledger[1].note.is_some() && wallet.ledger[0].id > wallet.ledger[1].id);
    assert!(chrono::DateTime::parse_from_rfc3339(&wallet.ledger[0].created_at).is_ok());

    let mut big = json!({ "request_id": "order-43", "items": [] });
    big["items"] = json!(
        (0..9)
            .map(|i| json!({ "prompt": format!("p{i}") }))
            .collect::<Vec<_>>()
    );
    let refused: ErrorBody = expect(app.create_batch(&key, &big).await, 402).await;
    assert!(!refused.ok);
    assert_eq!(refused.error, "INSUFFICIENT_CREDITS");
    assert_eq!(refused.message, "batch needs 90 credits, 80 available");
    assert_eq!(refused.request_id.as_deref(), Some("order-43"));
    assert_eq!(
        refused.details,
        Some(json!({ "required_credits": 90, "available_credits": 80 }))
    );
}
