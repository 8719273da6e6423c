//! `rate_limit_window`: calls counted per account (or per key, for a key's own tighter limit),
//! scope and fixed one-minute window.
use sea_orm::{ConnectionTrait, DbErr};

use super::sql::{stmt, value_rows};
use crate::domain::ids::AccountId;

/// Counts one call in a window in one atomic statement (an upsert): the count after it.
/// Exact under any concurrency and on any number of nodes.
pub async fn increment<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    scope: &str,
    window_start: i64,
) -> Result<i64, DbErr> {
    let counts = add_many(db, &[(account.0, scope, window_start, 1)]).await?;
    counts
        .into_iter()
        .next()
        .ok_or_else(|| DbErr::RecordNotFound("rate_limit_window".into()))
}

/// Adds `n` calls to each listed window `(key, scope, window_start, n)` in one atomic
/// statement (a multi-row upsert) and returns each window's count after it, in the order
/// given. Windows must be distinct. Rows are locked in the order given, so callers list them
/// in one fixed order (by key id) and concurrent transactions cannot deadlock on them.
pub async fn add_many<C: ConnectionTrait>(
    db: &C,
    windows: &[(i64, &str, i64, i64)],
) -> Result<Vec<i64>, DbErr> {
    if windows.is_empty() {
        return Ok(Vec::new());
    }
    let rows = value_rows(db.get_database_backend(), windows.len(), 4);
    let sql = format!(
        "INSERT INTO rate_limit_window (api_key_id, scope, window_start, count) VALUES {rows} \
         ON CONFLICT (api_key_id, scope, window_start) \
         DO UPDATE SET count = rate_limit_window.count + excluded.count \
         RETURNING api_key_id, scope, window_start, count"
    );
    let values = windows
        .iter()
        .flat_map(|&(key, scope, start, n)| [key.into(), scope.into(), start.into(), n.into()]);
    let returned = db
        .query_all_raw(stmt(db.get_database_backend(), &sql, values))
        .await?;
    let mut after = std::collections::HashMap::with_capacity(returned.len());
    for r in returned {
        let id: (i64, String, i64) = (
            r.try_get("", "api_key_id")?,
            r.try_get("", "scope")?,
            r.try_get("", "window_start")?,
        );
        after.insert(id, r.try_get::<i64>("", "count")?);
    }
    windows
        .iter()
        .map(|&(key, scope, start, _)| {
            after
                .get(&(key, scope.to_string(), start))
                .copied()
                .ok_or_else(|| DbErr::RecordNotFound("rate_limit_window".into()))
        })
        .collect()
}

/// Calls counted so far in a window.
pub async fn count<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    scope: &str,
    window_start: i64,
) -> Result<i64, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT count FROM rate_limit_window WHERE api_key_id = $1 AND scope = $2 AND window_start = $3",
            [account.into(), scope.into(), window_start.into()],
        ))
        .await?
    {
        Some(r) => r.try_get("", "count"),
        None => Ok(0),
    }
}

/// Deletes windows that started before `window_start`: how many.
pub async fn delete_before<C: ConnectionTrait>(db: &C, window_start: i64) -> Result<u64, DbErr> {
    let r = db
        .execute_raw(stmt(
            db.get_database_backend(),
            "DELETE FROM rate_limit_window WHERE window_start < $1",
            [window_start.into()],
        ))
        .await?;
    Ok(r.rows_affected())
}
