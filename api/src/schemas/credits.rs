//! Bodies of the credits and usage endpoints.
use chrono::{DateTime, Utc};
use poem_openapi::Object;
use uuid::Uuid;

/// One ledger row.
#[derive(Object, Clone, Debug)]
pub struct LedgerEntry {
    /// Row id (increasing).
    pub id: i64,
    /// grant, hold, charge, release or adjust.
    pub kind: String,
    /// Credits moved (adjust may be negative).
    pub amount: i64,
    /// Batch concerned.
    #[oai(nullable)]
    pub batch_id: Option<Uuid>,
    /// Item concerned.
    #[oai(nullable)]
    pub item_id: Option<Uuid>,
    /// Free text.
    #[oai(nullable)]
    pub note: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

impl From<entity::credit_ledger::Model> for LedgerEntry {
    fn from(m: entity::credit_ledger::Model) -> Self {
        Self {
            id: m.id,
            kind: m.kind.as_str().to_string(),
            amount: m.amount,
            batch_id: m.batch_id,
            item_id: m.item_id,
            note: m.note,
            created_at: m.created_at,
        }
    }
}

/// A wallet and its latest movements.
#[derive(Object, Clone, Debug)]
pub struct Credits {
    /// Credits owned.
    pub balance: i64,
    /// Credits reserved by unfinished batches.
    pub held: i64,
    /// `balance - held`.
    pub available: i64,
    /// Latest ledger rows, newest first.
    pub ledger: Vec<LedgerEntry>,
}

/// One day of usage.
#[derive(Object, Clone, Debug)]
pub struct UsageDay {
    /// UTC date, `YYYY-MM-DD`.
    pub date: String,
    /// All calls.
    pub calls: i64,
    /// Calls answered 2xx.
    pub calls_2xx: i64,
    /// Calls answered 4xx.
    pub calls_4xx: i64,
    /// Calls answered 5xx.
    pub calls_5xx: i64,
    /// Calls refused by the rate limit.
    pub rate_limited: i64,
    /// Batches created.
    pub batches: i64,
    /// Items in created batches.
    pub items: i64,
    /// Credits charged for succeeded items.
    pub credits_charged: i64,
}

impl From<crate::domain::usage::DayUsage> for UsageDay {
    fn from(d: crate::domain::usage::DayUsage) -> Self {
        let c = d.counts;
        Self {
            date: d.date.format("%Y-%m-%d").to_string(),
            calls: c.calls,
            calls_2xx: c.calls_2xx,
            calls_4xx: c.calls_4xx,
            calls_5xx: c.calls_5xx,
            rate_limited: c.rate_limited,
            batches: c.batches,
            items: c.items,
            credits_charged: d.credits_charged,
        }
    }
}

/// Usage over a period.
#[derive(Object, Clone, Debug)]
pub struct Usage {
    /// Start (inclusive).
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Days with activity, oldest first: the account's calls through all its keys.
    pub days: Vec<UsageDay>,
    /// The period's calls per key of the account (keys with calls in it), by key name.
    pub keys: Vec<KeyUsage>,
}

/// One key's calls over a usage report's period.
#[derive(Object, Clone, Debug)]
pub struct KeyUsage {
    /// Key name.
    pub key: String,
    /// All calls.
    pub calls: i64,
    /// Calls answered 2xx.
    pub calls_2xx: i64,
    /// Calls answered 4xx.
    pub calls_4xx: i64,
    /// Calls answered 5xx.
    pub calls_5xx: i64,
    /// Calls refused by a rate limit.
    pub rate_limited: i64,
    /// Batches created.
    pub batches: i64,
    /// Items in created batches.
    pub items: i64,
}

impl KeyUsage {
    /// The calls of the key named `key` over a report's period.
    pub fn new(key: String, c: crate::domain::usage::CallCounts) -> Self {
        Self {
            key,
            calls: c.calls,
            calls_2xx: c.calls_2xx,
            calls_4xx: c.calls_4xx,
            calls_5xx: c.calls_5xx,
            rate_limited: c.rate_limited,
            batches: c.batches,
            items: c.items,
        }
    }
}
