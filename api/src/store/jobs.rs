//! `batch_job`: a customer's batch. Its row is the lock every transition of the batch takes,
//! and it keeps the item counts of every status: each statement that moves items from one
//! status to another also moves the counts of their batches (see [`super::counts::shift_open`] for the open
//! ones), in the same transaction, so a read never counts items.
use chrono::{DateTime, Utc};
use entity::batch_job::{ActiveModel, Column, Entity, Model};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, FromQueryResult, Set};
use uuid::Uuid;

use super::sql::{NO_ROW_NO_CHANGE, limit, part_of, run_together, skip_locked, stmt};
use crate::domain::NewItem;
use crate::domain::ids::{AccountId, ItemId, LeaseToken};
use crate::domain::money::Wallet;

/// A batch row as a create writes it.
pub struct NewJob<'a> {
    pub id: Uuid,
    pub key_id: i64,
    pub request_id: &'a str,
    pub fingerprint: &'a str,
    pub total: i32,
    pub cost_per_video: i64,
    pub required_credits: i64,
    pub webhook_url: Option<String>,
    /// JSON object, as given.
    pub metadata: Option<String>,
    /// The create's response as JSON, replayed to repeats of the request id.
    pub response: String,
    pub now: DateTime<Utc>,
    /// The end of the completion window, if any.
    pub expires_at: Option<DateTime<Utc>>,
}

/// How a create's hold and inserts ended ([`NewJob::insert_held`]).
#[derive(Debug)]
pub enum Held {
    /// The wallet lacks the credits: nothing changed.
    Refused,
    /// The hold was taken (the wallet after it), but another request with the same id holds
    /// the batch row: nothing else was written, and the caller gives the hold back.
    Repeat(Wallet),
    /// Held, and the batch and its items inserted (the wallet after the hold).
    Created(Wallet),
}

/// Items of a batch written by one statement at most; larger batches take one statement
/// each for the hold, the batch row and every 500 items.
const ITEMS_IN_ONE_CALL: usize = 1000;

