//! What the generated documents cannot say by themselves, added in one place: request bodies
//! that refuse unknown fields say `additionalProperties: false`, dates say `format: date`,
//! URLs `format: uri`, cursors cannot be empty, and every request and response schema carries
//! a realistic example, so that Swagger UI's "Try it out" works with the pre-filled body.
use serde_json::{Value, json};

/// Request bodies declared with `deny_unknown_fields`.
const CLOSED_OBJECTS: [&str; 11] = [
    "BatchItemInput",
    "CreateBatchRequest",
    "RetryFailedRequest",
    "RecoverRequest",
    "EnableEndpointRequest",
    "ClaimRequest",
    "HeartbeatRequest",
    "CompleteRequest",
    "FailRequest",
    "GrantRequest",
    "AdjustRequest",
];

fn examples() -> Vec<(&'static str, Value)> {
    let batch_id = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
    let item_id = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c";
    let item = json!({
        "item_id": item_id, "index": 0, "prompt": "a red fox at dawn",
        "params": { "duration_s": 5 }, "status": "succeeded", "attempts": 1,
        "result_url": "https://cdn.example.com/renders/fox.mp4", "result": null,
        "message": null, "error": null
    });
    let counts = json!({ "total": 2, "queued": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0, "expired": 0 });
    let batch = json!({
        "batch_id": batch_id, "request_id": "order-42", "status": "processing", "counts": counts,
        "cost_per_video": 10, "required_credits": 20, "webhook_url": null,
        "metadata": { "campaign": "q4" }, "created_at": "2026-11-24T12:00:00Z",
        "updated_at": "2026-11-24T12:00:05Z", "cancel_requested_at": null, "completed_at": null,
        "expires_at": "2026-11-25T12:00:00Z", "error_counts": {}, "retry_of": null,
        "retried_by": null
    });
    let mut batch_with_items = batch.clone();
    batch_with_items["items"] = json!([item]);
    vec![
        (
            "BatchItemInput",
            json!({ "prompt": "a red fox at dawn", "params": { "duration_s": 5 } }),
        ),
        (
            "CreateBatchRequest",
            json!({
                "request_id": "order-42",
                "items": [
                    { "prompt": "a red fox at dawn", "params": { "duration_s": 5 } },
                    { "prompt": "a city at night in the rain" }
                ],
                "metadata": { "campaign": "q4" }
            }),
        ),
        (
            "BatchCreated",
            json!({
                "ok": true, "request_id": "order-42", "batch_id": batch_id,
                "idempotent_replay": false, "status": "queued", "total_count": 2,
                "cost_per_video": 10, "required_credits": 20, "available_credits": 1000,
                "remaining_credits": 980, "created_at": "2026-11-24T12:00:00Z",
                "expires_at": "2026-11-25T12:00:00Z"
            }),
        ),
        ("BatchCounts", counts),
        ("BatchItemView", item.clone()),
        ("Batch", batch_with_items),
        (
            "BatchList",
            json!({ "data": [batch], "has_more": false, "next_cursor": null }),
        ),
        (
            "ItemPage",
            json!({ "data": [item], "has_more": false, "next_cursor": null }),
        ),
        (
            "ErrorBody",
            json!({
                "ok": false, "error": "INSUFFICIENT_CREDITS",
                "message": "batch needs 20 credits, 5 available", "request_id": "order-42",
                "details": { "required_credits": 20, "available_credits": 5 }
            }),
        ),
        (
            "ClaimRequest",
            json!({ "worker_id": "gpu-node-7", "max_items": 4, "lease_seconds": 300 }),
        ),
        (
            "HeartbeatRequest",
            json!({ "lease_token": "7f1e6a52-3c0b-4d8e-9a41-2b5c6d7e8f90", "lease_seconds": 300 }),
        ),
        (
            "CompleteRequest",
            json!({
                "lease_token": "7f1e6a52-3c0b-4d8e-9a41-2b5c6d7e8f90",
                "result_url": "https://cdn.example.com/renders/fox.mp4",
                "result": { "frames": 120 }
            }),
        ),
        (
            "FailRequest",
            json!({
                "lease_token": "7f1e6a52-3c0b-4d8e-9a41-2b5c6d7e8f90",
                "error_code": "render_timeout", "message": "no frame after 600 s"
            }),
        ),
        (
            "RetryFailedRequest",
            json!({ "request_id": "order-42-retry", "include_expired": false }),
        ),
        ("RecoverRequest", json!({ "since": "2026-11-24T10:00:00Z" })),
        (
            "EnableEndpointRequest",
            json!({ "url": "https://hooks.example.com/video-batch" }),
        ),
        (
            "GrantRequest",
            json!({ "amount": 5000, "note": "invoice 2026-118" }),
        ),
        (
            "AdjustRequest",
            json!({ "amount": -200, "note": "refund of a duplicate grant" }),
        ),
    ]
}

