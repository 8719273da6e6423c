//! `batch_item`: one prompt of a batch, queued in fair order and claimed by workers under a
//! lease. Every transition of an item is one conditional statement on its status (and lease
//! token), so a stale report matches no row and changes nothing; the statement returns the
//! batches of the rows it moved, and their counts on the batch rows move with them in the same
//! transaction (`counts::shift_open`).
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use entity::batch_item::{ActiveModel, Entity, Model};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, FromQueryResult, Set};
use uuid::Uuid;

use super::sql::{limit, part_of, run_together, skip_locked, stmt};
use crate::domain::NewItem;
use crate::domain::ids::{AccountId, ItemId, LeaseToken};

/// The columns of an item that its view shows: a status poll reads these, no more.
#[derive(Clone, Debug, FromQueryResult)]
pub struct Visible {
    pub id: Uuid,
    pub idx: i32,
    pub prompt: String,
    pub params: Option<String>,
    pub status: entity::status::ItemState,
    pub attempts: i32,
    pub result_url: Option<String>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub source_idx: Option<i32>,
}

/// The columns of [`Visible`], in its order.
pub(super) const VISIBLE: [&str; 11] = [
    "id",
    "idx",
    "prompt",
    "params",
    "status",
    "attempts",
    "result_url",
    "result",
    "error",
    "error_code",
    "source_idx",
];

impl From<&Model> for Visible {
    fn from(m: &Model) -> Self {
        Visible {
            id: m.id,
            idx: m.idx,
            prompt: m.prompt.clone(),
            params: m.params.clone(),
            status: m.status,
            attempts: m.attempts,
            result_url: m.result_url.clone(),
            result: m.result.clone(),
            error: m.error.clone(),
            error_code: m.error_code.clone(),
            source_idx: m.source_idx,
        }
    }
}

/// Where a key's new batch starts in the fair queue: right after the key's own queued items,
/// but never before the queue's head, so a key's backlog cannot delay another key's batch.
pub async fn fair_start<C: ConnectionTrait>(txn: &C, account: AccountId) -> Result<i64, DbErr> {
    let row = txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "SELECT (SELECT MIN(fair_pos) FROM batch_item WHERE status = 'queued') AS head, \
             (SELECT MAX(fair_pos) FROM batch_item WHERE status = 'queued' AND api_key_id = $1) AS tail",
            [account.into()],
        ))
        .await?;
    let (head, tail) = match row {
        Some(r) => (
            r.try_get::<Option<i64>>("", "head")?.unwrap_or(0),
            r.try_get::<Option<i64>>("", "tail")?,
        ),
        None => (0, None),
    };
    Ok(tail.map_or(head, |t| (t + 1).max(head)))
}

/// Rows per multi-row insert.
const INSERT_CHUNK: usize = 500;

