//! A create request checked against the key's limits and turned into the domain's
//! [`NewBatch`], and the fingerprint that tells a replay from a different request.
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::policy::PolicyLimits;
use crate::domain::{NewBatch, NewItem, bounded_json, canonical_json, parse_webhook_url};
use crate::error::{ApiError, ErrorCode};
use crate::schemas::batches::CreateBatchRequest;

/// Checks a create body against the key's limits (422 `VALIDATION_ERROR` / `BATCH_TOO_LARGE`).
pub fn new_batch(
    req: &CreateBatchRequest,
    limits: &PolicyLimits,
    allow_http_webhooks: bool,
) -> Result<NewBatch, ApiError> {
    let cap = limits.max_batch_items as usize;
    if req.items.is_empty() {
        return Err(ApiError::validation("items", "must hold at least one item"));
    }
    if req.items.len() > cap {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "batch has {} items; this key allows at most {cap}",
                req.items.len()
            ),
        )
        .with_details(
            serde_json::json!({ "max_batch_items": cap, "total_count": req.items.len() }),
        ));
    }
    let mut items = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.iter().enumerate() {
        let chars = item.prompt.chars().count();
        if chars == 0 || item.prompt.trim().is_empty() {
            return Err(ApiError::validation(
                &format!("items[{i}].prompt"),
                "must not be empty",
            ));
        }
        if chars > limits.max_prompt_chars as usize {
            return Err(ApiError::validation(
                &format!("items[{i}].prompt"),
                format!(
                    "has {chars} characters; at most {} allowed",
                    limits.max_prompt_chars
                ),
            ));
        }
        if item.prompt.chars().any(|c| c == '\0') {
            return Err(ApiError::validation(
                &format!("items[{i}].prompt"),
                "must not contain NUL characters",
            ));
        }
        let params = item
            .params
            .as_ref()
            .map(|p| bounded_json(&format!("items[{i}].params"), p))
            .transpose()?;
        items.push(NewItem {
            prompt: item.prompt.to_string(),
            params,
            source_idx: None,
        });
    }
    let webhook_url = match &req.webhook_url {
        Some(u) => Some(parse_webhook_url(u, allow_http_webhooks)?),
        None => None,
    };
    let metadata = req
        .metadata
        .as_ref()
        .map(|m| bounded_json("metadata", m))
        .transpose()?;
    let completion_window = match &req.completion_window {
        None => None,
        Some(w) => {
            let asked = crate::domain::policy::parse_completion_window(w)
                .map_err(|m| ApiError::validation("completion_window", m))?;
            match (asked, limits.completion_window) {
                (Some(a), Some(max)) if a > max => {
                    return Err(ApiError::validation(
                        "completion_window",
                        format!(
                            "{:?} is longer than this key's window of {}",
                            w.to_string(),
                            humantime::format_duration(max)
                        ),
                    ));
                }
                (None, Some(max)) => {
                    return Err(ApiError::validation(
                        "completion_window",
                        format!(
                            "this account's batches have a window of at most {}",
                            humantime::format_duration(max)
                        ),
                    ));
                }
                (a, _) => a,
            }
        }
    };
    Ok(NewBatch {
        items,
        webhook_url,
        metadata,
        completion_window,
    })
}

/// SHA-256 over the canonical request (items, webhook_url, metadata); the id itself is excluded.
pub fn fingerprint(req: &CreateBatchRequest) -> String {
    let items: Vec<Value> = req
        .items
        .iter()
        .map(|i| {
            serde_json::json!({
                "prompt": i.prompt,
                "params": i.params.as_ref().map(|p| Value::Object(p.clone().into_iter().collect())),
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "items": items,
        "webhook_url": req.webhook_url,
        "metadata": req.metadata.as_ref().map(|m| Value::Object(m.clone().into_iter().collect())),
    });
    // Only when given, so that the fingerprints of requests without it never change.
    if let Some(w) = &req.completion_window {
        body["completion_window"] = Value::String(w.to_string());
    }
    let canon = canonical_json(&body);
    hex::encode(Sha256::digest(canon.as_bytes()))
}
