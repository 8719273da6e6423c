//! Validation: the raw configuration checked field by field (messages name the file and the
//! field) and turned into [`Settings`], with `[defaults]` merged into every key.
use std::collections::HashMap;
use std::time::Duration;

use super::check::Check;
use super::load::Origins;
use super::raw::*;
use super::*;

impl RawSettings {
    pub(super) fn validate(
        self,
        environment: &str,
        origins: &Origins<'_>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let c = Check { origins, env };
        if self.server.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(c.err(
                "server.bind",
                format!("{:?} is not host:port", self.server.bind),
            ));
        }
        if self
            .server
            .ops_bind
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(c.err(
                "server.ops_bind",
                format!("{:?} is not host:port", self.server.ops_bind),
            ));
        }
        let trusted_proxies = c.cidrs("server.trusted_proxies", &self.server.trusted_proxies)?;
        let header_timeout = c.positive(
            "server.header_timeout_seconds",
            self.server.header_timeout_seconds,
        )?;
        let body_timeout = c.positive(
            "server.body_timeout_seconds",
            self.server.body_timeout_seconds,
        )?;
        let idle_timeout = c.positive(
            "server.idle_timeout_seconds",
            self.server.idle_timeout_seconds,
        )?;
        let server_connections =
            c.positive("server.max_connections", self.server.max_connections)?;
        let unauthenticated_per_min = c.positive(
            "server.unauthenticated_per_min",
            self.server.unauthenticated_per_min,
        )?;
        let refused_per_min = c.positive("server.refused_per_min", self.server.refused_per_min)?;
        let max_body = c.positive("server.max_body_bytes", self.server.max_body_bytes)?;
        let grace = c.positive(
            "server.shutdown_grace_seconds",
            self.server.shutdown_grace_seconds,
        )?;
        let url = c.secret("database.url", &self.database.url)?;
        let u = url.expose();
        if !(u.starts_with("sqlite:")
            || u.starts_with("postgres://")
            || u.starts_with("postgresql://"))
        {
            return Err(c.err(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        let ms = |field: &str, v: i64| {
            c.positive(field, v)
                .map(|v| std::time::Duration::from_millis(u64::from(v)))
        };
        let db = &self.database;
        let timeouts = StoreTimeouts {
            acquire: ms("database.acquire_timeout_ms", db.acquire_timeout_ms)?,
            statement: ms("database.statement_timeout_ms", db.statement_timeout_ms)?,
            lock: ms("database.lock_timeout_ms", db.lock_timeout_ms)?,
            busy: ms("database.busy_timeout_ms", db.busy_timeout_ms)?,
        };
        let sqlite_max_page_count = u64::try_from(db.sqlite_max_page_count).map_err(|_| {
            c.err(
                "database.sqlite_max_page_count",
                "must be 0 (no limit) or a positive number",
            )
        })?;
        let sqlite_cache_kib = c.positive("database.sqlite_cache_kib", db.sqlite_cache_kib)?;
        let database = DatabaseSettings {
            timeouts,
            sqlite_cache_kib,
            sqlite_max_page_count,
            url,
            max_connections: c
                .positive("database.max_connections", self.database.max_connections)?,
            write_lanes: c.positive("database.write_lanes", self.database.write_lanes)?,
            sqlite_synchronous: match self.database.sqlite_synchronous.as_str() {
                "full" => SqliteSynchronous::Full,
                "normal" => SqliteSynchronous::Normal,
                other => {
                    return Err(c.err(
                        "database.sqlite_synchronous",
                        format!("{other:?} is not full or normal"),
                    ));
                }
            },
        };
        let d = &self.defaults;
        let defaults = PolicyLimits {
            cost_per_video: c.positive("defaults.cost_per_video", d.cost_per_video)? as i64,
            rate_limit_per_min: c.positive("defaults.rate_limit_per_min", d.rate_limit_per_min)?,
            read_rate_limit_per_min: c.positive(
                "defaults.read_rate_limit_per_min",
                d.read_rate_limit_per_min,
            )?,
            max_batch_items: c.positive("defaults.max_batch_items", d.max_batch_items)?,
            max_prompt_chars: c.positive("defaults.max_prompt_chars", d.max_prompt_chars)?,
            ip_allowlist: c.cidrs("defaults.ip_allowlist", &d.ip_allowlist)?,
            completion_window: crate::domain::policy::parse_completion_window(&d.completion_window)
                .map_err(|m| c.err("defaults.completion_window", m))?,
        };

        let (accounts, keys) =
            super::customers::accounts_and_keys(&c, self.accounts, self.keys, &defaults)?;

        let worker = WorkerSettings {
            secret: c.secret("worker.secret", &self.worker.secret)?,
            lease_seconds: c.positive("worker.lease_seconds", self.worker.lease_seconds)?,
            max_attempts: c.positive("worker.max_attempts", self.worker.max_attempts)?,
        };
        let mut retry_schedule = Vec::new();
        for s in &self.webhooks.retry_schedule {
            let d = humantime::parse_duration(s).map_err(|e| {
                c.err(
                    "webhooks.retry_schedule",
                    format!("{s:?} is not a duration like 5s, 5m or 2h: {e}"),
                )
            })?;
            retry_schedule.push(d);
        }
        let webhooks = WebhookSettings {
            timeout: Duration::from_secs(
                c.positive("webhooks.timeout_seconds", self.webhooks.timeout_seconds)?
                    .into(),
            ),
            retry_schedule,
            allow_private_targets: self.webhooks.allow_private_targets,
            allow_private_targets_on_public_bind: self
                .webhooks
                .allow_private_targets_on_public_bind,
            dispatch: self.webhooks.dispatch,
            concurrency: c.positive("webhooks.concurrency", self.webhooks.concurrency)?,
            per_key_concurrency: c.positive(
                "webhooks.per_key_concurrency",
                self.webhooks.per_key_concurrency,
            )?,
            disable_after: match humantime::parse_duration(&self.webhooks.disable_after) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    return Err(c.err(
                        "webhooks.disable_after",
                        format!(
                            "{:?} is not a positive duration like 5days, 12h or 30s",
                            self.webhooks.disable_after
                        ),
                    ));
                }
            },
            poll: WebhookSettings::POLL,
        };
        let admin = AdminSettings {
            token: c.secret("admin.token", &self.admin.token)?,
        };
        let log = LogSettings {
            json: match self.log.format.as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(c.err("log.format", format!("{other:?} is not text or json")));
                }
            },
        };
        let days = |field: &str, v: i64| {
            u32::try_from(v)
                .ok()
                .filter(|d| *d <= 36_500)
                .ok_or_else(|| c.err(field, format!("must be 0 (keep) to 36500 days, got {v}")))
        };
        let retention = RetentionSettings {
            usage_days: days("retention.usage_days", self.retention.usage_days)?,
            webhook_days: days("retention.webhook_days", self.retention.webhook_days)?,
            usage_rollup_days: days(
                "retention.usage_rollup_days",
                self.retention.usage_rollup_days,
            )?,
        };
        let settings = Settings {
            environment: environment.to_string(),
            retention,
            server: ServerSettings {
                bind: self.server.bind,
                trusted_proxies,
                max_body_bytes: max_body as usize,
                shutdown_grace: Duration::from_secs(grace.into()),
                ops_bind: self.server.ops_bind,
                header_timeout: Duration::from_secs(header_timeout.into()),
                body_timeout: Duration::from_secs(body_timeout.into()),
                idle_timeout: Duration::from_secs(idle_timeout.into()),
                max_connections: server_connections,
                unauthenticated_per_min,
                refused_per_min,
            },
            database,
            accounts,
            keys,
            defaults,
            worker,
            webhooks,
            admin,
            log,
        };
        if environment == "production" {
            settings.check_production(&c)?;
        }
        settings.check_exposure(&c)?;
        Ok(settings)
    }
}