/// Queues a new batch's items at fair positions `start_pos..`.
pub async fn insert_queued<C: ConnectionTrait>(
    txn: &C,
    batch_id: Uuid,
    account: AccountId,
    start_pos: i64,
    items: &[NewItem],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let rows: Vec<ActiveModel> = items
        .iter()
        .enumerate()
        .map(|(i, item)| ActiveModel {
            id: Set(Uuid::now_v7()),
            batch_id: Set(batch_id),
            api_key_id: Set(account.0),
            idx: Set(i as i32),
            prompt: Set(item.prompt.clone()),
            params: Set(item.params.clone()),
            status: Set(entity::status::ItemState::Queued),
            attempts: Set(0),
            fair_pos: Set(start_pos + i as i64),
            lease_token: Set(None),
            worker_id: Set(None),
            lease_expires_at: Set(None),
            result_url: Set(None),
            result: Set(None),
            error: Set(None),
            error_code: Set(None),
            source_idx: Set(item.source_idx),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .collect();
    for chunk in rows.chunks(INSERT_CHUNK) {
        Entity::insert_many(chunk.to_vec()).exec(txn).await?;
    }
    Ok(())
}

/// An item as a claim leases it.
#[derive(Clone, Debug)]
pub struct Leased {
    pub id: Uuid,
    pub batch_id: Uuid,
    pub prompt: String,
    pub params: Option<String>,
    pub attempts: i32,
    pub fair_pos: i64,
}

/// A lease handed to a worker.
#[derive(Clone, Copy, Debug)]
pub struct Lease<'a> {
    pub token: Uuid,
    pub worker_id: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// A claim of up to `max` queued items, head of the fair queue first, in one call on SQLite
/// (see [`run_together`]): running items whose lease ended go back to the queue first (when
/// attempts remain and their batch has no cancel request), then the items are leased, then
/// their batches that were still queued are marked `processing`. Item rows another transaction
/// holds are skipped (a batch row so held is marked by that transaction itself: see
/// `jobs::lock_of_item`). A second call then moves the open counts of the batches touched
/// (`counts::shift_open`): on PostgreSQL that update waits for a batch row another transaction
/// holds, so a claim can meet a deadlock (with a cancel of the same batch, say), which the
/// write pipeline rolls back and runs again.
pub async fn claim<C: ConnectionTrait>(
    txn: &C,
    lease: Lease<'_>,
    max: u64,
    max_attempts: i32,
    now: DateTime<Utc>,
) -> Result<Vec<Leased>, DbErr> {
    let backend = txn.get_database_backend();
    let skip = skip_locked(backend);
    // $1 now, $2 max attempts, $3 token, $4 worker, $5 lease end.
    let lease_sql = format!(
        "UPDATE batch_item SET status = 'running', attempts = attempts + 1, lease_token = $3, \
         worker_id = $4, lease_expires_at = $5, updated_at = $1 \
         WHERE id IN (SELECT id FROM batch_item WHERE status = 'queued' \
         ORDER BY fair_pos, created_at {}{skip}) \
         RETURNING 'item' AS part, id, batch_id, prompt, params, attempts, fair_pos",
        limit(max),
    );
    // The claim's items are found again by their lease, through the index of running items.
    let mark_sql = format!(
        "UPDATE batch_job SET status = 'processing', updated_at = $1 WHERE id IN \
         (SELECT id FROM batch_job WHERE status = 'queued' AND id IN \
         (SELECT batch_id FROM batch_item WHERE status = 'running' AND lease_expires_at = $5 \
         AND lease_token = $3){skip})"
    );
    let rows = run_together(
        txn,
        &[&requeue_sql(backend), &lease_sql, &mark_sql],
        vec![
            now.into(),
            max_attempts.into(),
            lease.token.into(),
            lease.worker_id.into(),
            lease.expires_at.into(),
        ],
    )
    .await?;
    let mut shifts = BTreeMap::new();
    let mut out = Vec::new();
    for r in rows {
        match part_of(&r).as_deref() {
            Some("requeued") => requeued(&mut shifts, r.try_get("", "batch_id")?),
            Some("item") => {
                let item = leased(r)?;
                leased_from_queue(&mut shifts, item.batch_id);
                out.push(item);
            }
            _ => {}
        }
    }
    super::counts::shift_open(txn, &shifts).await?;
    Ok(out)
}

/// Counts one item of `batch` moved from `running` back to `queued`.
fn requeued(shifts: &mut BTreeMap<Uuid, (i32, i32)>, batch: Uuid) {
    let s = shifts.entry(batch).or_default();
    s.0 += 1;
    s.1 -= 1;
}

/// Counts one item of `batch` moved from `queued` to `running`.
fn leased_from_queue(shifts: &mut BTreeMap<Uuid, (i32, i32)>, batch: Uuid) {
    let s = shifts.entry(batch).or_default();
    s.0 -= 1;
    s.1 += 1;
}

/// Running items of each of the accounts `keys` (through the partial index of running items per
/// account).
pub async fn running_counts<C: ConnectionTrait>(
    txn: &C,
    keys: &[i64],
) -> Result<std::collections::HashMap<i64, i64>, DbErr> {
    if keys.is_empty() {
        return Ok(Default::default());
    }
    let backend = txn.get_database_backend();
    let sql = format!(
        "SELECT api_key_id, COUNT(*) AS n FROM batch_item WHERE status = 'running' \
         AND api_key_id IN ({}) GROUP BY api_key_id",
        super::sql::id_list(keys)
    );
    txn.query_all_raw(stmt(backend, &sql, []))
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get("", "api_key_id")?, r.try_get("", "n")?)))
        .collect()
}

