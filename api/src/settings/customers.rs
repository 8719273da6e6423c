//! `[accounts.NAME]` and `[keys.NAME]`: each checked field by field and merged with
//! `[defaults]`. A key names its account, or is its own account (named after it) whose
//! settings are written in the key's table.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::check::Check;
use super::raw::{RawAccount, RawKey};
use super::*;

/// Accounts (those of `[accounts]` and every key's own) and keys, by name.
pub(super) type Customers = (
    BTreeMap<String, Arc<AccountPolicy>>,
    BTreeMap<String, Arc<KeyPolicy>>,
);

fn check_name(c: &Check<'_>, table: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-')
    {
        return Err(c.err(
            &format!("{table}.{name}"),
            format!("{table} names are 1-64 characters of a-z, 0-9, _ and -"),
        ));
    }
    Ok(())
}

/// Checks and merges every account and key.
pub(super) fn accounts_and_keys(
    c: &Check<'_>,
    raw_accounts: BTreeMap<String, RawAccount>,
    raw_keys: BTreeMap<String, RawKey>,
    defaults: &PolicyLimits,
) -> Result<Customers, ConfigError> {
    let mut accounts = BTreeMap::new();
    for (name, a) in raw_accounts {
        check_name(c, "accounts", &name)?;
        let policy = account_policy(c, &format!("accounts.{name}"), &name, a, defaults, false)?;
        accounts.insert(name, Arc::new(policy));
    }
    // Keys without `account`: each is an account of its own, named after it.
    let own: std::collections::HashSet<&String> = raw_keys
        .iter()
        .filter(|(_, k)| k.account.is_none())
        .map(|(name, _)| name)
        .collect();
    let own: std::collections::HashSet<String> = own.into_iter().cloned().collect();
    let mut keys = BTreeMap::new();
    let mut hashes: HashMap<String, String> = HashMap::new();
    for (name, k) in raw_keys {
        check_name(c, "keys", &name)?;
        let f = |field: &str| format!("keys.{name}.{field}");
        let account = match &k.account {
            Some(account) => {
                if own.contains(account) && accounts.get(account).is_none_or(|a| a.implicit) {
                    return Err(c.err(
                        &f("account"),
                        format!(
                            "{account:?} is the key {account:?}'s own account; name an \
                             [accounts.NAME] table"
                        ),
                    ));
                }
                let Some(policy) = accounts.get(account) else {
                    return Err(c.err(
                        &f("account"),
                        format!("names no account: add an [accounts.{account}] table"),
                    ));
                };
                if policy.implicit {
                    return Err(c.err(
                        &f("account"),
                        format!(
                            "{account:?} is the key {account:?}'s own account; name an \
                             [accounts.NAME] table"
                        ),
                    ));
                }
                if let Some(field) = k.account_fields_set().first() {
                    return Err(c.err(
                        &f(field),
                        format!(
                            "belongs to the account: set it in [accounts.{account}] (a key of an \
                             account sets only key_sha256, the rotation fields, ip_allowlist, \
                             scopes, disabled and its own tighter rate_limit_per_min and \
                             read_rate_limit_per_min)"
                        ),
                    ));
                }
                Arc::clone(policy)
            }
            None => {
                if accounts.get(&name).is_some_and(|a| !a.implicit) {
                    return Err(c.err(
                        &format!("accounts.{name}"),
                        format!(
                            "shares its name with the key {name:?}, which names no account and so \
                             is its own account; set account = {name:?} in [keys.{name}] to make \
                             the key this account's"
                        ),
                    ));
                }
                let policy = account_policy(
                    c,
                    &format!("keys.{name}"),
                    &name,
                    k.own_account(),
                    defaults,
                    true,
                )?;
                let policy = Arc::new(policy);
                accounts.insert(name.clone(), Arc::clone(&policy));
                policy
            }
        };
        // A key of an `[accounts]` table may cap itself below its account's limits.
        let (rate_limit_per_min, read_rate_limit_per_min) = if account.implicit {
            (None, None)
        } else {
            (
                k.rate_limit_per_min
                    .map(|v| c.positive(&f("rate_limit_per_min"), v))
                    .transpose()?,
                k.read_rate_limit_per_min
                    .map(|v| c.positive(&f("read_rate_limit_per_min"), v))
                    .transpose()?,
            )
        };
        let hash = k.key_sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.chars().all(|ch| ch.is_ascii_hexdigit()) {
            return Err(c.err(
                &f("key_sha256"),
                "must be 64 hexadecimal characters (SHA-256 of the key)",
            ));
        }
        if let Some(other) = hashes.insert(hash.clone(), name.clone()) {
            return Err(c.err(
                &f("key_sha256"),
                format!("the same key is already configured as {other:?}"),
            ));
        }
        let ip_allowlist = match &k.ip_allowlist {
            Some(list) => c.cidrs(&f("ip_allowlist"), list)?,
            None => defaults.ip_allowlist.clone(),
        };
        let previous_key = match (&k.previous_key_sha256, &k.previous_key_expires_at) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(c.err(
                    &f("previous_key_expires_at"),
                    "is required when previous_key_sha256 is set (RFC 3339, e.g. 2026-12-01T00:00:00Z)",
                ));
            }
            (None, Some(_)) => {
                return Err(c.err(
                    &f("previous_key_sha256"),
                    "is required when previous_key_expires_at is set",
                ));
            }
            (Some(old), Some(until)) => {
                let old = old.to_ascii_lowercase();
                if old.len() != 64 || !old.chars().all(|ch| ch.is_ascii_hexdigit()) {
                    return Err(c.err(
                        &f("previous_key_sha256"),
                        "must be 64 hexadecimal characters (SHA-256 of the old key)",
                    ));
                }
                if let Some(other) = hashes.insert(old.clone(), name.clone()) {
                    return Err(c.err(
                        &f("previous_key_sha256"),
                        format!("the same key is already configured as {other:?}"),
                    ));
                }
                let expires_at = chrono::DateTime::parse_from_rfc3339(until)
                    .map_err(|_| {
                        c.err(
                            &f("previous_key_expires_at"),
                            format!("{until:?} is not an RFC 3339 time like 2026-12-01T00:00:00Z"),
                        )
                    })?
                    .with_timezone(&chrono::Utc);
                Some(PreviousKey {
                    key_sha256: old,
                    expires_at,
                })
            }
        };
        let scopes = match &k.scopes {
            None => KeyScope::ALL.to_vec(),
            Some(names) => {
                let known = || {
                    KeyScope::ALL
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut scopes = Vec::new();
                for n in names {
                    let Some(s) = KeyScope::parse(n.trim()) else {
                        return Err(c.err(
                            &f("scopes"),
                            format!("unknown scope {n:?}; known: {}", known()),
                        ));
                    };
                    scopes.push(s);
                }
                if scopes.is_empty() {
                    return Err(c.err(
                        &f("scopes"),
                        format!(
                            "names no scope (to refuse every call, set disabled = true); known: {}",
                            known()
                        ),
                    ));
                }
                scopes.sort_unstable();
                scopes.dedup();
                scopes
            }
        };
        keys.insert(
            name.clone(),
            Arc::new(KeyPolicy {
                name,
                key_sha256: hash,
                ip_allowlist,
                rate_limit_per_min,
                read_rate_limit_per_min,
                disabled: k.disabled || account.disabled,
                previous_key,
                scopes,
                account,
            }),
        );
    }
    Ok((accounts, keys))
}

