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

/// What a key may do. Every customer operation needs one scope; a key holds all of them unless
/// its `scopes` name fewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyScope {
    /// Create, cancel and retry batches.
    BatchesWrite,
    /// Read batches, their items and exports.
    BatchesRead,
    /// Read the wallet.
    CreditsRead,
    /// Read usage reports.
    UsageRead,
    /// Read webhook deliveries and endpoints.
    WebhooksRead,
    /// Resend and recover deliveries, enable endpoints.
    WebhooksWrite,
}

impl KeyScope {
    /// Every scope, in the order they are documented.
    pub const ALL: [KeyScope; 6] = [
        KeyScope::BatchesWrite,
        KeyScope::BatchesRead,
        KeyScope::CreditsRead,
        KeyScope::UsageRead,
        KeyScope::WebhooksRead,
        KeyScope::WebhooksWrite,
    ];

    /// The configured and documented name, e.g. `batches:write`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::BatchesWrite => "batches:write",
            KeyScope::BatchesRead => "batches:read",
            KeyScope::CreditsRead => "credits:read",
            KeyScope::UsageRead => "usage:read",
            KeyScope::WebhooksRead => "webhooks:read",
            KeyScope::WebhooksWrite => "webhooks:write",
        }
    }

    /// The scope of a name (`None`: no such scope).
    pub fn parse(name: &str) -> Option<KeyScope> {
        KeyScope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The scope a customer call needs, from its method and path (the one place that decides
    /// it; `None` for a path outside the customer API, which no key reaches).
    pub fn of_call(method: &poem::http::Method, path: &str) -> Option<KeyScope> {
        let rest = path
            .trim_end_matches('/')
            .strip_prefix("/api/enterprise/")?;
        let write = method != poem::http::Method::GET && method != poem::http::Method::HEAD;
        let (resource, _) = rest.split_once('/').unwrap_or((rest, ""));
        Some(match (resource, write) {
            ("video-batch", true) => KeyScope::BatchesWrite,
            ("video-batch", false) => KeyScope::BatchesRead,
            ("credits", _) => KeyScope::CreditsRead,
            ("usage", _) => KeyScope::UsageRead,
            ("webhooks", true) => KeyScope::WebhooksWrite,
            ("webhooks", false) => KeyScope::WebhooksRead,
            _ => return None,
        })
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

/// What an account holds and every key of it shares: the wallet, the limits, costs and caps,
/// the completion window and the webhooks. A key without `account` is its own account, named
/// after it, holding what the key's table sets.
#[derive(Clone, Debug)]
pub struct AccountPolicy {
    /// Stable name, the account's identity (a key's own account: the key's name).
    pub name: String,
    /// A key's own account (the key names no `account`), not an `[accounts.NAME]` table.
    pub implicit: bool,
    /// Limits after merging `[defaults]` (their `ip_allowlist` is unused: each key has its own).
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
    /// Granted once when the account is first created.
    pub initial_credits: i64,
    /// A `credits.low` event is sent when available credits cross below this.
    pub low_credit_threshold: Option<i64>,
    /// At most this many of the account's items run at once (None: unlimited).
    pub max_running_items: Option<u32>,
    /// Every key of a disabled account is refused.
    pub disabled: bool,
}

/// The policy of one customer key: what is the key's own (its secret, allowlist, scopes and
/// tighter limits), and its account's.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    /// Stable name, the key's identity.
    pub name: String,
    /// Lower-case hex SHA-256 of the key.
    pub key_sha256: String,
    /// Allowed client networks (the key's, else `[defaults]`); empty means any.
    pub ip_allowlist: Vec<IpNet>,
    /// The key's own create limit per minute, inside its account's (None: the account's only).
    pub rate_limit_per_min: Option<u32>,
    /// The key's own limit of other calls per minute, inside its account's.
    pub read_rate_limit_per_min: Option<u32>,
    /// Disabled keys are refused (so is every key of a disabled account).
    pub disabled: bool,
    /// The key this one replaced, during a rotation overlap.
    pub previous_key: Option<PreviousKey>,
    /// What the key may do (all scopes unless configured otherwise), sorted.
    pub scopes: Vec<KeyScope>,
    /// The account the key belongs to.
    pub account: std::sync::Arc<AccountPolicy>,
}

impl KeyPolicy {
    /// The calls per minute of creates (`batch`) or of other calls allowed to the key's
    /// account, and the key's own limit when it is tighter (a looser one can never be reached
    /// first, so it is not counted).
    pub fn limits(&self, batch: bool) -> (u32, Option<u32>) {
        let (account, own) = if batch {
            (
                self.account.limits.rate_limit_per_min,
                self.rate_limit_per_min,
            )
        } else {
            (
                self.account.limits.read_rate_limit_per_min,
                self.read_rate_limit_per_min,
            )
        };
        (account, own.filter(|own| *own < account))
    }

    /// The key's create limit: its own when tighter than its account's.
    pub fn create_limit(&self) -> u32 {
        let (account, own) = self.limits(true);
        own.unwrap_or(account)
    }

    /// The key's limit of other calls: its own when tighter than its account's.
    pub fn read_limit(&self) -> u32 {
        let (account, own) = self.limits(false);
        own.unwrap_or(account)
    }

    /// True when the key holds `scope`.
    pub fn has_scope(&self, scope: KeyScope) -> bool {
        self.scopes.contains(&scope)
    }

    /// True when a call from `ip` may use the key: any call when the allowlist is empty,
    /// otherwise only calls whose client address is known and allowed (an address that could
    /// not be determined never passes an allowlist).
    pub fn allows_client(&self, ip: Option<IpAddr>) -> bool {
        self.ip_allowlist.is_empty() || ip.is_some_and(|ip| self.allows_ip(ip))
    }

    /// True when the address is allowed by the key's allowlist.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.ip_allowlist.is_empty() || self.ip_allowlist.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::KeyScope;
    use poem::http::Method;

    #[test]
    fn every_customer_path_needs_its_scope() {
        let cases = [
            (
                Method::POST,
                "/api/enterprise/video-batch",
                KeyScope::BatchesWrite,
            ),
            (
                Method::POST,
                "/api/enterprise/video-batch/",
                KeyScope::BatchesWrite,
            ),
            (
                Method::POST,
                "/api/enterprise/video-batch/b/cancel",
                KeyScope::BatchesWrite,
            ),
            (
                Method::POST,
                "/api/enterprise/video-batch/b/retry-failed",
                KeyScope::BatchesWrite,
            ),
            (
                Method::GET,
                "/api/enterprise/video-batch",
                KeyScope::BatchesRead,
            ),
            (
                Method::GET,
                "/api/enterprise/video-batch/b/errors",
                KeyScope::BatchesRead,
            ),
            (
                Method::GET,
                "/api/enterprise/credits",
                KeyScope::CreditsRead,
            ),
            (Method::GET, "/api/enterprise/usage", KeyScope::UsageRead),
            (
                Method::GET,
                "/api/enterprise/webhooks/deliveries",
                KeyScope::WebhooksRead,
            ),
            (
                Method::POST,
                "/api/enterprise/webhooks/recover",
                KeyScope::WebhooksWrite,
            ),
        ];
        for (method, path, scope) in cases {
            assert_eq!(
                KeyScope::of_call(&method, path),
                Some(scope),
                "{method} {path}"
            );
        }
        assert_eq!(KeyScope::of_call(&Method::GET, "/api/admin/keys"), None);
        assert_eq!(
            KeyScope::of_call(&Method::GET, "/api/enterprise/other"),
            None
        );
        for s in KeyScope::ALL {
            assert_eq!(KeyScope::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeyScope::parse("batches:delete"), None);
    }
}
