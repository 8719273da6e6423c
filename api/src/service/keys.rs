//! Syncing configured keys into the `api_key` table, and generating new keys.
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use crate::store::keys::{account_id_by_name, account_of_key, disabled_ids, id_by_name, sync};

/// A new random key: `vb_` + 43 base64url characters (256 bits), and its SHA-256.
pub fn generate() -> (String, String) {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!(
        "vb_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = sha256_hex(&key);
    (key, hash)
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}
