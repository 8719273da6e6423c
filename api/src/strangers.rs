//! Calls that carry no valid key ("strangers"): each client address gets a small budget per
//! minute, kept in this node's memory. Within it, calls are answered and audited one row each;
//! beyond it they are refused with 429 at no database cost, and their audit is aggregated into
//! one row per (address, minute, outcome) written in the background.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;

use chrono::{DateTime, TimeZone, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::store::pipeline::Writes;
use crate::store::usage::{self, UsageRow};

/// Distinct (address, minute, outcome) groups kept before further addresses share one group.
const MAX_GROUPS: usize = 10_000;

/// What to do with a call that carries no valid key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the address's budget: answer and audit it as usual.
    Allowed,
    /// Over budget: refuse with 429; retry after this many seconds.
    Throttled {
        /// Seconds until the address may try again.
        retry_after: u32,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Group {
    ip: Option<IpAddr>,
    minute: i64,
    status: u16,
    code: Option<&'static str>,
}

/// The per-address budget and the aggregated audit of refused calls.
pub struct Strangers {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    per_min: u32,
    groups: Mutex<HashMap<Group, i64>>,
}

impl std::fmt::Debug for Strangers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Strangers")
            .field("per_min", &self.per_min)
            .finish_non_exhaustive()
    }
}

/// The budget is shared by an IPv6 /64 (one subscriber's network), by an IPv4 address, and by
/// all calls whose address is unknown.
fn budget_key(ip: Option<IpAddr>) -> IpAddr {
    match ip {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        Some(v4) => v4,
    }
}

impl Strangers {
    /// A budget of `per_min` calls per address and minute (as a burst, refilled evenly).
    pub fn new(per_min: u32) -> Self {
        let n = NonZeroU32::new(per_min.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            per_min: n.get(),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The configured budget per minute.
    pub fn per_min(&self) -> u32 {
        self.per_min
    }

    /// Spends one call of `ip`'s budget.
    pub fn check(&self, ip: Option<IpAddr>) -> Verdict {
        match self.limiter.check_key(&budget_key(ip)) {
            Ok(()) => Verdict::Allowed,
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Verdict::Throttled {
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u32,
                }
            }
        }
    }

    /// Counts one refused call in its (address, minute, outcome) group.
    pub fn aggregate(
        &self,
        ip: Option<IpAddr>,
        status: u16,
        code: Option<&'static str>,
        now: DateTime<Utc>,
    ) {
        let minute = usage::minute_bucket(now).timestamp();
        let Ok(mut groups) = self.groups.lock() else {
            return;
        };
        let mut group = Group {
            ip,
            minute,
            status,
            code,
        };
        if groups.len() >= MAX_GROUPS && !groups.contains_key(&group) {
            // Address spraying: further addresses share one group so memory stays bounded.
            group.ip = None;
        }
        *groups.entry(group).or_insert(0) += 1;
    }

    /// Takes the groups of minutes before `before` (all of them with `None`).
    fn take(&self, before: Option<i64>) -> Vec<(Group, i64)> {
        let Ok(mut groups) = self.groups.lock() else {
            return Vec::new();
        };
        match before {
            None => groups.drain().collect(),
            Some(t) => {
                let done: Vec<Group> = groups.keys().filter(|g| g.minute < t).cloned().collect();
                done.into_iter()
                    .filter_map(|g| groups.remove(&g).map(|n| (g, n)))
                    .collect()
            }
        }
    }

    /// Forgets addresses whose budget is full again.
    fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Calls counted and not yet written (for tests and gauges).
    pub fn pending_calls(&self) -> i64 {
        self.groups
            .lock()
            .map(|g| g.values().sum())
            .unwrap_or_default()
    }
}

async fn write(writes: &Writes, groups: Vec<(Group, i64)>) {
    for (g, count) in groups {
        let at = Utc
            .timestamp_opt(g.minute, 0)
            .single()
            .unwrap_or_else(Utc::now);
        let row = UsageRow {
            method: "*".into(),
            path: "/api/enterprise/*".into(),
            status: g.status,
            error_code: g.code.map(str::to_string),
            client_ip: g.ip.map(|i| i.to_string()),
            count,
            ..Default::default()
        };
        if let Err(e) = usage::record_through(writes, row, at).await {
            tracing::error!(error = %e, calls = count, "writing an aggregated usage row failed");
        }
    }
}

impl Strangers {
    /// Writes the groups of finished minutes: one row per (address, minute, outcome) and node.
    pub async fn flush_finished(&self, writes: &Writes) {
        let now = usage::minute_bucket(Utc::now()).timestamp();
        let groups = self.take(Some(now));
        write(writes, groups).await;
        self.forget_idle();
    }

    /// Writes every group (at shutdown).
    pub async fn flush_all(&self, writes: &Writes) {
        let groups = self.take(None);
        write(writes, groups).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_per_address_and_refuses_beyond_it() {
        let s = Strangers::new(3);
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(s.check(Some(a)), Verdict::Allowed);
        }
        assert!(matches!(s.check(Some(a)), Verdict::Throttled { retry_after } if retry_after >= 1));
        assert_eq!(
            s.check(Some(b)),
            Verdict::Allowed,
            "another address has its own budget"
        );
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_budget() {
        let s = Strangers::new(1);
        assert_eq!(
            s.check(Some("2001:db8:1:2::1".parse().unwrap())),
            Verdict::Allowed
        );
        assert!(matches!(
            s.check(Some("2001:db8:1:2:ffff::9".parse().unwrap())),
            Verdict::Throttled { .. }
        ));
        assert_eq!(
            s.check(Some("2001:db8:1:3::1".parse().unwrap())),
            Verdict::Allowed
        );
    }

    #[test]
    fn refused_calls_aggregate_per_address_minute_and_outcome() {
        let s = Strangers::new(1);
        let now = Utc::now();
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..5 {
            s.aggregate(Some(ip), 429, Some("RATE_LIMIT_EXCEEDED"), now);
        }
        s.aggregate(Some(ip), 413, Some("PAYLOAD_TOO_LARGE"), now);
        assert_eq!(s.pending_calls(), 6);
        let current = usage::minute_bucket(now).timestamp();
        assert!(
            s.take(Some(current)).is_empty(),
            "the current minute is still open"
        );
        let mut taken = s.take(None);
        taken.sort_by_key(|(_, n)| *n);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[1].1, 5);
        assert_eq!(s.pending_calls(), 0);
    }

    #[test]
    fn groups_stay_bounded_under_address_spraying() {
        let s = Strangers::new(1);
        let now = Utc::now();
        for i in 0..(MAX_GROUPS as u32 + 500) {
            s.aggregate(Some(IpAddr::V4(Ipv4Addr::from(i))), 429, None, now);
        }
        assert!(s.groups.lock().unwrap().len() <= MAX_GROUPS + 1);
        assert_eq!(s.pending_calls(), MAX_GROUPS as i64 + 500);
    }
}
