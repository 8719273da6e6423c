//! Per-key policy: what the configuration grants each customer key. Settings build these;
//! the services read them.
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone)]
pub struct Secret(pub SecretString);

impl Secret {
    /// The plain value, for comparing or signing.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(SecretString::from(s.to_string()))
    }
}

/// The key a rotated key replaced: it still authenticates as the same key until `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousKey {
    /// Lower-case hex SHA-256 of the old key.
    pub key_sha256: String,
    /// When the old key stops working (on every node, by the clock: no reload needed).
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Which of a key's two secrets a call used (stored on its usage row, never the key itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyVersion {
    /// `key_sha256`.
    Current,
    /// `previous_key_sha256`, during the rotation overlap.
    Previous,
}

impl KeyVersion {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyVersion::Current => "current",
            KeyVersion::Previous => "previous",
        }
    }
}

/// Limits every key inherits from `[defaults]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Credits per item.
    pub cost_per_video: i64,
    /// Batch creations per minute.
    pub rate_limit_per_min: u32,
    /// Other calls per minute.
    pub read_rate_limit_per_min: u32,
    /// Items per batch.
    pub max_batch_items: u32,
    /// Unicode characters per prompt.
    pub max_prompt_chars: u32,
    /// Allowed client networks; empty means any.
    pub ip_allowlist: Vec<IpNet>,
    /// Queued items of a batch still waiting this long after its creation expire (None: no
    /// window).
    pub completion_window: Option<std::time::Duration>,
}

/// The longest completion window a key or a batch may have.
pub const MAX_COMPLETION_WINDOW: std::time::Duration = std::time::Duration::from_secs(366 * 86_400);

/// A completion window as written in the configuration or a request (`24h`, `30m`, `7d`);
/// `0` is no window. `Err` says why it is refused.
pub fn parse_completion_window(s: &str) -> Result<Option<std::time::Duration>, String> {
    if s.trim() == "0" {
        return Ok(None);
    }
    let d = humantime::parse_duration(s.trim())
        .map_err(|_| format!("{s:?} is not a duration like 24h, 30m or 7d"))?;
    if d.is_zero() {
        return Ok(None);
    }
    if d < std::time::Duration::from_secs(1) || d > MAX_COMPLETION_WINDOW {
        return Err(format!("{s:?} must be between 1s and 366d"));
    }
    Ok(Some(d))
}

/// The effective policy of one customer key.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    /// Stable name, the key's identity.
    pub name: String,
    /// Lower-case hex SHA-256 of the key.
    pub key_sha256: String,
    /// Limits after merging `[defaults]`.
    pub limits: PolicyLimits,
    /// Default webhook target.
    pub webhook_url: Option<String>,
    /// `whsec_...` signing secret.
    pub webhook_secret: Option<Secret>,
    /// Previous secret, during rotation: deliveries are signed with both secrets.
    pub webhook_previous_secret: Option<Secret>,
    /// When the previous secret stops signing (None: while it is configured).
    pub webhook_previous_secret_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Subscribed events.
    pub webhook_events: Vec<String>,
    /// Granted once when the key is first created.
    pub initial_credits: i64,
    /// Disabled keys are refused.
    pub disabled: bool,
    /// The key this one replaced, during a rotation overlap.
    pub previous_key: Option<PreviousKey>,
    /// A `credits.low` event is sent when available credits cross below this.
    pub low_credit_threshold: Option<i64>,
    /// At most this many of the key's items run at once (None: unlimited).
    pub max_running_items: Option<u32>,
}

impl KeyPolicy {
    /// True when a call from `ip` may use the key: any call when the allowlist is empty,
    /// otherwise only calls whose client address is known and allowed (an address that could
    /// not be determined never passes an allowlist).
    pub fn allows_client(&self, ip: Option<IpAddr>) -> bool {
        self.limits.ip_allowlist.is_empty() || ip.is_some_and(|ip| self.allows_ip(ip))
    }

    /// True when the address is allowed by the key's allowlist.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.limits.ip_allowlist.is_empty()
            || self.limits.ip_allowlist.iter().any(|n| n.contains(&ip))
    }
}
