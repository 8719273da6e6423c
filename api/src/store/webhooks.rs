//! `webhook_delivery` (the outbox: one row per event and target) and `webhook_attempt` (one row
//! per send). A delivery is leased to one dispatcher by a single statement that counts its
//! attempt, so no two dispatchers, on any nodes, send the same attempt.
use chrono::{DateTime, Utc};
use entity::webhook_delivery::{Column, Entity, Model};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect,
};
use uuid::Uuid;

use super::sql::{limit, placeholders, skip_locked, stmt};
use crate::domain::ids::AccountId;

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
    /// Appends the delivery, due at once (held when its endpoint is disabled).
    pub async fn insert<C: ConnectionTrait>(
        &self,
        txn: &C,
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        txn.execute_raw(stmt(
            txn.get_database_backend(),
            "INSERT INTO webhook_delivery (id, api_key_id, batch_id, event_type, payload, target_url, status, \
             attempt_count, next_attempt_at, created_at, updated_at, held_at) \
             SELECT $1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $7, \
             (SELECT $7 FROM webhook_endpoint WHERE api_key_id = $2 AND url = $6 \
              AND disabled_at IS NOT NULL)",
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
         WHERE id IN (SELECT id FROM webhook_delivery WHERE status = 'pending' AND held_at IS NULL \
         AND next_attempt_at <= $1 \
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
    /// The failure's kind (`dns`, `connect`, `timeout`, `tls`, `refused_target`, `http`, ...).
    pub kind: Option<&'a str>,
    /// The first 1 KB of the answer.
    pub excerpt: Option<&'a str>,
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
        "INSERT INTO webhook_attempt (delivery_id, attempt, status_code, error, duration_ms, \
         created_at, error_kind, response_excerpt) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            d.id.into(),
            d.attempt_count.into(),
            a.status_code.map(i32::from).into(),
            a.error.map(str::to_string).into(),
            a.duration_ms.into(),
            now.into(),
            a.kind.map(str::to_string).into(),
            a.excerpt.map(str::to_string).into(),
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
            "SELECT COUNT(*) AS n FROM webhook_delivery WHERE status = 'pending' AND held_at IS NULL",
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

/// Deletes up to `max` endpoints nothing was sent to since `cutoff` (by their `updated_at`),
/// unless disabled (a disabled endpoint holds deliveries until it is enabled) or still the
/// target of a pending delivery: the rows endpoints a key stopped using leave behind.
pub async fn delete_idle_endpoints_older_than<C: ConnectionTrait>(
    db: &C,
    cutoff: DateTime<Utc>,
    max: u64,
) -> Result<u64, DbErr> {
    let sql = format!(
        "DELETE FROM webhook_endpoint WHERE (api_key_id, url) IN \
         (SELECT e.api_key_id, e.url FROM webhook_endpoint e \
          WHERE e.updated_at < $1 AND e.disabled_at IS NULL AND NOT EXISTS \
          (SELECT 1 FROM webhook_delivery d WHERE d.status = 'pending' \
           AND d.api_key_id = e.api_key_id AND d.target_url = e.url) {})",
        limit(max)
    );
    let r = db
        .execute_raw(stmt(db.get_database_backend(), &sql, [cutoff.into()]))
        .await?;
    Ok(r.rows_affected())
}

/// Notes an attempt's outcome on its endpoint (key and URL): a success ends a failing run; a
/// failure starts one or extends it. A run that began `disable_after` ago or earlier disables
/// the endpoint and holds its pending deliveries: true when this attempt disabled it.
pub async fn note_endpoint<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    url: &str,
    success: bool,
    now: DateTime<Utc>,
    disable_after: chrono::Duration,
) -> Result<bool, DbErr> {
    let backend = txn.get_database_backend();
    let sql = if success {
        "INSERT INTO webhook_endpoint (api_key_id, url, last_success_at, updated_at) \
         VALUES ($1, $2, $3, $3) ON CONFLICT (api_key_id, url) DO UPDATE SET \
         last_success_at = $3, failing_since = NULL, updated_at = $3"
    } else {
        "INSERT INTO webhook_endpoint (api_key_id, url, failing_since, last_failure_at, updated_at) \
         VALUES ($1, $2, $3, $3, $3) ON CONFLICT (api_key_id, url) DO UPDATE SET \
         last_failure_at = $3, updated_at = $3, \
         failing_since = COALESCE(webhook_endpoint.failing_since, $3)"
    };
    txn.execute_raw(stmt(backend, sql, [account.into(), url.into(), now.into()]))
        .await?;
    if success {
        return Ok(false);
    }
    let disabled = txn
        .execute_raw(stmt(
            backend,
            "UPDATE webhook_endpoint SET disabled_at = $3 WHERE api_key_id = $1 AND url = $2 \
             AND disabled_at IS NULL AND failing_since <= $4",
            [
                account.into(),
                url.into(),
                now.into(),
                (now - disable_after).into(),
            ],
        ))
        .await?
        .rows_affected()
        == 1;
    if disabled {
        txn.execute_raw(stmt(
            backend,
            "UPDATE webhook_delivery SET held_at = $3 WHERE api_key_id = $1 AND target_url = $2 \
             AND status = 'pending' AND held_at IS NULL",
            [account.into(), url.into(), now.into()],
        ))
        .await?;
    }
    Ok(disabled)
}

/// One endpoint a key sends to, as the dispatcher last saw it.
#[derive(Clone, Debug, FromQueryResult)]
pub struct Endpoint {
    pub url: String,
    pub failing_since: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
}

/// The endpoints a key has sent to, by URL.
pub async fn endpoints<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
) -> Result<Vec<Endpoint>, DbErr> {
    Endpoint::find_by_statement(stmt(
        db.get_database_backend(),
        "SELECT url, failing_since, last_success_at, last_failure_at, disabled_at \
         FROM webhook_endpoint WHERE api_key_id = $1 ORDER BY url",
        [account.into()],
    ))
    .all(db)
    .await
}

/// Enables a key's endpoint again and releases its held deliveries (due at once): the number
/// released, or None when the key never sent to that URL.
pub async fn enable_endpoint<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    url: &str,
    now: DateTime<Utc>,
) -> Result<Option<u64>, DbErr> {
    let backend = txn.get_database_backend();
    let found = txn
        .execute_raw(stmt(
            backend,
            "UPDATE webhook_endpoint SET disabled_at = NULL, failing_since = NULL, updated_at = $3 \
             WHERE api_key_id = $1 AND url = $2",
            [account.into(), url.into(), now.into()],
        ))
        .await?
        .rows_affected();
    if found == 0 {
        return Ok(None);
    }
    let released = txn
        .execute_raw(stmt(
            backend,
            "UPDATE webhook_delivery SET held_at = NULL, next_attempt_at = $3, updated_at = $3 \
             WHERE api_key_id = $1 AND target_url = $2 AND held_at IS NOT NULL",
            [account.into(), url.into(), now.into()],
        ))
        .await?
        .rows_affected();
    Ok(Some(released))
}

/// Endpoints disabled now (for the gauge).
pub async fn disabled_endpoints<C: ConnectionTrait>(db: &C) -> Result<i64, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM webhook_endpoint WHERE disabled_at IS NOT NULL",
            [],
        ))
        .await?
    {
        Some(r) => r.try_get("", "n"),
        None => Ok(0),
    }
}

