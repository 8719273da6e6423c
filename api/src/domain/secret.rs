//! Webhook signing secrets (Standard Webhooks `whsec_` form).
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

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