impl Settings {
    fn check_production(&self, c: &Check<'_>) -> Result<(), ConfigError> {
        for k in self.keys.values() {
            if k.name == DEMO_KEY_NAME || k.key_sha256 == DEMO_KEY_SHA256 {
                return Err(c.err(
                    &format!("keys.{}", k.name),
                    "the demo key must not be configured in production",
                ));
            }
            if k.previous_key
                .as_ref()
                .is_some_and(|p| p.key_sha256 == DEMO_KEY_SHA256)
            {
                return Err(c.err(
                    &format!("keys.{}.previous_key_sha256", k.name),
                    "is the public demo key's hash; the demo key must not be configured in \
                     production",
                ));
            }
        }
        if self.worker.secret.expose().len() < 32 {
            return Err(c.err(
                "worker.secret",
                "must be at least 32 characters in production",
            ));
        }
        if self.admin.token.expose().len() < 32 {
            return Err(c.err(
                "admin.token",
                "must be at least 32 characters in production",
            ));
        }
        if self.webhooks.allow_private_targets {
            return Err(c.err(
                "webhooks.allow_private_targets",
                "must be false in production",
            ));
        }
        Ok(())
    }

    /// Whatever the environment is called: a server that other machines reach runs with no
    /// secret the repository ships (they are public), and lets customers' webhooks reach the
    /// private network only when a separate setting says so.
    fn check_exposure(&self, c: &Check<'_>) -> Result<(), ConfigError> {
        let loopback = self
            .server
            .bind
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if loopback {
            return Ok(());
        }
        let bind = &self.server.bind;
        let now = chrono::Utc::now();
        let demo = self.keys.values().find(|k| {
            !k.disabled
                && (k.key_sha256 == DEMO_KEY_SHA256
                    || k.previous_key
                        .as_ref()
                        .is_some_and(|p| p.key_sha256 == DEMO_KEY_SHA256 && p.expires_at > now))
        });
        let shipped = if let Some(k) = demo {
            Some(format!(
                "the public demo key (keys.{}); bind a loopback address, or disable or replace \
                 that key",
                k.name
            ))
        } else if SHIPPED_WORKER_SECRETS.contains(&self.worker.secret.expose()) {
            Some("the shipped worker.secret; bind a loopback address or set your own".into())
        } else if SHIPPED_ADMIN_TOKENS.contains(&self.admin.token.expose()) {
            Some("the shipped admin.token; bind a loopback address or set your own".into())
        } else {
            None
        };
        if let Some(what) = shipped {
            return Err(c.err(
                "server.bind",
                format!("{bind:?} is reachable from other machines while {what}"),
            ));
        }
        if self.webhooks.allow_private_targets
            && !self.webhooks.allow_private_targets_on_public_bind
        {
            return Err(c.err(
                "webhooks.allow_private_targets",
                format!(
                    "lets customers' webhooks reach loopback and private addresses while \
                     server.bind {bind:?} is reachable from other machines; bind a loopback \
                     address, set it to false, or acknowledge it with \
                     webhooks.allow_private_targets_on_public_bind = true"
                ),
            ));
        }
        Ok(())
    }
}