impl NewJob<'_> {
    /// The create's writes: the hold of `self.required_credits` on the account's wallet (only
    /// when available), then the batch row (the idempotency insert), then its `items` queued
    /// at fair positions `start_pos..`, each only when the one before it took place. One call
    /// whatever the batch size up to [`ITEMS_IN_ONE_CALL`] items: on PostgreSQL one statement
    /// (each step reads the one before, so they run and lock in this order), on SQLite three
    /// statements sent together (see [`run_together`]).
    pub async fn insert_held<C: ConnectionTrait>(
        self,
        txn: &C,
        items: &[NewItem],
        start_pos: i64,
    ) -> Result<Held, DbErr> {
        if items.len() > ITEMS_IN_ONE_CALL {
            return self.insert_held_in_steps(txn, items, start_pos).await;
        }
        let backend = txn.get_database_backend();
        // $1 key, $2 credits, $3 now, $4 batch id, $5 request id, $6 fingerprint, $7 items,
        // $8 cost per video, $9 webhook url, $10 metadata, $11 response, $12 window end, then
        // six values per item: id, index, prompt, params, fair position, index retried.
        let mut values: Vec<sea_orm::Value> = vec![
            self.key_id.into(),
            self.required_credits.into(),
            self.now.into(),
            self.id.into(),
            self.request_id.into(),
            self.fingerprint.into(),
            self.total.into(),
            self.cost_per_video.into(),
            self.webhook_url.clone().into(),
            self.metadata.clone().into(),
            self.response.clone().into(),
            self.expires_at.into(),
        ];
        let mut rows = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let first = values.len() + 1;
            rows.push(format!(
                "(${first}, ${}, ${}, ${}, ${}, ${})",
                first + 1,
                first + 2,
                first + 3,
                first + 4,
                first + 5
            ));
            values.extend([
                Uuid::now_v7().into(),
                (i as i32).into(),
                item.prompt.clone().into(),
                item.params.clone().into(),
                (start_pos + i as i64).into(),
                item.source_idx.into(),
            ]);
        }
        let rows = rows.join(", ");
        const HOLD: &str = "UPDATE credit_wallet SET held = held + $2, updated_at = $3 \
             WHERE api_key_id = $1 AND balance - held >= $2";
        const BATCH_COLUMNS: &str = "id, api_key_id, request_id, fingerprint, status, \
             total_count, succeeded_count, failed_count, cancelled_count, expired_count, \
             queued_count, running_count, cost_per_video, required_credits, webhook_url, metadata, response, created_at, \
             updated_at, expires_at";
        const BATCH_VALUES: &str =
            "$4, $1, $5, $6, 'queued', $7, 0, 0, 0, 0, $7, 0, $8, $2, $9, $10, $11, $3, $3, $12";
        const ITEM_COLUMNS: &str = "id, batch_id, api_key_id, idx, prompt, params, status, \
             attempts, fair_pos, created_at, updated_at, source_idx";
        let found = if backend == sea_orm::DbBackend::Postgres {
            // No row comes back when the hold was refused, and then nothing changed.
            let sql = format!(
                "{NO_ROW_NO_CHANGE}WITH w AS ({HOLD} RETURNING balance, held), \
                 b AS (INSERT INTO batch_job ({BATCH_COLUMNS}) SELECT {BATCH_VALUES} FROM w \
                 ON CONFLICT (api_key_id, request_id) DO NOTHING RETURNING id), \
                 i AS (INSERT INTO batch_item ({ITEM_COLUMNS}) \
                 SELECT v.id, b.id, $1, v.idx, v.prompt, v.params, 'queued', 0, v.pos, $3, $3, v.src \
                 FROM b CROSS JOIN (VALUES {rows}) AS v (id, idx, prompt, params, pos, src) RETURNING 1) \
                 SELECT 'wallet' AS part, balance, held FROM w \
                 UNION ALL SELECT 'batch', NULL, NULL FROM b"
            );
            txn.query_all_raw(stmt(backend, &sql, values)).await?
        } else {
            let hold = format!("{HOLD} RETURNING 'wallet' AS part, balance, held");
            let batch = format!(
                "INSERT INTO batch_job ({BATCH_COLUMNS}) SELECT {BATCH_VALUES} \
                 WHERE changes() > 0 ON CONFLICT (api_key_id, request_id) DO NOTHING \
                 RETURNING 'batch' AS part"
            );
            let items = format!(
                "INSERT INTO batch_item ({ITEM_COLUMNS}) \
                 SELECT v.column1, $4, $1, v.column2, v.column3, v.column4, 'queued', 0, \
                 v.column5, $3, $3, v.column6 FROM (VALUES {rows}) AS v WHERE changes() > 0 \
                 RETURNING 'item' AS part"
            );
            run_together(txn, &[&hold, &batch, &items], values).await?
        };
        let mut wallet = None;
        let mut created = false;
        for r in &found {
            match part_of(r).as_deref() {
                Some("wallet") => {
                    wallet = Some(Wallet {
                        balance: r.try_get("", "balance")?,
                        held: r.try_get("", "held")?,
                    })
                }
                Some("batch") => created = true,
                _ => {}
            }
        }
        Ok(match (wallet, created) {
            (None, _) => Held::Refused,
            (Some(w), false) => Held::Repeat(w),
            (Some(w), true) => Held::Created(w),
        })
    }

    /// [`NewJob::insert_held`] for a batch too large for one call: the same steps, one call
    /// each.
    async fn insert_held_in_steps<C: ConnectionTrait>(
        self,
        txn: &C,
        items: &[NewItem],
        start_pos: i64,
    ) -> Result<Held, DbErr> {
        let (key_id, id, now) = (self.key_id, self.id, self.now);
        let Some(wallet) =
            super::wallets::hold(txn, AccountId(key_id), self.required_credits, now).await?
        else {
            return Ok(Held::Refused);
        };
        if !self.insert_if_absent(txn).await? {
            return Ok(Held::Repeat(wallet));
        }
        super::items::insert_queued(txn, id, AccountId(key_id), start_pos, items, now).await?;
        Ok(Held::Created(wallet))
    }

    /// Inserts the row unless the key already has a batch with this request id (the
    /// idempotency insert): true when inserted.
    pub async fn insert_if_absent<C: ConnectionTrait>(self, txn: &C) -> Result<bool, DbErr> {
        let inserted = Entity::insert(ActiveModel {
            id: Set(self.id),
            api_key_id: Set(self.key_id),
            request_id: Set(self.request_id.to_string()),
            fingerprint: Set(self.fingerprint.to_string()),
            status: Set(entity::status::BatchState::Queued),
            total_count: Set(self.total),
            succeeded_count: Set(0),
            failed_count: Set(0),
            cancelled_count: Set(0),
            cost_per_video: Set(self.cost_per_video),
            required_credits: Set(self.required_credits),
            webhook_url: Set(self.webhook_url),
            metadata: Set(self.metadata),
            response: Set(self.response),
            created_at: Set(self.now),
            updated_at: Set(self.now),
            cancel_requested_at: Set(None),
            completed_at: Set(None),
            expires_at: Set(self.expires_at),
            expired_at: Set(None),
            expired_count: Set(0),
            queued_count: Set(self.total),
            running_count: Set(0),
            error_counts: Set(None),
            retry_of: Set(None),
            retried_by: Set(None),
        })
        .on_conflict_do_nothing_on([Column::ApiKeyId, Column::RequestId])
        .exec(txn)
        .await?;
        Ok(matches!(inserted, sea_orm::TryInsertResult::Inserted(_)))
    }
}

