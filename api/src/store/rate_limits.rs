//! `rate_limit_window`: calls counted per key, scope and fixed one-minute window.
use sea_orm::{ConnectionTrait, DbErr};

use super::sql::stmt;

/// Counts one call in a window in one atomic statement (an upsert): the count after it.
/// Exact under any concurrency and on any number of nodes.
pub async fn increment<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    scope: &str,
    window_start: i64,
) -> Result<i64, DbErr> {
    db.query_one_raw(stmt(
        db.get_database_backend(),
        "INSERT INTO rate_limit_window (api_key_id, scope, window_start, count) VALUES ($1, $2, $3, 1) \
         ON CONFLICT (api_key_id, scope, window_start) \
         DO UPDATE SET count = rate_limit_window.count + 1 RETURNING count",
        [key_id.into(), scope.into(), window_start.into()],
    ))
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("rate_limit_window".into()))?
    .try_get("", "count")
}

/// Calls counted so far in a window.
pub async fn count<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    scope: &str,
    window_start: i64,
) -> Result<i64, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT count FROM rate_limit_window WHERE api_key_id = $1 AND scope = $2 AND window_start = $3",
            [key_id.into(), scope.into(), window_start.into()],
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