/// The head of the fair queue without the items of `exclude` (no lock: candidates for
/// [`lease_ids`]), as (item, key).
pub async fn queued_head<C: ConnectionTrait>(
    txn: &C,
    exclude: &[i64],
    max: u64,
) -> Result<Vec<(Uuid, i64)>, DbErr> {
    let backend = txn.get_database_backend();
    let filter = if exclude.is_empty() {
        String::new()
    } else {
        format!(" AND api_key_id NOT IN ({})", super::sql::id_list(exclude))
    };
    let sql = format!(
        "SELECT id, api_key_id FROM batch_item WHERE status = 'queued'{filter} \
         ORDER BY fair_pos, created_at {}",
        limit(max)
    );
    txn.query_all_raw(stmt(backend, &sql, []))
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get("", "id")?, r.try_get("", "api_key_id")?)))
        .collect()
}

/// Leases the items of `ids` that are still queued and that no other transaction holds.
pub async fn lease_ids<C: ConnectionTrait>(
    txn: &C,
    lease: Lease<'_>,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<Vec<Leased>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let backend = txn.get_database_backend();
    let marks = super::sql::placeholders(5, ids.len());
    let sql = format!(
        "UPDATE batch_item SET status = 'running', attempts = attempts + 1, lease_token = $1, \
         worker_id = $2, lease_expires_at = $3, updated_at = $4 \
         WHERE id IN (SELECT id FROM batch_item WHERE id IN ({marks}) AND status = 'queued'{}) \
         RETURNING id, batch_id, prompt, params, attempts, fair_pos",
        skip_locked(backend)
    );
    let mut values: Vec<sea_orm::Value> = vec![
        lease.token.into(),
        lease.worker_id.into(),
        lease.expires_at.into(),
        now.into(),
    ];
    values.extend(ids.iter().map(|id| (*id).into()));
    let got = txn
        .query_all_raw(stmt(backend, &sql, values))
        .await?
        .into_iter()
        .map(leased)
        .collect::<Result<Vec<_>, _>>()?;
    let mut shifts = BTreeMap::new();
    for item in &got {
        leased_from_queue(&mut shifts, item.batch_id);
    }
    super::counts::shift_open(txn, &shifts).await?;
    Ok(got)
}

fn leased(r: sea_orm::QueryResult) -> Result<Leased, DbErr> {
    Ok(Leased {
        id: r.try_get("", "id")?,
        batch_id: r.try_get("", "batch_id")?,
        prompt: r.try_get("", "prompt")?,
        params: r.try_get("", "params")?,
        attempts: r.try_get("", "attempts")?,
        fair_pos: r.try_get("", "fair_pos")?,
    })
}

/// Puts running items whose lease ended before `now` back in the queue when attempts remain
/// and their batch has no cancel request (rows another transaction holds are skipped: the
/// next pass takes them). Returns how many.
pub async fn requeue_expired<C: ConnectionTrait>(
    db: &C,
    now: DateTime<Utc>,
    max_attempts: i32,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            &requeue_sql(backend),
            [now.into(), max_attempts.into()],
        ))
        .await?;
    let mut shifts = BTreeMap::new();
    for r in &rows {
        requeued(&mut shifts, r.try_get("", "batch_id")?);
    }
    super::counts::shift_open(db, &shifts).await?;
    Ok(rows.len() as u64)
}

/// The statement of [`requeue_expired`]: `$1` now, `$2` max attempts; returns the batch of
/// each requeued item.
fn requeue_sql(backend: sea_orm::DbBackend) -> String {
    format!(
        "UPDATE batch_item SET status = 'queued', lease_token = NULL, worker_id = NULL, \
         lease_expires_at = NULL, error = 'lease expired', error_code = 'worker_lost', \
         updated_at = $1 \
         WHERE id IN (SELECT id FROM batch_item WHERE status = 'running' AND lease_expires_at < $1 \
         AND attempts < $2 \
         AND batch_id NOT IN (SELECT id FROM batch_job WHERE cancel_requested_at IS NOT NULL){}) \
         RETURNING 'requeued' AS part, batch_id",
        skip_locked(backend)
    )
}

