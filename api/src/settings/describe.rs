//! The effective configuration as text with secrets redacted (`config check`).
use super::{Settings, redact_url};

impl Settings {
    /// The effective policy as TOML-like text with secrets redacted (`config check`).
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "environment = {:?}", self.environment);
        let _ = writeln!(out, "server.bind = {:?}", self.server.bind);
        let _ = writeln!(out, "server.ops_bind = {:?}", self.server.ops_bind);
        let _ = writeln!(
            out,
            "server.trusted_proxies = {:?}",
            self.server
                .trusted_proxies
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        );
        let _ = writeln!(
            out,
            "database = {:?}",
            redact_url(self.database.url.expose())
        );
        let _ = writeln!(
            out,
            "worker.secret = \"[redacted]\"  admin.token = \"[redacted]\""
        );
        let _ = writeln!(
            out,
            "retention.usage_days = {}  retention.webhook_days = {}  \
             retention.usage_rollup_days = {}",
            self.retention.usage_days,
            self.retention.webhook_days,
            self.retention.usage_rollup_days
        );
        for a in self.accounts.values() {
            let l = &a.limits;
            let _ = writeln!(out, "\n[accounts.{}]", a.name);
            if a.implicit {
                let _ = writeln!(out, "# the own account of [keys.{}]", a.name);
            }
            let keys: Vec<&str> = self
                .keys
                .values()
                .filter(|k| k.account.name == a.name)
                .map(|k| k.name.as_str())
                .collect();
            let _ = writeln!(out, "keys = {keys:?}");
            let _ = writeln!(out, "disabled = {}", a.disabled);
            let _ = writeln!(out, "cost_per_video = {}", l.cost_per_video);
            let _ = writeln!(out, "rate_limit_per_min = {}", l.rate_limit_per_min);
            let _ = writeln!(
                out,
                "read_rate_limit_per_min = {}",
                l.read_rate_limit_per_min
            );
            let _ = writeln!(out, "max_batch_items = {}", l.max_batch_items);
            let _ = writeln!(out, "max_prompt_chars = {}", l.max_prompt_chars);
            let _ = writeln!(
                out,
                "completion_window = {:?}",
                l.completion_window
                    .map_or("0".to_string(), |w| humantime::format_duration(w)
                        .to_string())
            );
            let _ = writeln!(out, "webhook_url = {:?}", a.webhook_url);
            let _ = writeln!(
                out,
                "webhook_secret = {}",
                if a.webhook_secret.is_some() {
                    "\"[redacted]\""
                } else {
                    "none"
                }
            );
            let _ = writeln!(out, "webhook_events = {:?}", a.webhook_events);
            let _ = writeln!(out, "initial_credits = {}", a.initial_credits);
            let _ = writeln!(
                out,
                "low_credit_threshold = {}",
                a.low_credit_threshold
                    .map_or("none".to_string(), |t| t.to_string())
            );
            let _ = writeln!(
                out,
                "max_running_items = {}",
                a.max_running_items
                    .map_or("unlimited".to_string(), |m| m.to_string())
            );
        }
        for k in self.keys.values() {
            let _ = writeln!(out, "\n[keys.{}]", k.name);
            let _ = writeln!(out, "account = {:?}", k.account.name);
            let _ = writeln!(out, "key_sha256 = \"{}…\"", &k.key_sha256[..12]);
            let _ = writeln!(out, "disabled = {}", k.disabled);
            let _ = writeln!(out, "rate_limit_per_min = {}", k.create_limit());
            let _ = writeln!(out, "read_rate_limit_per_min = {}", k.read_limit());
            let _ = writeln!(
                out,
                "ip_allowlist = {:?}",
                k.ip_allowlist
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
            );
            let _ = writeln!(
                out,
                "scopes = {:?}",
                k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>()
            );
            if let Some(p) = &k.previous_key {
                let _ = writeln!(
                    out,
                    "previous_key_expires_at = {:?}",
                    p.expires_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
            }
        }
        out
    }
}
