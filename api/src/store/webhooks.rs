//! `webhook_delivery` (the outbox: one row per event and target) and `webhook_attempt` (one row
//! per send). A delivery is leased to one dispatcher by a single statement that counts its
//! attempt, so no two dispatchers, on any nodes, send the same attempt.
use chrono::{DateTime, Utc};
use entity::webhook_delivery::{Column, Entity, Model};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use super::sql::{limit, placeholders, skip_locked, stmt};

/// An event to deliver, written in the transaction of the change that causes it.
pub struct NewDelivery<'a> {
    pub key_id: i64,
    /// The batch the event is about (none for key events such as `credits.low`).
    pub batch_id: Option<Uuid>,
    pub event_type: &'a str,
    /// The signed body.
    pub payload: String,
    pub target_url: &'a str,
}

impl NewDelivery<'_> {
    /// Appends the delivery, due at once.
    pub async fn insert<C: ConnectionTrait>(
        &self,
        txn: &C,
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        txn.execute_raw(stmt(
            txn.get_database_backend(),
            "INSERT INTO webhook_delivery (id, api_key_id, batch_id, event_type, payload, target_url, status, \
             attempt_count, next_attempt_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $7)",
            [
                Uuid::now_v7().into(),
                self.key_id.into(),
                self.batch_id.into(),
                self.event_type.into(),
                self.payload.clone().into(),
                self.target_url.into(),
                now.into(),
            ],
        ))
        .await?;
        Ok(())
    }
}

/// Leases up to `max` due deliveries until `until`, counting their attempt, in one committed
/// statement (rows another dispatcher holds are skipped, and so are rows for `skip_targets`,
/// URLs the dispatcher cannot send to now, and of `skip_keys`, keys that have all they may
/// send now); returns them, attempt counted.
pub async fn lease_due(
    db: &DatabaseConnection,
    max: u64,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    skip_targets: &[String],
    skip_keys: &[i64],
) -> Result<Vec<Model>, DbErr> {
    let backend = db.get_database_backend();
    let mut skip = String::new();
    if !skip_targets.is_empty() {
        skip.push_str(&format!(
            "AND target_url NOT IN ({}) ",
            placeholders(3, skip_targets.len())
        ));
    }
    if !skip_keys.is_empty() {
        skip.push_str(&format!(
            "AND api_key_id NOT IN ({}) ",
            placeholders(3 + skip_targets.len(), skip_keys.len())
        ));
    }
    let sql = format!(
        "UPDATE webhook_delivery SET attempt_count = attempt_count + 1, locked_until = $2, updated_at = $1 \
         WHERE id IN (SELECT id FROM webhook_delivery WHERE status = 'pending' AND next_attempt_at <= $1 \
         AND (locked_until IS NULL OR locked_until < $1) {skip}ORDER BY next_attempt_at {}{}) \
         RETURNING id",
        limit(max),
        skip_locked(backend)
    );
    let mut values: Vec<sea_orm::Value> = vec![now.into(), until.into()];
    values.extend(skip_targets.iter().map(|t| t.as_str().into()));
    values.extend(skip_keys.iter().map(|k| (*k).into()));
    let txn = crate::db::begin_write(db).await?;
    let rows = txn.query_all_raw(stmt(backend, &sql, values)).await?;
    txn.commit().await?;
    let ids: Vec<Uuid> = rows
        .iter()
        .filter_map(|r| r.try_get("", "id").ok())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Entity::find().filter(Column::Id.is_in(ids)).all(db).await
}

/// What one send did.
#[derive(Clone, Debug)]
pub struct AttemptRow<'a> {
    pub status_code: Option<u16>,
    pub error: Option<&'a str>,
    pub duration_ms: i64,
}

/// The delivery's state after an attempt.
#[derive(Clone, Copy, Debug)]
pub struct Next {
    /// `pending` (retry due at `at`), `succeeded` or `failed`.
    pub status: &'static str,
    pub at: DateTime<Utc>,
}

