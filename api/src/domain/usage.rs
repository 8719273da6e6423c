//! The audit of customer calls: one call as audited, and a day of an account's usage.
use chrono::NaiveDate;
use uuid::Uuid;

/// One customer call, as audited. Never holds a key or secret.
#[derive(Clone, Debug, Default)]
pub struct UsageRow {
    /// Authenticated key, if any.
    pub api_key_id: Option<i64>,
    /// The key's account (None with a key: found from the key when the row is written).
    pub account_id: Option<i64>,
    /// Which of the key's secrets was used: `current`, or `previous` during a rotation.
    pub key_version: Option<&'static str>,
    /// The call's request id.
    pub request_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// HTTP status.
    pub status: u16,
    /// Error code, if refused.
    pub error_code: Option<String>,
    /// Client address.
    pub client_ip: Option<String>,
    /// User-Agent header.
    pub user_agent: Option<String>,
    /// Microseconds spent.
    pub latency_us: i64,
    /// Batch touched.
    pub batch_id: Option<Uuid>,
    /// Items created.
    pub items: i32,
    /// Credits held.
    pub credits: i64,
    /// Calls the row stands for; 0 is read as 1 (aggregated rows carry more).
    pub count: i64,
}

/// Calls summed over a period (a day, or one key's share of a report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// All calls.
    pub calls: i64,
    /// 2xx calls.
    pub calls_2xx: i64,
    /// 4xx calls.
    pub calls_4xx: i64,
    /// 5xx calls.
    pub calls_5xx: i64,
    /// Calls refused by a rate limit.
    pub rate_limited: i64,
    /// Batches created.
    pub batches: i64,
    /// Items in created batches.
    pub items: i64,
}

/// One day of an account's usage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayUsage {
    /// UTC date.
    pub date: NaiveDate,
    /// The day's calls.
    pub counts: CallCounts,
    /// Credits charged for succeeded items.
    pub credits_charged: i64,
}