/// The key's batch with this request id.
pub async fn by_request_id<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    request_id: &str,
) -> Result<Option<Model>, DbErr> {
    // The create's hottest lookup.
    unique(
        db,
        "SELECT * FROM batch_job WHERE api_key_id = $1 AND request_id = $2",
        [account.into(), request_id.into()],
    )
    .await
}

/// The row a unique condition selects, without a LIMIT (see `sql::limit`).
async fn unique<C: ConnectionTrait, const N: usize>(
    db: &C,
    sql: &str,
    values: [sea_orm::Value; N],
) -> Result<Option<Model>, DbErr> {
    Entity::find()
        .from_raw_sql(stmt(db.get_database_backend(), sql, values))
        .one(db)
        .await
}

/// A batch by id.
pub async fn by_id<C: ConnectionTrait>(db: &C, id: Uuid) -> Result<Option<Model>, DbErr> {
    Entity::find_by_id(id).one(db).await
}

/// A batch by id, if it belongs to the key.
pub async fn owned<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    id: Uuid,
) -> Result<Option<Model>, DbErr> {
    // Every status poll runs this.
    unique(
        db,
        "SELECT * FROM batch_job WHERE id = $1 AND api_key_id = $2",
        [id.into(), account.into()],
    )
    .await
}

/// The columns of a batch that its view shows: a status poll reads these, no more.
#[derive(Clone, Debug, FromQueryResult)]
pub struct Visible {
    pub id: Uuid,
    pub request_id: String,
    pub status: entity::status::BatchState,
    pub total_count: i32,
    pub succeeded_count: i32,
    pub failed_count: i32,
    pub cancelled_count: i32,
    pub expired_count: i32,
    pub queued_count: i32,
    pub running_count: i32,
    pub cost_per_video: i64,
    pub required_credits: i64,
    pub webhook_url: Option<String>,
    pub metadata: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub error_counts: Option<String>,
    pub retry_of: Option<Uuid>,
    pub retried_by: Option<Uuid>,
}

/// The columns of [`Visible`], in its order.
const VISIBLE: [&str; 22] = [
    "id",
    "request_id",
    "status",
    "total_count",
    "succeeded_count",
    "failed_count",
    "cancelled_count",
    "expired_count",
    "queued_count",
    "running_count",
    "cost_per_video",
    "required_credits",
    "webhook_url",
    "metadata",
    "created_at",
    "updated_at",
    "cancel_requested_at",
    "completed_at",
    "expires_at",
    "error_counts",
    "retry_of",
    "retried_by",
];

impl From<&Model> for Visible {
    fn from(m: &Model) -> Self {
        Visible {
            id: m.id,
            request_id: m.request_id.clone(),
            status: m.status,
            total_count: m.total_count,
            succeeded_count: m.succeeded_count,
            failed_count: m.failed_count,
            cancelled_count: m.cancelled_count,
            expired_count: m.expired_count,
            queued_count: m.queued_count,
            running_count: m.running_count,
            cost_per_video: m.cost_per_video,
            required_credits: m.required_credits,
            webhook_url: m.webhook_url.clone(),
            metadata: m.metadata.clone(),
            created_at: m.created_at,
            updated_at: m.updated_at,
            cancel_requested_at: m.cancel_requested_at,
            completed_at: m.completed_at,
            expires_at: m.expires_at,
            error_counts: m.error_counts.clone(),
            retry_of: m.retry_of,
            retried_by: m.retried_by,
        }
    }
}