/// An account's policy from its table (`[accounts.NAME]`, or the table of a key that is its own
/// account: `prefix` names it in messages).
fn account_policy(
    c: &Check<'_>,
    prefix: &str,
    name: &str,
    a: RawAccount,
    defaults: &PolicyLimits,
    implicit: bool,
) -> Result<AccountPolicy, ConfigError> {
    let f = |field: &str| format!("{prefix}.{field}");
    let limits = PolicyLimits {
        cost_per_video: c.positive(
            &f("cost_per_video"),
            a.cost_per_video.unwrap_or(defaults.cost_per_video),
        )? as i64,
        rate_limit_per_min: match a.rate_limit_per_min {
            Some(v) => c.positive(&f("rate_limit_per_min"), v)?,
            None => defaults.rate_limit_per_min,
        },
        read_rate_limit_per_min: match a.read_rate_limit_per_min {
            Some(v) => c.positive(&f("read_rate_limit_per_min"), v)?,
            None => defaults.read_rate_limit_per_min,
        },
        max_batch_items: match a.max_batch_items {
            Some(v) => c.positive(&f("max_batch_items"), v)?,
            None => defaults.max_batch_items,
        },
        max_prompt_chars: match a.max_prompt_chars {
            Some(v) => c.positive(&f("max_prompt_chars"), v)?,
            None => defaults.max_prompt_chars,
        },
        ip_allowlist: Vec::new(),
        completion_window: match &a.completion_window {
            Some(w) => crate::domain::policy::parse_completion_window(w)
                .map_err(|m| c.err(&f("completion_window"), m))?,
            None => defaults.completion_window,
        },
    };
    if let Some(url) = &a.webhook_url {
        c.webhook_url(&f("webhook_url"), url)?;
    }
    let webhook_secret = a
        .webhook_secret
        .as_deref()
        .map(|s| c.whsec(&f("webhook_secret"), s))
        .transpose()?;
    let webhook_previous_secret = a
        .webhook_previous_secret
        .as_deref()
        .map(|s| c.whsec(&f("webhook_previous_secret"), s))
        .transpose()?;
    let webhook_previous_secret_expires_at = match &a.webhook_previous_secret_expires_at {
        None => None,
        Some(_) if webhook_previous_secret.is_none() => {
            return Err(c.err(
                &f("webhook_previous_secret"),
                "is required when webhook_previous_secret_expires_at is set",
            ));
        }
        Some(at) => Some(
            chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|_| {
                    c.err(
                        &f("webhook_previous_secret_expires_at"),
                        "must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z",
                    )
                })?
                .with_timezone(&chrono::Utc),
        ),
    };
    if a.webhook_url.is_some() && webhook_secret.is_none() {
        return Err(c.err(&f("webhook_secret"), "is required when webhook_url is set"));
    }
    let webhook_events = a
        .webhook_events
        .unwrap_or_else(|| DEFAULT_WEBHOOK_EVENTS.map(String::from).to_vec());
    for e in &webhook_events {
        if !WEBHOOK_EVENTS.contains(&e.as_str()) {
            return Err(c.err(
                &f("webhook_events"),
                format!("unknown event {e:?}; known: {}", WEBHOOK_EVENTS.join(", ")),
            ));
        }
    }
    let low_credit_threshold = match a.low_credit_threshold {
        None => None,
        Some(v) if (1..=crate::domain::money::MAX_BALANCE).contains(&v) => Some(v),
        Some(v) => {
            return Err(c.err(
                &f("low_credit_threshold"),
                format!(
                    "must be between 1 and {}, got {v}",
                    crate::domain::money::MAX_BALANCE
                ),
            ));
        }
    };
    let max_running_items = a
        .max_running_items
        .map(|v| c.positive(&f("max_running_items"), v))
        .transpose()?;
    if !(0..=crate::domain::money::MAX_BALANCE).contains(&a.initial_credits) {
        return Err(c.err(
            &f("initial_credits"),
            format!(
                "must be between 0 and {}",
                crate::domain::money::MAX_BALANCE
            ),
        ));
    }
    Ok(AccountPolicy {
        name: name.to_string(),
        implicit,
        limits,
        webhook_url: a.webhook_url,
        webhook_secret,
        webhook_previous_secret,
        webhook_previous_secret_expires_at,
        webhook_events,
        initial_credits: a.initial_credits,
        low_credit_threshold,
        max_running_items,
        disabled: a.disabled,
    })
}
