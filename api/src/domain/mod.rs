//! Typed values that can only be built valid ("parse, don't validate").
pub mod error_code;
pub mod failure;
pub mod ids;
pub mod money;
pub mod policy;
pub mod quota;
pub mod secret;
pub mod target;
pub mod usage;
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

/// A value that breaks a rule: which field and why (a 422 `VALIDATION_ERROR` on the wire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The field, as the client wrote it (`items[3].prompt`).
    pub field: String,
    /// Why it is refused.
    pub message: String,
}

impl Invalid {
    /// `field` breaks a rule for the reason `message`.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Largest `params` or `metadata` object, as compact JSON.
pub const MAX_JSON_OBJECT_BYTES: usize = 4096;
/// Deepest nesting accepted in `params` or `metadata`.
pub const MAX_JSON_DEPTH: usize = 8;

/// An idempotency key: 1–255 characters of `[A-Za-z0-9._:-]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Validates a client-supplied id.
    pub fn parse(field: &str, s: &str) -> Result<Self, Invalid> {
        if s.is_empty() || s.len() > 255 {
            return Err(Invalid::new(field, "must be 1 to 255 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(Invalid::new(
                field,
                "may only contain A-Z, a-z, 0-9, '.', '_', ':' and '-'",
            ));
        }
        Ok(Self(s.to_string()))
    }

    /// A server-assigned id (`req_` + UUIDv7).
    pub fn generate() -> Self {
        Self(format!("req_{}", uuid::Uuid::now_v7().simple()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One validated item.
#[derive(Clone, Debug)]
pub struct NewItem {
    /// Prompt within the key's character cap.
    pub prompt: String,
    /// Params as compact JSON, if given.
    pub params: Option<String>,
    /// Its index in the batch it retries (a retry of failed items only).
    pub source_idx: Option<i32>,
}

/// A validated batch request.
#[derive(Clone, Debug)]
pub struct NewBatch {
    /// Items, in order.
    pub items: Vec<NewItem>,
    /// Target override.
    pub webhook_url: Option<String>,
    /// Metadata as compact JSON.
    pub metadata: Option<String>,
    /// The window the request asked for (None: the key's).
    pub completion_window: Option<std::time::Duration>,
}

pub fn parse_webhook_url(u: &str, allow_http: bool) -> Result<String, Invalid> {
    // `allow_http` is the `allow_private_targets` switch: local testing only.
    let url =
        url::Url::parse(u).map_err(|_| Invalid::new("webhook_url", "must be an absolute URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        _ => return Err(Invalid::new("webhook_url", "must be an https URL")),
    }
    if url.host().is_none() || u.len() > 2048 {
        return Err(Invalid::new(
            "webhook_url",
            "must have a host and at most 2048 characters",
        ));
    }
    // An address written in the URL is judged now; names are resolved and judged at send time.
    let literal = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        _ => None,
    };
    if !allow_http
        && let Some(ip) = literal
        && let Some(why) = target::refuse_reason(ip)
    {
        return Err(Invalid::new(
            "webhook_url",
            format!("{ip} is a {why} address; webhooks go to public addresses only"),
        ));
    }
    Ok(url.to_string())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub fn bounded_json(field: &str, map: &BTreeMap<String, Value>) -> Result<String, Invalid> {
    if map.values().map(depth).max().unwrap_or(0) + 1 > MAX_JSON_DEPTH {
        return Err(Invalid::new(
            field,
            format!("is nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    let text = canonical_json(&Value::Object(map.clone().into_iter().collect()));
    if text.len() > MAX_JSON_OBJECT_BYTES {
        return Err(Invalid::new(
            field,
            format!(
                "is {} bytes as JSON; at most {MAX_JSON_OBJECT_BYTES} allowed",
                text.len()
            ),
        ));
    }
    Ok(text)
}

/// JSON with object keys sorted at every level, so equal values give equal text.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String((*k).clone()).to_string());
                    out.push(':');
                    write(&o[k.as_str()], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_rules() {
        assert!(RequestId::parse("request_id", "order-42.a_b:c").is_ok());
        assert!(RequestId::parse("request_id", "").is_err());
        assert!(RequestId::parse("request_id", &"a".repeat(256)).is_err());
        assert!(RequestId::parse("request_id", "white space").is_err());
        assert!(RequestId::parse("request_id", "ünï").is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":3}],"x":null}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#
        );
    }
}
