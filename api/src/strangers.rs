//! Calls refused before any work: those that carry no valid key ("strangers"), and a valid
//! key's calls refused for their client address (its IP allowlist), for its scopes, or before
//! routing (body too large or too slow). Each (key or none, client address) gets a small
//! budget per minute, kept in this node's memory. Within it, calls are answered and audited one
//! row each; beyond it they are refused with 429 at no database cost, and their audit is
//! aggregated into one row per (key, address, minute, outcome) written in the background.
//! "Now" is the application's clock, so tests that freeze it count exactly.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::clock::Clock;
use crate::store::commit::Writes;
use crate::store::usage::{self, UsageRow};

/// Distinct (key, address, minute, outcome) groups kept before further addresses share one
/// group.
const MAX_GROUPS: usize = 10_000;

/// What to do with a call refused before any work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the budget: answer and audit it as usual.
    Allowed,
    /// Over budget: refuse with 429; retry after this many seconds.
    Throttled {
        /// Seconds until the caller may try again.
        retry_after: u32,
    },
}

/// Whose budget a call spends: a key (none for strangers) at a client network.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Budget {
    key_id: Option<i64>,
    net: IpAddr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Group {
    key_id: Option<i64>,
    ip: Option<IpAddr>,
    minute: i64,
    status: u16,
    code: Option<&'static str>,
}

/// The application's clock as the rate limiter reads it: time since the Unix epoch.
#[derive(Clone, Debug)]
struct LimiterClock(Clock);

impl governor::clock::Clock for LimiterClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        let t = self.0.now();
        Duration::new(t.timestamp().max(0) as u64, t.timestamp_subsec_nanos())
    }
}

type Limiter =
    RateLimiter<Budget, HashMapStateStore<Budget>, LimiterClock, NoOpMiddleware<Duration>>;

/// A per-(key, address) budget of refused calls and the aggregated audit of those beyond it.
pub struct Throttle {
    limiter: Limiter,
    clock: LimiterClock,
    per_min: u32,
    groups: Mutex<HashMap<Group, i64>>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("per_min", &self.per_min)
            .finish_non_exhaustive()
    }
}

