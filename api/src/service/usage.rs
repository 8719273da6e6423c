//! The usage audit of customer calls, and the per-day report of the usage API.
use chrono::{NaiveDate, TimeDelta};
use sea_orm::ConnectionTrait;

use crate::domain::ids::AccountId;
use crate::store::usage::daily;
pub use crate::store::usage::{DayUsage, UsageRow, minute_bucket, record_through};

/// An account's usage for the UTC days `from..=to` (default: the 30 days up to `today`), as served.
pub async fn report<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    today: NaiveDate,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<crate::schemas::credits::Usage, crate::error::ApiError> {
    use crate::error::ApiError;
    let parse = |field: &str, v: &str| {
        NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .map_err(|_| ApiError::validation(field, format!("{v:?} is not a date (YYYY-MM-DD)")))
    };
    let to_day = match to {
        Some(v) => parse("to", v)?,
        None => today,
    };
    let from_day = match from {
        Some(v) => parse("from", v)?,
        None => to_day - TimeDelta::days(29),
    };
    if from_day > to_day {
        return Err(ApiError::validation("from", "must not be after `to`"));
    }
    if to_day - from_day > TimeDelta::days(366) {
        return Err(ApiError::validation(
            "from",
            "the period may span at most 366 days",
        ));
    }
    let start = from_day.and_time(chrono::NaiveTime::MIN).and_utc();
    let end = to_day.and_time(chrono::NaiveTime::MIN).and_utc() + TimeDelta::days(1);
    let days = daily(db, account, start, end).await?;
    let per_key = crate::store::usage::per_key(db, account, start, end).await?;
    let ids: Vec<i64> = per_key.iter().map(|(id, _)| *id).collect();
    let names = crate::store::keys::names(db, &ids).await?;
    let mut keys: Vec<crate::schemas::credits::KeyUsage> = per_key
        .into_iter()
        .map(|(id, counts)| {
            let name = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
            crate::schemas::credits::KeyUsage::new(name, counts)
        })
        .collect();
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(crate::schemas::credits::Usage {
        from: start,
        to: end,
        days: days.into_iter().map(Into::into).collect(),
        keys,
    })
}