/// A batch by id, if it belongs to the key, with its queued and running item counts (from the
/// batch row) and its first `max` items in request order, as their views show them: one
/// statement, as every status poll runs it. The batch row and the items are two branches of
/// one `UNION ALL` (the items' columns prefixed `i_`), the items read through the
/// (batch_id, idx) index and never more than `max` of them: the cost of a poll does not grow
/// with the batch.
pub async fn owned_with_items<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    id: Uuid,
    max: u64,
) -> Result<Option<(Visible, (i64, i64), Vec<super::items::Visible>)>, DbErr> {
    // The text depends on `max` alone: built once for the page every poll reads.
    static POLL: std::sync::OnceLock<(u64, String)> = std::sync::OnceLock::new();
    let built;
    let sql = match POLL.get_or_init(|| (max, poll_sql(max))) {
        (m, sql) if *m == max => sql.as_str(),
        _ => {
            built = poll_sql(max);
            built.as_str()
        }
    };
    let rows = db
        .query_all_raw(stmt(
            db.get_database_backend(),
            sql,
            [id.into(), account.into()],
        ))
        .await?;
    let mut rows = rows.into_iter();
    let Some(first) = rows.next() else {
        return Ok(None);
    };
    if first.try_get::<i32>("", "part")? != 0 {
        // Items but no batch row of this key: not found, like the batch.
        return Ok(None);
    }
    let job = Visible::from_query_result(&first, "")?;
    let open = (i64::from(job.queued_count), i64::from(job.running_count));
    let items = rows
        .map(|r| super::items::Visible::from_query_result(&r, "i_"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((job, open, items)))
}

/// The statement of [`owned_with_items`].
fn poll_sql(max: u64) -> String {
    let item_cols = super::items::VISIBLE;
    let list = |cols: &[&str], f: &dyn Fn(&str) -> String| {
        cols.iter().map(|c| f(c)).collect::<Vec<_>>().join(", ")
    };
    format!(
        "SELECT 0 AS part, {batch}, {item_nulls} \
         FROM batch_job j WHERE j.id = $1 AND j.api_key_id = $2 \
         UNION ALL \
         SELECT 1, {batch_nulls}, {items} FROM \
         (SELECT * FROM batch_item WHERE batch_id = $1 AND api_key_id = $2 AND idx > -1 ORDER BY idx {lim}) i \
         ORDER BY part, i_idx",
        batch = list(&VISIBLE, &|c| format!("j.{c}")),
        item_nulls = list(&item_cols, &|c| format!("NULL AS i_{c}")),
        batch_nulls = list(&VISIBLE, &|_| "NULL".to_string()),
        items = list(&item_cols, &|c| format!("i.{c}")),
        lim = limit(max),
    )
}

/// Up to `max` of an account's batches older than `before` (by id), newest first, optionally of
/// one status: read backwards through the (api_key_id, id) index, or the
/// (api_key_id, status, id) one, never more rows than the page.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    status: Option<&str>,
    before: Option<Uuid>,
    max: u64,
) -> Result<Vec<Model>, DbErr> {
    let mut values = vec![account.into()];
    values.extend(status.map(Into::into));
    values.extend(before.map(Into::into));
    Entity::find()
        .from_raw_sql(stmt(
            db.get_database_backend(),
            &page_sql(status.is_some(), before.is_some(), max),
            values,
        ))
        .all(db)
        .await
}

/// The statement of [`page`]: `$1` key, then the status and the id before, when given.
fn page_sql(status: bool, before: bool, max: u64) -> String {
    let mut sql = String::from("SELECT * FROM batch_job WHERE api_key_id = $1");
    let mut n = 1;
    if status {
        n += 1;
        sql.push_str(&format!(" AND status = ${n}"));
    }
    if before {
        n += 1;
        sql.push_str(&format!(" AND id < ${n}"));
    }
    sql.push_str(&format!(" ORDER BY id DESC {}", limit(max)));
    sql
}

