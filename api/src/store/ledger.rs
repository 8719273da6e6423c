//! `credit_ledger`: the append-only record of every credit movement, and `charge_rollup`, the
//! credits charged per account and UTC day, added to by the same calls that write charges.
use chrono::{DateTime, Utc};
use entity::credit_ledger::{ActiveModel, Entity, Model};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, Set};
use uuid::Uuid;

use super::sql::stmt;
use super::unit::Txn;
use crate::domain::ids::AccountId;
use crate::domain::money::LedgerKind;

/// One ledger row; what it refers to is named, everything else is `None` by default.
#[derive(Clone, Debug)]
pub struct NewEntry<'a> {
    pub key_id: i64,
    pub kind: LedgerKind,
    pub amount: i64,
    pub batch_id: Option<Uuid>,
    pub item_id: Option<Uuid>,
    pub note: Option<&'a str>,
    /// The Idempotency-Key of an admin movement (unique per account).
    pub idempotency_key: Option<&'a str>,
}

impl<'a> NewEntry<'a> {
    /// A movement of `amount` credits of `kind` on the account's wallet.
    pub fn new(key_id: i64, kind: LedgerKind, amount: i64) -> Self {
        Self {
            key_id,
            kind,
            amount,
            batch_id: None,
            item_id: None,
            note: None,
            idempotency_key: None,
        }
    }

    /// For a batch.
    pub fn batch(mut self, id: Uuid) -> Self {
        self.batch_id = Some(id);
        self
    }

    /// For one item of a batch.
    pub fn item(mut self, batch_id: Uuid, item_id: Uuid) -> Self {
        self.batch_id = Some(batch_id);
        self.item_id = Some(item_id);
        self
    }

    /// With a note.
    pub fn note(mut self, note: Option<&'a str>) -> Self {
        self.note = note;
        self
    }

    /// With an admin Idempotency-Key.
    pub fn idempotency_key(mut self, key: Option<&'a str>) -> Self {
        self.idempotency_key = key;
        self
    }

    /// The row as written at `now`.
    pub fn row(&self, now: DateTime<Utc>) -> LedgerRow {
        LedgerRow {
            key_id: self.key_id,
            kind: self.kind,
            amount: self.amount,
            batch_id: self.batch_id,
            item_id: self.item_id,
            note: self.note.map(str::to_string),
            idempotency_key: self.idempotency_key.map(str::to_string),
            created_at: now,
        }
    }

    /// Appends the row.
    pub async fn insert<C: ConnectionTrait>(
        &self,
        txn: &C,
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        insert_many(txn, &[self.row(now)]).await
    }
}

pub use crate::domain::money::LedgerRow;

/// Rows per multi-row insert (8 values each, far below both stores' limits on bound values).
const INSERT_CHUNK: usize = 500;

/// Appends rows in order, one statement per chunk, and adds their charges to the daily
/// rollup (see [`add_charges_to_rollup`]).
pub async fn insert_many<C: ConnectionTrait>(db: &C, rows: &[LedgerRow]) -> Result<(), DbErr> {
    add_charges_to_rollup(db, rows).await?;
    for chunk in rows.chunks(INSERT_CHUNK) {
        let models = chunk.iter().map(|r| ActiveModel {
            api_key_id: Set(r.key_id),
            kind: Set(r.kind),
            amount: Set(r.amount),
            batch_id: Set(r.batch_id),
            item_id: Set(r.item_id),
            note: Set(r.note.clone()),
            idempotency_key: Set(r.idempotency_key.clone()),
            created_at: Set(r.created_at),
            ..Default::default()
        });
        Entity::insert_many(models)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Rollup rows per upsert: 3 values each.
const ROLLUP_CHUNK: usize = 500;

/// Adds the charges among `rows` to `charge_rollup`, summed per (key, UTC day) first: one
/// multi-row upsert, rows in key order (the order every group locks rows in).
async fn add_charges_to_rollup<C: ConnectionTrait>(
    db: &C,
    rows: &[LedgerRow],
) -> Result<(), DbErr> {
    let mut sums: std::collections::BTreeMap<(i64, String), i64> = Default::default();
    for r in rows.iter().filter(|r| r.kind == LedgerKind::Charge) {
        *sums
            .entry((r.key_id, super::sql::day_of(r.created_at)))
            .or_default() += r.amount;
    }
    let backend = db.get_database_backend();
    let sums: Vec<((i64, String), i64)> = sums.into_iter().collect();
    for chunk in sums.chunks(ROLLUP_CHUNK) {
        let sql = format!(
            "INSERT INTO charge_rollup (api_key_id, day, credits) VALUES {} \
             ON CONFLICT (api_key_id, day) DO UPDATE SET \
             credits = charge_rollup.credits + excluded.credits",
            super::sql::value_rows(backend, chunk.len(), 3)
        );
        let values = chunk
            .iter()
            .flat_map(|((key, day), credits)| {
                [(*key).into(), day.clone().into(), (*credits).into()]
            })
            .collect::<Vec<sea_orm::Value>>();
        db.execute_raw(stmt(backend, &sql, values)).await?;
    }
    Ok(())
}

/// The row an admin movement with this Idempotency-Key wrote, if any.
pub async fn by_idempotency_key<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    idempotency_key: &str,
) -> Result<Option<Model>, DbErr> {
    // The pair is unique, so no LIMIT (see `sql::limit`).
    Entity::find()
        .from_raw_sql(stmt(
            db.get_database_backend(),
            "SELECT * FROM credit_ledger WHERE api_key_id = $1 AND idempotency_key = $2",
            [account.into(), idempotency_key.into()],
        ))
        .one(db)
        .await
}

/// Up to `max` of a key's rows older than `before` (by id), newest first: read backwards
/// through the (api_key_id, id) index, never more rows than the page, however long the key's
/// history.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    before: Option<i64>,
    max: u64,
) -> Result<Vec<Model>, DbErr> {
    Entity::find()
        .from_raw_sql(stmt(
            db.get_database_backend(),
            &page_sql(max),
            [account.into(), before.unwrap_or(i64::MAX).into()],
        ))
        .all(db)
        .await
}