/// The budget is shared by an IPv6 /64 (one subscriber's network), by an IPv4 address, and by
/// all calls whose address is unknown.
fn budget_net(ip: Option<IpAddr>) -> IpAddr {
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

impl Throttle {
    /// A budget of `per_min` calls per (key, address) and minute (as a burst, refilled
    /// evenly), timed by `clock`.
    pub fn new(per_min: u32, clock: Clock) -> Self {
        let n = NonZeroU32::new(per_min.max(1)).unwrap_or(NonZeroU32::MIN);
        let clock = LimiterClock(clock);
        Self {
            limiter: RateLimiter::new(
                Quota::per_minute(n),
                HashMapStateStore::default(),
                clock.clone(),
            ),
            clock,
            per_min: n.get(),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The configured budget per minute.
    pub fn per_min(&self) -> u32 {
        self.per_min
    }

    /// Spends one call of the budget of `key_id` (none for strangers) at `ip`.
    pub fn check(&self, key_id: Option<i64>, ip: Option<IpAddr>) -> Verdict {
        let budget = Budget {
            key_id,
            net: budget_net(ip),
        };
        match self.limiter.check_key(&budget) {
            Ok(()) => Verdict::Allowed,
            Err(not_until) => {
                use governor::clock::Clock as _;
                let wait = not_until.wait_time_from(self.clock.now());
                Verdict::Throttled {
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u32,
                }
            }
        }
    }

    /// Counts one refused call in its (key, address, minute, outcome) group.
    pub fn aggregate(
        &self,
        key_id: Option<i64>,
        ip: Option<IpAddr>,
        status: u16,
        code: Option<&'static str>,
    ) {
        let minute = usage::minute_bucket(self.clock.0.now()).timestamp();
        let Ok(mut groups) = self.groups.lock() else {
            return;
        };
        let mut group = Group {
            key_id,
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

    /// Forgets budgets that are full again.
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
            api_key_id: g.key_id,
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

impl Throttle {
    /// Writes the groups of finished minutes: one row per (key, address, minute, outcome) and
    /// node.
    pub async fn flush_finished(&self, writes: &Writes) {
        let now = usage::minute_bucket(self.clock.0.now()).timestamp();
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

    /// A throttle of `per_min` on a clock frozen at a fixed time, and that clock.
    fn frozen(per_min: u32) -> (Throttle, Clock, chrono::DateTime<Utc>) {
        let clock = Clock::default();
        let at = Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap();
        clock.freeze(at);
        (Throttle::new(per_min, clock.clone()), clock, at)
    }

    #[test]
    fn budget_is_per_address_and_refills_with_the_application_clock() {
        let (s, clock, at) = frozen(3);
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(s.check(None, Some(a)), Verdict::Allowed);
        }
        // 3 per minute: one more every 20 s, whatever the wall clock does meanwhile.
        for _ in 0..100 {
            assert_eq!(
                s.check(None, Some(a)),
                Verdict::Throttled { retry_after: 20 }
            );
        }
        assert_eq!(
            s.check(None, Some(b)),
            Verdict::Allowed,
            "another address has its own budget"
        );
        clock.freeze(at + chrono::Duration::seconds(19));
        assert_eq!(
            s.check(None, Some(a)),
            Verdict::Throttled { retry_after: 1 }
        );
        clock.freeze(at + chrono::Duration::seconds(20));
        assert_eq!(s.check(None, Some(a)), Verdict::Allowed);
        assert!(matches!(s.check(None, Some(a)), Verdict::Throttled { .. }));
    }

    #[test]
    fn each_key_has_its_own_budget_per_address() {
        let (s, _, _) = frozen(1);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(s.check(Some(1), Some(ip)), Verdict::Allowed);
        assert!(matches!(
            s.check(Some(1), Some(ip)),
            Verdict::Throttled { .. }
        ));
        assert_eq!(s.check(Some(2), Some(ip)), Verdict::Allowed, "another key");
        assert_eq!(s.check(None, Some(ip)), Verdict::Allowed, "no key");
        assert_eq!(
            s.check(Some(1), Some(other)),
            Verdict::Allowed,
            "the same key from another address"
        );
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_budget() {
        let (s, _, _) = frozen(1);
        assert_eq!(
            s.check(None, Some("2001:db8:1:2::1".parse().unwrap())),
            Verdict::Allowed
        );
        assert!(matches!(
            s.check(None, Some("2001:db8:1:2:ffff::9".parse().unwrap())),
            Verdict::Throttled { .. }
        ));
        assert_eq!(
            s.check(None, Some("2001:db8:1:3::1".parse().unwrap())),
            Verdict::Allowed
        );
    }

    #[test]
    fn refused_calls_aggregate_per_key_address_minute_and_outcome() {
        let (s, clock, at) = frozen(1);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..5 {
            s.aggregate(None, Some(ip), 429, Some("RATE_LIMIT_EXCEEDED"));
        }
        s.aggregate(None, Some(ip), 413, Some("PAYLOAD_TOO_LARGE"));
        s.aggregate(Some(7), Some(ip), 429, Some("RATE_LIMIT_EXCEEDED"));
        assert_eq!(s.pending_calls(), 7);
        let current = usage::minute_bucket(at).timestamp();
        assert!(
            s.take(Some(current)).is_empty(),
            "the current minute is still open"
        );
        // The next minute's calls are a group of their own.
        clock.freeze(at + chrono::Duration::seconds(60));
        s.aggregate(None, Some(ip), 429, Some("RATE_LIMIT_EXCEEDED"));
        let mut finished = s.take(Some(current + 60));
        finished.sort_by_key(|(_, n)| *n);
        assert_eq!(finished.len(), 3);
        assert_eq!(
            finished.iter().map(|(_, n)| n).collect::<Vec<_>>(),
            [&1, &1, &5]
        );
        assert!(finished.iter().any(|(g, _)| g.key_id == Some(7)));
        assert_eq!(s.pending_calls(), 1);
        assert_eq!(s.take(None).len(), 1);
        assert_eq!(s.pending_calls(), 0);
    }

    #[test]
    fn groups_stay_bounded_under_address_spraying() {
        let (s, _, _) = frozen(1);
        for i in 0..(MAX_GROUPS as u32 + 500) {
            s.aggregate(None, Some(IpAddr::V4(Ipv4Addr::from(i))), 429, None);
        }
        assert!(s.groups.lock().unwrap().len() <= MAX_GROUPS + 1);
        assert_eq!(s.pending_calls(), MAX_GROUPS as i64 + 500);
    }
}
