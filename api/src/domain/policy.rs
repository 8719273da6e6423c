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
    /// Previous secret, during rotation.
    pub webhook_previous_secret: Option<Secret>,
    /// Subscribed events.
    pub webhook_events: Vec<String>,
    /// Granted once when the key is first created.
    pub initial_credits: i64,
    /// Disabled keys are refused.
    pub disabled: bool,
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