/// A running item whose lease has ended.
#[derive(Clone, Copy, Debug)]
pub struct Expired {
    pub id: Uuid,
    pub key_id: i64,
    pub token: Option<Uuid>,
}

/// Up to `max` running items whose lease ended before `now`.
pub async fn expired_leases<C: ConnectionTrait>(
    db: &C,
    now: DateTime<Utc>,
    max: u64,
) -> Result<Vec<Expired>, DbErr> {
    let rows = db
        .query_all_raw(stmt(
            db.get_database_backend(),
            &format!(
                "SELECT id, api_key_id, lease_token FROM batch_item \
                 WHERE status = 'running' AND lease_expires_at < $1 {}",
                limit(max)
            ),
            [now.into()],
        ))
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Expired {
                id: r.try_get("", "id")?,
                key_id: r.try_get("", "api_key_id")?,
                token: r.try_get("", "lease_token")?,
            })
        })
        .collect()
}

/// The key an item belongs to, if the item exists.
pub async fn key_of<C: ConnectionTrait>(db: &C, id: Uuid) -> Result<Option<i64>, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT api_key_id FROM batch_item WHERE id = $1",
            [id.into()],
        ))
        .await?
    {
        Some(r) => Ok(Some(r.try_get("", "api_key_id")?)),
        None => Ok(None),
    }
}

/// Moves a live lease's end to `expires_at`: the item's batch and attempts when the token
/// still holds the lease at `now`.
pub async fn extend_lease<C: ConnectionTrait>(
    txn: &C,
    id: ItemId,
    token: LeaseToken,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Option<(Uuid, i32)>, DbErr> {
    match txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_item SET lease_expires_at = $3, updated_at = $4 \
             WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at >= $4 \
             RETURNING batch_id, attempts",
            [id.into(), token.into(), expires_at.into(), now.into()],
        ))
        .await?
    {
        Some(r) => Ok(Some((
            r.try_get("", "batch_id")?,
            r.try_get("", "attempts")?,
        ))),
        None => Ok(None),
    }
}

/// The message a lease that ran out leaves on its item (with the code `worker_lost`).
pub const LEASE_EXPIRED: &str = "lease expired";

/// A failure report, decided in one statement.
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a> {
    pub token: LeaseToken,
    /// The failure's code (`worker_lost`, ...).
    pub code: &'a str,
    /// Its message.
    pub error: &'a str,
    /// The worker says another attempt may succeed.
    pub retryable: bool,
    /// Attempts an item gets at most.
    pub max_attempts: i32,
    /// The item's batch has a cancel request: a retryable failure cancels it.
    pub cancel_requested: bool,
    /// The lease must be live at this time.
    pub live_at: DateTime<Utc>,
}

/// Records a failure when the token still holds a lease live at `f.live_at`: the item is
/// requeued (retryable, attempts left, no cancel), cancelled (retryable with a cancel
/// request) or failed, and the batch's open counts move with it. Returns the new status and
/// the attempts.
pub async fn settle_failure<C: ConnectionTrait>(
    txn: &C,
    id: ItemId,
    f: Failure<'_>,
    now: DateTime<Utc>,
) -> Result<Option<(entity::status::ItemState, i32)>, DbErr> {
    match txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_item SET status = CASE \
               WHEN $5 AND attempts < $6 AND NOT $7 THEN 'queued' \
               WHEN $5 AND $7 THEN 'cancelled' ELSE 'failed' END, \
             error = $3, error_code = $9, lease_token = NULL, worker_id = NULL, \
             lease_expires_at = NULL, updated_at = $4 \
             WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at >= $8 \
             RETURNING status, attempts, batch_id",
            [
                id.into(),
                f.token.into(),
                f.error.into(),
                now.into(),
                f.retryable.into(),
                f.max_attempts.into(),
                f.cancel_requested.into(),
                f.live_at.into(),
                f.code.into(),
            ],
        ))
        .await?
    {
        Some(r) => {
            let status: entity::status::ItemState = r.try_get("", "status")?;
            let batch: Uuid = r.try_get("", "batch_id")?;
            let mut shifts = BTreeMap::new();
            if status == entity::status::ItemState::Queued {
                requeued(&mut shifts, batch);
            } else {
                shifts.insert(batch, (0, -1));
            }
            super::counts::shift_open(txn, &shifts).await?;
            Ok(Some((status, r.try_get("", "attempts")?)))
        }
        None => Ok(None),
    }
}