/// The statement of [`page`] (`$1` key, `$2` before), its `LIMIT` written (see `sql::limit`).
fn page_sql(max: u64) -> String {
    format!(
        "SELECT * FROM credit_ledger WHERE api_key_id = $1 AND id < $2 ORDER BY id DESC {}",
        super::sql::limit(max)
    )
}

/// Credits charged to a key per UTC day (`YYYY-MM-DD`) in `[from, to)`.
pub async fn charged_per_day<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, DbErr> {
    let backend = db.get_database_backend();
    let day = super::sql::day_expr(backend, "created_at");
    let sql = format!(
        "SELECT {day} AS day, CAST(SUM(amount) AS BIGINT) AS charged FROM credit_ledger \
         WHERE api_key_id = $1 AND kind = 'charge' AND created_at >= $2 AND created_at < $3 GROUP BY {day}"
    );
    db.query_all_raw(stmt(
        backend,
        &sql,
        [account.into(), from.into(), to.into()],
    ))
    .await?
    .into_iter()
    .map(|r| {
        Ok((
            r.try_get("", "day")?,
            r.try_get::<Option<i64>>("", "charged")?.unwrap_or(0),
        ))
    })
    .collect()
}

/// Moves the entry's credits and appends it to the ledger. Returns false (and changes
/// nothing) when the wallet's rule would break: overdraft on hold, below held on adjust.
pub async fn apply<C: ConnectionTrait>(txn: &C, entry: NewEntry<'_>) -> Result<bool, DbErr> {
    let now = chrono::Utc::now();
    if !super::wallets::apply(txn, AccountId(entry.key_id), entry.kind, entry.amount, now).await? {
        return Ok(false);
    }
    metrics::counter!("credits_total", "kind" => entry.kind.as_str())
        .increment(entry.amount.unsigned_abs());
    entry.insert(txn, now).await?;
    Ok(true)
}

/// Like [`apply`] inside a unit of the write pipeline: the ledger row is appended to the
/// unit's and written by its group, in the same transaction, with the rows of the group's
/// other units in one statement (and counted in the metrics once committed).
///
/// A charge or a release never lowers the credits available, and every item's cost was held
/// when its batch was created, so neither can fail for want of credits. On SQLite (one writer,
/// no row lock another process could hold) the group sums the charges and releases of a key
/// into one wallet update. On PostgreSQL every wallet update runs here, in the unit: groups
/// of several nodes then lock wallet rows in key order, as they lock every other row.
pub async fn apply_in(txn: &Txn<'_>, entry: NewEntry<'_>) -> Result<bool, DbErr> {
    let now = chrono::Utc::now();
    let summed = match entry.kind {
        LedgerKind::Charge => Some((-entry.amount, -entry.amount)),
        LedgerKind::Release => Some((0, -entry.amount)),
        _ => None,
    };
    match summed {
        Some((balance, held)) if txn.get_database_backend() == sea_orm::DbBackend::Sqlite => {
            txn.append_wallet(entry.key_id, balance, held);
        }
        _ => {
            if !super::wallets::apply(txn, AccountId(entry.key_id), entry.kind, entry.amount, now)
                .await?
            {
                return Ok(false);
            }
        }
    }
    txn.append_ledger(entry.row(now));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::usage::plans::{migrated, plan};

    /// The credits view reads the wallet by its key and the newest ledger page backwards
    /// through the (api_key_id, id) index: no sort, no scan of the key's history.
    #[tokio::test]
    async fn the_credits_view_reads_its_rows_through_keys() {
        let (_dir, db) = migrated().await;
        let ledger = plan(&db, &page_sql(21), vec![1i64.into(), i64::MAX.into()]).await;
        assert!(
            ledger.contains("USING INDEX ix_credit_ledger_key_id (api_key_id=? AND id<?)"),
            "{ledger}"
        );
        assert!(!ledger.contains("TEMP B-TREE"), "{ledger}");
        let wallet = plan(&db, super::super::wallets::READ, vec![1i64.into()]).await;
        assert!(wallet.contains("INTEGER PRIMARY KEY"), "{wallet}");
    }
}