/// Takes the batch row's lock (touching `updated_at`) if it belongs to the key: false when
/// there is no such batch.
pub async fn lock_owned<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let r = txn
        .execute_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_job SET updated_at = $3 WHERE id = $1 AND api_key_id = $2",
            [id.into(), account.into(), now.into()],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Counts `expired` more expired items and records that the window was enforced (its first
/// time).
pub async fn record_expiry<C: ConnectionTrait>(
    txn: &C,
    id: Uuid,
    expired: i32,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    txn.execute_raw(stmt(
        txn.get_database_backend(),
        "UPDATE batch_job SET expired_count = expired_count + $2, \
         expired_at = COALESCE(expired_at, $3), updated_at = $3 WHERE id = $1",
        [id.into(), expired.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// Open batches whose completion window ended by `now` and that still have to be enforced:
/// never enforced yet, or holding queued items again (a retry after the window), as
/// (batch, key), oldest window first.
pub async fn due_to_expire<C: ConnectionTrait>(
    db: &C,
    now: DateTime<Utc>,
    max: u64,
) -> Result<Vec<(Uuid, i64)>, DbErr> {
    let sql = format!(
        "SELECT id, api_key_id FROM batch_job WHERE status IN ('queued', 'processing') \
         AND expires_at <= $1 AND (expired_at IS NULL OR queued_count > 0) \
         ORDER BY expires_at {}",
        limit(max)
    );
    db.query_all_raw(stmt(db.get_database_backend(), &sql, [now.into()]))
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get("", "id")?, r.try_get("", "api_key_id")?)))
        .collect()
}

/// Counts `cancelled` more cancelled items and records the cancel request (its first time).
pub async fn record_cancel<C: ConnectionTrait>(
    txn: &C,
    id: Uuid,
    cancelled: i32,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    txn.execute_raw(stmt(
        txn.get_database_backend(),
        "UPDATE batch_job SET cancelled_count = cancelled_count + $2, \
         cancel_requested_at = COALESCE(cancel_requested_at, $3), updated_at = $3 WHERE id = $1",
        [id.into(), cancelled.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// Marks the batch final (`cancelled` after a cancel request, `expired` after its window was
/// enforced, else `completed`) when no item is open: true when this call did it.
pub async fn finish_if_done<C: ConnectionTrait>(
    txn: &C,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let r = txn
        .execute_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_job SET \
             status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
             WHEN expired_at IS NOT NULL THEN 'expired' ELSE 'completed' END, \
             completed_at = $2, updated_at = $2 \
             WHERE id = $1 AND status IN ('queued', 'processing') \
             AND succeeded_count + failed_count + cancelled_count + expired_count = total_count",
            [id.into(), now.into()],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Marks queued batches `processing`, skipping rows another transaction holds (that one marks
/// its batch itself: see [`lock_of_item`]), so a claim never waits on a batch lock.
pub async fn mark_processing<C: ConnectionTrait>(
    txn: &C,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    let marks = super::sql::placeholders(2, ids.len());
    let sql = format!(
        "UPDATE batch_job SET status = 'processing', updated_at = $1 WHERE id IN \
         (SELECT id FROM batch_job WHERE id IN ({marks}) AND status = 'queued'{})",
        skip_locked(backend)
    );
    let mut values = vec![now.into()];
    values.extend(ids.iter().map(|&id| id.into()));
    txn.execute_raw(stmt(backend, &sql, values)).await?;
    Ok(())
}

/// The batch of an item, as locked for one of its item's transitions.
#[derive(Clone, Debug)]
pub struct LockedJob {
    pub id: Uuid,
    pub key_id: i64,
    pub cost_per_video: i64,
    pub cancel_requested: bool,
    /// The stored status (`queued` is already turned into `processing` by the lock).
    pub status: entity::status::BatchState,
    /// Items still open (queued or running) before this transition.
    pub open: i64,
}

/// Locks the batch of an item (batch row first, then item: the order cancel takes too, so
/// the two never deadlock), marking it `processing` if it was still `queued`.
pub async fn lock_of_item<C: ConnectionTrait>(
    txn: &C,
    item_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<LockedJob>, DbErr> {
    let Some(b) = txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "UPDATE batch_job SET updated_at = $2, \
             status = CASE WHEN status = 'queued' THEN 'processing' ELSE status END \
             WHERE id = (SELECT batch_id FROM batch_item WHERE id = $1) \
             RETURNING id, api_key_id, cost_per_video, cancel_requested_at, status, \
             total_count - succeeded_count - failed_count - cancelled_count - expired_count AS open",
            [item_id.into(), now.into()],
        ))
        .await?
    else {
        return Ok(None);
    };
    locked_job(&b).map(Some)
}

/// How a success report ended in the store.
pub enum Success {
    /// The batch was locked and the success counted, the item marked succeeded.
    Recorded {
        /// The item's batch, with its open items before this success.
        job: LockedJob,
        /// The item's attempts.
        attempts: i32,
    },
    /// The item is unknown or the token no longer holds a live lease: nothing changed.
    Stale,
    /// The lease ended between the two statements (only where they are not sent as one):
    /// the batch's count was changed and must be rolled back with the caller's work.
    Raced,
}

/// Records a success reported under lease `token` at `now`: locks the item's batch and counts
/// the success on it (the batch row first, then the item, as every transition takes them),
/// then marks the item succeeded. Both statements require the token's lease to be live, so a
/// stale report changes nothing; on SQLite they are one call ([`run_together`]).
pub async fn record_success<C: ConnectionTrait>(
    txn: &C,
    item: ItemId,
    token: LeaseToken,
    result_url: &str,
    result: Option<String>,
    now: DateTime<Utc>,
) -> Result<Success, DbErr> {
    const LOCK_AND_COUNT: &str = "UPDATE batch_job SET updated_at = $3, \
         succeeded_count = succeeded_count + 1, running_count = running_count - 1, \
         status = CASE WHEN status = 'queued' THEN 'processing' ELSE status END \
         WHERE id = (SELECT batch_id FROM batch_item WHERE id = $1 AND lease_token = $2 \
         AND status = 'running' AND lease_expires_at >= $3) \
         RETURNING 'batch' AS part, id, api_key_id, cost_per_video, cancel_requested_at, status, \
         total_count - succeeded_count - failed_count - cancelled_count - expired_count AS open";
    const SUCCEED: &str = "UPDATE batch_item SET status = 'succeeded', result_url = $4, \
         result = $5, error = NULL, error_code = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $3 \
         WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at >= $3 \
         RETURNING 'item' AS part, attempts";
    let rows = run_together(
        txn,
        &[LOCK_AND_COUNT, SUCCEED],
        vec![
            item.into(),
            token.into(),
            now.into(),
            result_url.into(),
            result.into(),
        ],
    )
    .await?;
    let (mut job, mut attempts) = (None, None);
    for r in &rows {
        match part_of(r).as_deref() {
            Some("batch") => job = Some(locked_job(r)?),
            Some("item") => attempts = Some(r.try_get::<i32>("", "attempts")?),
            _ => {}
        }
    }
    Ok(match (job, attempts) {
        (Some(mut job), Some(attempts)) => {
            // The count returned is the one after this success.
            job.open += 1;
            Success::Recorded { job, attempts }
        }
        (None, None) => Success::Stale,
        _ => Success::Raced,
    })
}

fn locked_job(b: &sea_orm::QueryResult) -> Result<LockedJob, DbErr> {
    let cancel: Option<DateTime<Utc>> = b.try_get("", "cancel_requested_at")?;
    Ok(LockedJob {
        id: b.try_get("", "id")?,
        key_id: b.try_get("", "api_key_id")?,
        cost_per_video: b.try_get("", "cost_per_video")?,
        cancel_requested: cancel.is_some(),
        status: b.try_get("", "status")?,
        open: i64::from(b.try_get::<i32>("", "open")?),
    })
}

/// A terminal outcome of one item, counted on its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// Counts one item's terminal outcome on its batch (call with the batch row locked).
pub async fn count_outcome<C: ConnectionTrait>(
    txn: &C,
    id: Uuid,
    outcome: Outcome,
) -> Result<(), DbErr> {
    let sql = match outcome {
        Outcome::Succeeded => {
            "UPDATE batch_job SET succeeded_count = succeeded_count + 1 WHERE id = $1"
        }
        Outcome::Failed => "UPDATE batch_job SET failed_count = failed_count + 1 WHERE id = $1",
        Outcome::Cancelled => {
            "UPDATE batch_job SET cancelled_count = cancelled_count + 1 WHERE id = $1"
        }
    };
    txn.execute_raw(stmt(txn.get_database_backend(), sql, [id.into()]))
        .await?;
    Ok(())
}

/// Links a retry to the batch it retries: `retry_of` on the new batch, `retried_by` on the
/// original (the latest retry, when there were several).
pub async fn link_retry<C: ConnectionTrait>(
    txn: &C,
    original: Uuid,
    retry: Uuid,
) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    txn.execute_raw(stmt(
        backend,
        "UPDATE batch_job SET retry_of = $1 WHERE id = $2",
        [original.into(), retry.into()],
    ))
    .await?;
    txn.execute_raw(stmt(
        backend,
        "UPDATE batch_job SET retried_by = $1 WHERE id = $2",
        [retry.into(), original.into()],
    ))
    .await?;
    Ok(())
}

/// Counts one final failure of code `code` in the batch's `error_counts` (call with the batch
/// row locked, with [`count_outcome`]).
pub async fn count_failure_code<C: ConnectionTrait>(
    txn: &C,
    id: Uuid,
    code: &str,
) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    let current = txn
        .query_one_raw(stmt(
            backend,
            "SELECT error_counts FROM batch_job WHERE id = $1",
            [id.into()],
        ))
        .await?
        .map(|r| r.try_get::<Option<String>>("", "error_counts"))
        .transpose()?
        .flatten();
    let mut counts = error_counts(current.as_deref());
    *counts.entry(code.to_string()).or_insert(0) += 1;
    let text = serde_json::to_string(&counts).map_err(|e| DbErr::Custom(e.to_string()))?;
    txn.execute_raw(stmt(
        backend,
        "UPDATE batch_job SET error_counts = $1 WHERE id = $2",
        [text.into(), id.into()],
    ))
    .await?;
    Ok(())
}

/// The failed items per code of a batch's stored `error_counts` (empty when none).
pub fn error_counts(stored: Option<&str>) -> std::collections::BTreeMap<String, i64> {
    stored
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::usage::plans::{migrated, plan};

    /// A list page reads backwards through an index that matches its filter: no sort, no scan
    /// of the key's other batches.
    #[tokio::test]
    async fn a_list_page_reads_its_batches_through_an_index() {
        let (_dir, db) = migrated().await;
        let id = || Uuid::now_v7().into();
        for (status, before, index) in [
            (false, false, "ix_batch_job_key_id (api_key_id=?)"),
            (false, true, "ix_batch_job_key_id (api_key_id=? AND id<?)"),
            (
                true,
                false,
                "ix_batch_job_key_status (api_key_id=? AND status=?)",
            ),
            (
                true,
                true,
                "ix_batch_job_key_status (api_key_id=? AND status=? AND id<?)",
            ),
        ] {
            let mut values = vec![1i64.into()];
            if status {
                values.push("expired".into());
            }
            if before {
                values.push(id());
            }
            let p = plan(&db, &page_sql(status, before, 21), values).await;
            assert!(p.contains(&format!("USING INDEX {index}")), "{p}");
            assert!(!p.contains("TEMP B-TREE"), "{p}");
        }
    }

    /// A status poll reads the batch by its key and its first items through (batch_id, idx),
    /// and reads no other item.
    #[tokio::test]
    async fn a_status_poll_reads_one_batch_row_and_one_page_of_items() {
        let (_dir, db) = migrated().await;
        let p = plan(
            &db,
            &poll_sql(101),
            vec![Uuid::now_v7().into(), 1i64.into()],
        )
        .await;
        assert!(
            p.contains("SEARCH j USING INDEX sqlite_autoindex_batch_job_1 (id=?)"),
            "{p}"
        );
        assert!(
            p.contains(
                "SEARCH batch_item USING INDEX sqlite_autoindex_batch_item_2 (batch_id=? AND idx>?)"
            ),
            "{p}"
        );
        // Nothing else of the batch's items is read (the page of at most `max` rows is
        // ordered once more after the union).
        let item_steps = p.lines().filter(|l| l.contains("batch_item")).count();
        assert_eq!(item_steps, 1, "{p}");
    }
}