/// Whether the item exists.
pub async fn exists<C: ConnectionTrait>(db: &C, id: Uuid) -> Result<bool, DbErr> {
    Ok(key_of(db, id).await?.is_some())
}

/// Closes a batch's queued items as `status` (`cancelled` on a cancel, `expired` when its
/// completion window ended), taking them off the batch's queued count: how many.
pub async fn close_queued<C: ConnectionTrait>(
    txn: &C,
    batch_id: Uuid,
    status: entity::status::ItemState,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let r = txn
        .execute_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_item SET status = $3, updated_at = $2 \
             WHERE batch_id = $1 AND status = 'queued'",
            [batch_id.into(), now.into(), status.into()],
        ))
        .await?;
    let n = r.rows_affected();
    let shift = (-i32::try_from(n).unwrap_or(i32::MAX), 0);
    super::counts::shift_open(txn, &BTreeMap::from([(batch_id, shift)])).await?;
    Ok(n)
}

/// Up to `max` items of a batch after index `after` (exclusive), in request order, through
/// the (batch_id, idx) index; optionally of one status.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    batch_id: Uuid,
    status: Option<&str>,
    after: Option<i32>,
    max: u64,
) -> Result<Vec<Model>, DbErr> {
    // Raw for its literal LIMIT (see `sql::limit`): every status poll runs this.
    let mut sql = String::from("SELECT * FROM batch_item WHERE batch_id = $1 AND idx > $2");
    let mut values = vec![batch_id.into(), after.unwrap_or(-1).into()];
    if let Some(s) = status {
        sql.push_str(" AND status = $3");
        values.push(s.into());
    }
    sql.push_str(&format!(" ORDER BY idx {}", limit(max)));
    Entity::find()
        .from_raw_sql(stmt(db.get_database_backend(), &sql, values))
        .all(db)
        .await
}

/// Up to `max` failed or expired items of a batch after index `after`, in request order
/// (through the (batch_id, idx) index).
pub async fn failures_after<C: ConnectionTrait>(
    db: &C,
    batch_id: Uuid,
    after: i32,
    max: u64,
) -> Result<Vec<Model>, DbErr> {
    let sql = format!(
        "SELECT * FROM batch_item WHERE batch_id = $1 AND idx > $2 \
         AND status IN ('failed', 'expired') ORDER BY idx {}",
        limit(max)
    );
    Entity::find()
        .from_raw_sql(stmt(
            db.get_database_backend(),
            &sql,
            [batch_id.into(), after.into()],
        ))
        .all(db)
        .await
}

/// Queued and running items of all batches (for the queue gauges), each counted through its
/// partial index: the status is written into the SQL, as a bound value could not use it.
pub async fn queue_depth<C: ConnectionTrait>(db: &C) -> Result<(i64, i64), DbErr> {
    let backend = db.get_database_backend();
    let mut n = [0i64; 2];
    for (i, sql) in [
        "SELECT COUNT(*) AS n FROM batch_item WHERE status = 'queued'",
        "SELECT COUNT(*) AS n FROM batch_item WHERE status = 'running'",
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(r) = db.query_one_raw(stmt(backend, sql, [])).await? {
            n[i] = r.try_get("", "n")?;
        }
    }
    Ok((n[0], n[1]))
}

/// When the head of the fair queue was queued (through its partial index).
pub async fn queue_head_created_at<C: ConnectionTrait>(
    db: &C,
) -> Result<Option<DateTime<Utc>>, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT created_at FROM batch_item WHERE status = 'queued' ORDER BY fair_pos LIMIT 1",
            [],
        ))
        .await?
    {
        Some(r) => Ok(Some(r.try_get("", "created_at")?)),
        None => Ok(None),
    }
}

/// An item by id.
pub async fn by_id<C: ConnectionTrait>(db: &C, id: Uuid) -> Result<Option<Model>, DbErr> {
    Entity::find_by_id(id).one(db).await
}