/// Applies the refinements to one document (pretty JSON in, pretty JSON out).
pub fn refine(spec: &str) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(spec) else {
        return spec.to_string();
    };
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for name in CLOSED_OBJECTS {
            if let Some(s) = schemas.get_mut(name).and_then(Value::as_object_mut) {
                s.insert("additionalProperties".into(), Value::Bool(false));
                // An optional field may also be sent as null (it means "not given").
                let required: Vec<String> = s
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| {
                        r.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(props) = s.get_mut("properties").and_then(Value::as_object_mut) {
                    for (field, prop) in props.iter_mut() {
                        // Scalars only: a nullable object would change the generated SDK types.
                        if !required.contains(field)
                            && let Some(p) = prop.as_object_mut()
                            && matches!(
                                p.get("type").and_then(Value::as_str),
                                Some("string" | "integer" | "number" | "boolean")
                            )
                        {
                            p.insert("nullable".into(), Value::Bool(true));
                        }
                    }
                }
            }
        }
        if let Some(url) = schemas
            .get_mut("CreateBatchRequest")
            .and_then(|s| s.pointer_mut("/properties/webhook_url"))
        {
            url["format"] = json!("uri");
            url["pattern"] = json!("^https://");
            url["maxLength"] = json!(2048);
        }
        // An adjustment of nothing is refused (422): say so.
        if let Some(amount) = schemas
            .get_mut("AdjustRequest")
            .and_then(|s| s.pointer_mut("/properties/amount"))
        {
            amount["not"] = json!({ "enum": [0] });
        }
        for (name, example) in examples() {
            if let Some(s) = schemas.get_mut(name).and_then(Value::as_object_mut) {
                s.insert("example".into(), example);
            }
        }
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for operation in op.values_mut() {
                let Some(params) = operation
                    .get_mut("parameters")
                    .and_then(Value::as_array_mut)
                else {
                    continue;
                };
                for p in params {
                    let name = p["name"].as_str().unwrap_or_default().to_string();
                    let Some(schema) = p.get_mut("schema").and_then(Value::as_object_mut) else {
                        continue;
                    };
                    match name.as_str() {
                        "from" | "to" => {
                            schema.insert("format".into(), json!("date"));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_bodies_dates_and_examples_are_declared() {
        let doc: Value = serde_json::from_str(&refine(
            &crate::routes::documents::customer_service().spec(),
        ))
        .unwrap();
        let create = &doc["components"]["schemas"]["CreateBatchRequest"];
        assert_eq!(create["additionalProperties"], false);
        assert_eq!(create["example"]["items"][0]["prompt"], "a red fox at dawn");
        assert_eq!(create["properties"]["webhook_url"]["format"], "uri");
        // Every operation states the scope a key needs for it, the one the server checks.
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let m = poem::http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let scope =
                    crate::settings::KeyScope::of_call(&m, &format!("/api/enterprise{path}"))
                        .unwrap_or_else(|| panic!("{method} {path} needs no scope"));
                let description = op["description"].as_str().unwrap_or_default();
                assert!(
                    description.contains(&format!("Scope: `{}`.", scope.as_str())),
                    "{method} {path}: {description}"
                );
            }
        }
        let usage = &doc["paths"]["/usage"]["get"]["parameters"];
        for p in usage.as_array().unwrap() {
            assert_eq!(p["schema"]["format"], "date", "{p}");
        }
    }
}
