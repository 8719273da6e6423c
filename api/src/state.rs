//! Shared application state: the database and the live, swappable policy.
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sea_orm::{DatabaseConnection, DbBackend};

use crate::domain::ids::AccountId;
use crate::schemas::admin::ReloadResult;
use crate::settings::{AccountPolicy, ConfigSource, KeyPolicy, Settings};
pub use crate::store::keys::SyncedIds;

/// A configured key, its database id and its account's.
#[derive(Clone, Debug)]
pub struct KeyEntry {
    /// `api_key.id`.
    pub id: i64,
    /// The account the key belongs to: what owns everything the key's calls create or spend.
    pub account: AccountId,
    /// Effective policy.
    pub policy: Arc<KeyPolicy>,
}

/// A configured account and its database id.
#[derive(Clone, Debug)]
pub struct AccountEntry {
    /// `account.id`.
    pub id: AccountId,
    /// Effective policy.
    pub policy: Arc<AccountPolicy>,
}

/// One consistent view of the configuration: requests load it once and use it throughout.
#[derive(Debug)]
pub struct Runtime {
    /// The validated settings.
    pub settings: Settings,
    /// Enabled keys by lower-case hex SHA-256.
    pub by_hash: HashMap<String, KeyEntry>,
    /// Configured accounts (enabled or not) by database id.
    pub accounts: HashMap<i64, AccountEntry>,
    /// Configured accounts by name.
    pub accounts_by_name: HashMap<String, AccountEntry>,
    /// Configured keys by name.
    pub by_name: HashMap<String, KeyEntry>,
    /// `max_running_items` of the accounts that have one, by account id.
    pub running_caps: HashMap<i64, u32>,
    /// Enabled keys by the hash of the key they replaced, with the end of the overlap.
    pub by_previous_hash: HashMap<String, (KeyEntry, chrono::DateTime<chrono::Utc>)>,
}

impl Runtime {
    /// Indexes `settings` with the ids the sync returned.
    pub fn new(settings: Settings, ids: &SyncedIds) -> Self {
        let mut by_hash = HashMap::new();
        let mut accounts = HashMap::new();
        let mut accounts_by_name = HashMap::new();
        let mut by_name = HashMap::new();
        let mut by_previous_hash = HashMap::new();
        let mut running_caps = HashMap::new();
        for (name, policy) in &settings.accounts {
            let Some(&id) = ids.accounts.get(name) else {
                continue;
            };
            let entry = AccountEntry {
                id: AccountId(id),
                policy: Arc::clone(policy),
            };
            if let Some(cap) = policy.max_running_items {
                running_caps.insert(id, cap);
            }
            accounts.insert(id, entry.clone());
            accounts_by_name.insert(name.clone(), entry);
        }
        for (name, policy) in &settings.keys {
            let Some(&id) = ids.keys.get(name) else {
                continue;
            };
            let Some(account) = accounts_by_name.get(&policy.account.name) else {
                continue;
            };
            let entry = KeyEntry {
                id,
                account: account.id,
                policy: Arc::clone(policy),
            };
            if !policy.disabled {
                by_hash.insert(policy.key_sha256.clone(), entry.clone());
                if let Some(previous) = &policy.previous_key {
                    by_previous_hash.insert(
                        previous.key_sha256.clone(),
                        (entry.clone(), previous.expires_at),
                    );
                }
            }
            by_name.insert(name.clone(), entry);
        }
        Self {
            settings,
            by_hash,
            accounts,
            accounts_by_name,
            by_name,
            by_previous_hash,
            running_caps,
        }
    }