/// Records the attempt `d` was leased for and the delivery's next state, unless the delivery
/// has been leased again since (its attempt count moved on).
pub async fn record_attempt<C: ConnectionTrait>(
    txn: &C,
    d: &Model,
    a: &AttemptRow<'_>,
    next: Next,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO webhook_attempt (delivery_id, attempt, status_code, error, duration_ms, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        [
            d.id.into(),
            d.attempt_count.into(),
            a.status_code.map(i32::from).into(),
            a.error.map(str::to_string).into(),
            a.duration_ms.into(),
            now.into(),
        ],
    ))
    .await?;
    txn.execute_raw(stmt(
        backend,
        "UPDATE webhook_delivery SET status = $2, next_attempt_at = $3, locked_until = NULL, \
         last_status_code = $4, last_error = $5, updated_at = $6, \
         delivered_at = CASE WHEN $2 = 'succeeded' THEN $6 ELSE delivered_at END \
         WHERE id = $1 AND attempt_count = $7",
        [
            d.id.into(),
            next.status.into(),
            next.at.into(),
            a.status_code.map(i32::from).into(),
            a.error.map(str::to_string).into(),
            now.into(),
            d.attempt_count.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Gives a leased delivery back without counting an attempt, due again at `at`.
pub async fn give_back<C: ConnectionTrait>(
    db: &C,
    d: &Model,
    at: DateTime<Utc>,
) -> Result<(), DbErr> {
    db.execute_raw(stmt(
        db.get_database_backend(),
        "UPDATE webhook_delivery SET attempt_count = attempt_count - 1, locked_until = NULL, \
         next_attempt_at = $2 WHERE id = $1 AND attempt_count = $3",
        [d.id.into(), at.into(), d.attempt_count.into()],
    ))
    .await?;
    Ok(())
}

/// Starts a new attempt series of a delivery (same `webhook-id`): false when there is none.
/// `locked_until` is kept: an attempt in flight finishes (and its lease ends) before the
/// delivery is leased again, so it is never sent twice at once.
pub async fn restart<C: ConnectionTrait>(
    db: &C,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let r = db
        .execute_raw(stmt(
            db.get_database_backend(),
            "UPDATE webhook_delivery SET status = 'pending', attempt_count = 0, next_attempt_at = $2, \
             updated_at = $2 WHERE id = $1",
            [id.into(), now.into()],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// A delivery by id.
pub async fn by_id<C: ConnectionTrait>(db: &C, id: Uuid) -> Result<Option<Model>, DbErr> {
    Entity::find_by_id(id).one(db).await
}

/// Up to `max` deliveries, newest first, optionally of one status and key.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    status: Option<&str>,
    key_id: Option<i64>,
    max: u64,
) -> Result<Vec<Model>, DbErr> {
    let mut q = Entity::find();
    if let Some(s) = status {
        q = q.filter(Column::Status.eq(s));
    }
    if let Some(k) = key_id {
        q = q.filter(Column::ApiKeyId.eq(k));
    }
    q.order_by_desc(Column::CreatedAt).limit(max).all(db).await
}

/// Deliveries still pending (for the backlog gauge).
pub async fn pending_count<C: ConnectionTrait>(db: &C) -> Result<i64, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM webhook_delivery WHERE status = 'pending'",
            [],
        ))
        .await?
    {
        Some(r) => r.try_get("", "n"),
        None => Ok(0),
    }
}

/// Deletes up to `max` finished deliveries created before `cutoff` (their attempts go with
/// them): how many.
pub async fn delete_finished_older_than<C: ConnectionTrait>(
    db: &C,
    cutoff: DateTime<Utc>,
    max: u64,
) -> Result<u64, DbErr> {
    let sql = format!(
        "DELETE FROM webhook_delivery WHERE id IN \
         (SELECT id FROM webhook_delivery WHERE status <> 'pending' AND created_at < $1 {})",
        limit(max)
    );
    let r = db
        .execute_raw(stmt(db.get_database_backend(), &sql, [cutoff.into()]))
        .await?;
    Ok(r.rows_affected())
}