/// What a customer's list of deliveries filters on.
#[derive(Clone, Debug, Default)]
pub struct DeliveryFilter<'a> {
    /// `pending` (not held), `held`, `succeeded` or `failed`.
    pub status: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub batch_id: Option<Uuid>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Older than this delivery (the cursor).
    pub before: Option<Uuid>,
}

/// Up to `max` of a key's deliveries, newest first, through the (api_key_id, id) index.
pub async fn page_of_key<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    f: &DeliveryFilter<'_>,
    max: u64,
) -> Result<Vec<Model>, DbErr> {
    let mut q = Entity::find().filter(Column::ApiKeyId.eq(account));
    match f.status {
        Some("held") => {
            q = q
                .filter(Column::Status.eq("pending"))
                .filter(Column::HeldAt.is_not_null())
        }
        Some("pending") => {
            q = q
                .filter(Column::Status.eq("pending"))
                .filter(Column::HeldAt.is_null())
        }
        Some(s) => q = q.filter(Column::Status.eq(s)),
        None => {}
    }
    if let Some(e) = f.event_type {
        q = q.filter(Column::EventType.eq(e));
    }
    if let Some(b) = f.batch_id {
        q = q.filter(Column::BatchId.eq(b));
    }
    if let Some(t) = f.since {
        q = q.filter(Column::CreatedAt.gte(t));
    }
    if let Some(c) = f.before {
        q = q.filter(Column::Id.lt(c));
    }
    q.order_by_desc(Column::Id).limit(max).all(db).await
}

/// The attempts of a delivery, in order.
pub async fn attempts_of<C: ConnectionTrait>(
    db: &C,
    delivery: Uuid,
) -> Result<Vec<entity::webhook_attempt::Model>, DbErr> {
    use entity::webhook_attempt as a;
    a::Entity::find()
        .filter(a::Column::DeliveryId.eq(delivery))
        .order_by_asc(a::Column::Id)
        .all(db)
        .await
}

/// Starts a new attempt series of a key's delivery for a customer's resend (same
/// `webhook-id`), recording its Idempotency-Key: false when the delivery is still pending or
/// held (an attempt is due or in flight already) or is not the key's.
pub async fn resend<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    id: Uuid,
    idempotency_key: Option<&str>,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let r = db
        .execute_raw(stmt(
            db.get_database_backend(),
            "UPDATE webhook_delivery SET status = 'pending', attempt_count = 0, next_attempt_at = $3, \
             updated_at = $3, resend_key = $4 \
             WHERE id = $1 AND api_key_id = $2 AND status <> 'pending'",
            [id.into(), account.into(), now.into(), idempotency_key.into()],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Sends again, once each, every delivery of the key that ended `failed` and was created at or
/// after `since`, oldest first (they are due in creation order), held when their endpoint is
/// disabled: how many. A delivery a recover sent once is not sent by another.
pub async fn recover<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let r = db
        .execute_raw(stmt(
            db.get_database_backend(),
            "UPDATE webhook_delivery SET status = 'pending', attempt_count = 0, \
             next_attempt_at = created_at, updated_at = $3, recovered_at = $3, \
             held_at = (SELECT $3 FROM webhook_endpoint e WHERE e.api_key_id = $1 \
               AND e.url = webhook_delivery.target_url AND e.disabled_at IS NOT NULL) \
             WHERE api_key_id = $1 AND status = 'failed' AND created_at >= $2 \
             AND recovered_at IS NULL",
            [account.into(), since.into(), now.into()],
        ))
        .await?;
    Ok(r.rows_affected())
}
