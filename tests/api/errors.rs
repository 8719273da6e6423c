//! The one error shape, request ids, health, and the exported documents.
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

async fn app(backend: Backend) -> TestApp {
    TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await
}

fn assert_error_shape(v: &Value, code: &str) {
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["request_id"].as_str().is_some(), "{v}");
}

both_backends!(
    string_fields_refuse_numbers_and_booleans,
    error_shape_everywhere,
    request_id_is_echoed_or_generated,
    health_and_readiness
);

async fn error_shape_everywhere(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();

    let r = app
        .client
        .get(format!("{}/no/such/route", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_error_shape(&r.json().await.unwrap(), "NOT_FOUND");

    let r = app
        .client
        .delete(format!("{}/api/enterprise/credits", app.base))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.headers()["allow"],
        "GET",
        "RFC 9110: a 405 says what is allowed"
    );
    assert_error_shape(&r.json().await.unwrap(), "NOT_FOUND");
    for (method, path, allow) in [
        (
            reqwest::Method::DELETE,
            "/api/enterprise/video-batch",
            "GET, POST",
        ),
        (reqwest::Method::PUT, "/api/internal/worker/claim", "POST"),
        (reqwest::Method::GET, "/api/admin/config/reload", "POST"),
    ] {
        let r = app
            .client
            .request(method, format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{path}");
        assert_eq!(r.headers()["allow"], allow, "{path}");
    }

    let r = app
        .client
        .post(format!("{}/api/enterprise/video-batch", app.base))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body("{\"items\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_error_shape(&r.json().await.unwrap(), "VALIDATION_ERROR");

    // 413 by Content-Length.
    let big = format!(
        "{{\"items\":[{{\"prompt\":\"{}\"}}]}}",
        "a".repeat(1_100_000)
    );
    let r = app
        .client
        .post(format!("{}/api/enterprise/video-batch", app.base))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_error_shape(&r.json().await.unwrap(), "PAYLOAD_TOO_LARGE");

    // 413 for a chunked body without Content-Length.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    let mut req = format!(
        "POST /api/enterprise/video-batch HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in big.as_bytes().chunks(64 * 1024) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let _ = s.write_all(&req).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(text.contains("PAYLOAD_TOO_LARGE"));

    // The batch was not created by any of this.
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 0);
}

async fn request_id_is_echoed_or_generated(backend: Backend) {
    let app = app(backend).await;
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-abc-123");
    let r = app
        .client
        .get(format!("{}/no/such", app.base))
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!generated.is_empty());
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["request_id"],
        generated.as_str(),
        "error body carries the request id"
    );
}

async fn health_and_readiness(backend: Backend) {
    let app = app(backend).await;
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["migrations"], "applied");
    for path in [
        "/openapi.json",
        "/worker/openapi.json",
        "/admin/openapi.json",
        "/docs",
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

/// The committed documents must equal what the code generates.
#[test]
fn exported_openapi_documents_match_the_code() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("api");
    for (name, spec) in api::routes::documents::specs() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            committed.trim_end() == spec.trim_end(),
            "api/{name} is out of date; regenerate with: cargo run -- openapi --write api"
        );
    }
}

#[test]
fn customer_document_has_only_customer_operations_with_readable_ids() {
    let spec: Value =
        serde_json::from_str(&api::routes::documents::customer_service().spec()).unwrap();
    let mut ids: Vec<String> = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str().map(String::from))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "cancel_batch",
            "create_batch",
            "enable_webhook_endpoint",
            "get_batch",
            "get_batch_errors",
            "get_batch_results",
            "get_credits",
            "get_usage",
            "get_webhook_delivery",
            "list_batch_items",
            "list_batches",
            "list_webhook_deliveries",
            "list_webhook_endpoints",
            "recover_webhooks",
            "resend_webhook_delivery",
            "retry_failed_items"
        ]
    );
    // Exactly the contract's enum, in any order.
    let mut codes: Vec<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    codes.sort_unstable();
    let mut contract = vec![
        "UNAUTHORIZED",
        "IP_NOT_ALLOWED",
        "RATE_LIMIT_EXCEEDED",
        "INSUFFICIENT_CREDITS",
        "IDEMPOTENCY_CONFLICT",
        "VALIDATION_ERROR",
        "BATCH_TOO_LARGE",
        "PAYLOAD_TOO_LARGE",
        "NOT_FOUND",
        "LEASE_LOST",
        "CONFLICT",
        "FORBIDDEN_SCOPE",
        "STORE_UNAVAILABLE",
        "INTERNAL",
    ];
    contract.sort_unstable();
    assert_eq!(codes, contract);
}

/// A field the documents declare `type: string` takes a JSON string and nothing else: a number
/// or a boolean is refused as malformed, never turned into text.
async fn string_fields_refuse_numbers_and_booleans(backend: Backend) {
    let app = app(backend).await;
    let key = app.key("acme").to_string();
    let r = app
        .create_batch(
            &key,
            &serde_json::json!({ "request_id": 42, "items": [{ "prompt": "a" }] }),
        )
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_error_shape(&v, "VALIDATION_ERROR");
    let r = app
        .create_batch(&key, &serde_json::json!({ "items": [{ "prompt": true }] }))
        .await;
    assert_eq!(r.status(), 400);
    let r = app
        .worker_post(
            "/claim",
            &serde_json::json!({ "worker_id": false, "max_items": 1 }),
        )
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_error_shape(&v, "VALIDATION_ERROR");
    // Nothing was created by the refused calls.
    let credits: Value = app
        .client
        .get(format!("{}/api/enterprise/credits", app.base))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(credits["held"], 0, "{credits}");
}