    /// The enabled key whose secret hashes to `hash` at `now`, and which of its two secrets it
    /// is: the current one, or the one it replaced while the rotation overlap lasts.
    pub fn authenticate(
        &self,
        hash: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<(&KeyEntry, crate::settings::KeyVersion)> {
        use crate::settings::KeyVersion;
        if let Some(k) = self.by_hash.get(hash) {
            return Some((k, KeyVersion::Current));
        }
        self.by_previous_hash
            .get(hash)
            .filter(|(_, until)| now < *until)
            .map(|(k, _)| (k, KeyVersion::Previous))
    }
}

/// Everything a handler needs.
pub struct AppState {
    /// Connection pool for reads (and everything on PostgreSQL).
    pub db: DatabaseConnection,
    /// Where writes go (see [`crate::db::writer_for`]).
    pub writer: DatabaseConnection,
    /// The live configuration, swapped whole on reload.
    pub runtime: ArcSwap<Runtime>,
    /// Where the configuration came from, for reloads (None: fixed settings).
    pub source: Option<ConfigSource>,
    /// Serialises reloads.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// The count of reloads (by any node, see `config_reload`) this node's configuration
    /// follows: when the database's count moves past it, this node reads its files again.
    pub reloads_seen: std::sync::atomic::AtomicI64,
    /// Keys disabled in the database, refreshed every few seconds: a key revoked by any node's
    /// reload is refused here too, even while this node's configuration still lists it.
    pub revoked: ArcSwap<std::collections::HashSet<i64>>,
    /// The group-commit write lanes every request's writes go through.
    pub writes: crate::store::commit::Writes,
    /// Woken when this node commits webhook events, so the dispatcher sends them at once.
    pub webhook_wakeup: tokio::sync::Notify,
    /// Webhook URLs a customer said are back (a resend, a recover, an enable): this node's
    /// dispatcher ends their backoff and sends to them at once.
    pub webhook_back: std::sync::Mutex<Vec<String>>,
    /// "Now" for rate-limit windows, audit minutes and "today" (tests may freeze it).
    pub clock: crate::clock::Clock,
    /// This node's budget and aggregated audit of calls without a valid key.
    pub strangers: crate::strangers::Throttle,
    /// This node's budget, per key and client address, and aggregated audit of a valid key's
    /// refused calls (address not allowed, body too large or too slow).
    pub refused_keys: crate::strangers::Throttle,
    /// What `/readyz` answers: the background probe's latest finding.
    pub readiness: crate::readiness::Readiness,
    /// SQLite `max_page_count` of the writer (tests make the store full with it).
    pub page_limit: crate::db::PageLimit,
    /// Held by the lease reaper for each pass. Tests only: a test that counts this node's
    /// commits holds it to pause the reaper (waiting for a pass in progress to end).
    pub reaper_gate: tokio::sync::Mutex<()>,
}

impl AppState {
    /// Loads the configuration again; if it is valid, syncs accounts and keys and swaps the
    /// policy whole.
    pub async fn reload(&self) -> Result<ReloadResult, String> {
        let state = self;
        let _guard = state.reload_lock.lock().await;
        let source = state.source.as_ref().ok_or_else(|| {
            "this server was started with fixed settings; nothing to reload".to_string()
        })?;
        let settings = current_files(source).map_err(|e| {
            metrics::counter!("config_reloads_total", "outcome" => "rejected").increment(1);
            tracing::error!(error = %e, "configuration reload rejected; the running configuration stays");
            e.to_string()
        })?;
        let ids = crate::store::keys::sync(&state.writer, &settings)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "key sync failed during reload");
                "key sync failed; the running configuration stays".to_string()
            })?;
        if let Ok(revoked) = crate::store::keys::disabled_ids(&state.writer).await {
            state.revoked.store(Arc::new(revoked));
        }
        let result = state.swap_in(settings, &ids);
        match crate::store::keys::count_reload(&state.writer).await {
            Ok(n) => state
                .reloads_seen
                .store(n, std::sync::atomic::Ordering::SeqCst),
            Err(e) => {
                tracing::warn!(error = %e, "counting the reload failed; other nodes follow it at their own reload")
            }
        }
        metrics::counter!("config_reloads_total", "outcome" => "applied").increment(1);
        tracing::info!(
            accounts = result.accounts,
            keys = result.keys,
            enabled = result.enabled_keys,
            "configuration reloaded"
        );
        Ok(result)
    }

    /// Reads this node's configuration files again after another node's reload (the database's
    /// reload count reached `count`), indexing them with the ids in the database: read only,
    /// since the reloading node synced them. Every node given the same files follows a reload
    /// on any of them within seconds. A file that no longer loads leaves the running policy.
    pub async fn follow_reload(&self, count: i64) {
        use std::sync::atomic::Ordering;
        let _guard = self.reload_lock.lock().await;
        if self.reloads_seen.load(Ordering::SeqCst) >= count {
            return;
        }
        self.reloads_seen.store(count, Ordering::SeqCst);
        let Some(source) = self.source.as_ref() else {
            return;
        };
        let settings = match current_files(source) {
            Ok(s) => s,
            Err(e) => {
                metrics::counter!("config_reloads_total", "outcome" => "rejected").increment(1);
                tracing::error!(error = %e, "another node reloaded, but this node's configuration is rejected; the running configuration stays");
                return;
            }
        };
        let ids = match crate::store::keys::ids(&self.db, &settings).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "reading account and key ids failed; following the reload later");
                self.reloads_seen.store(count - 1, Ordering::SeqCst);
                return;
            }
        };
        let result = self.swap_in(settings, &ids);
        metrics::counter!("config_reloads_total", "outcome" => "followed").increment(1);
        tracing::info!(
            accounts = result.accounts,
            keys = result.keys,
            enabled = result.enabled_keys,
            "configuration reloaded after another node's reload"
        );
    }

    /// Puts `settings`, indexed with `ids`, in force for the next request; what it holds.
    fn swap_in(&self, settings: Settings, ids: &SyncedIds) -> ReloadResult {
        crate::telemetry::register_known_series(settings.keys.keys().map(String::as_str));
        let runtime = Runtime::new(settings, ids);
        let result = ReloadResult {
            ok: true,
            accounts: runtime.accounts.len() as u32,
            keys: runtime.by_name.len() as u32,
            enabled_keys: runtime.by_hash.len() as u32,
        };
        self.runtime.store(Arc::new(runtime));
        result
    }

    /// The database backend.
    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// The current configuration.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }
}

/// The configuration `source` names, as its files (and, for secrets written `env:`, the
/// environment) are now.
fn current_files(source: &ConfigSource) -> Result<Settings, crate::settings::ConfigError> {
    let mut source = source.clone();
    if source.refresh_env {
        source.env = std::env::vars().collect();
    }
    source.load()
}
