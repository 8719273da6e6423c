//! Wallet movements: every change of `balance` or `held` is one conditional update plus one
//! append-only ledger row, inside the caller's transaction.
use chrono::Utc;
use sea_orm::{ConnectionTrait, DbErr};
use uuid::Uuid;

use crate::db::stmt;

/// The largest balance a wallet may hold (far below `i64::MAX`, so sums never overflow; SQLite
/// would silently turn an overflowing integer into a float).
pub const MAX_BALANCE: i64 = 1 << 53;

/// Kinds of ledger rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerKind {
    /// Credits bought or granted: balance += amount.
    Grant,
    /// Credits reserved for a batch: held += amount.
    Hold,
    /// A succeeded item: balance -= amount, held -= amount.
    Charge,
    /// A failed or cancelled item: held -= amount.
    Release,
    /// Admin correction (may be negative): balance += amount, never below held.
    Adjust,
}

impl LedgerKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Grant => "grant",
            LedgerKind::Hold => "hold",
            LedgerKind::Charge => "charge",
            LedgerKind::Release => "release",
            LedgerKind::Adjust => "adjust",
        }
    }

    fn wallet_sql(self) -> &'static str {
        match self {
            LedgerKind::Grant | LedgerKind::Adjust => {
                "UPDATE credit_wallet SET balance = balance + $2, updated_at = $3 \
                 WHERE api_key_id = $1 AND balance + $2 >= held AND balance <= $4 - $2"
            }
            LedgerKind::Hold => {
                "UPDATE credit_wallet SET held = held + $2, updated_at = $3 \
                 WHERE api_key_id = $1 AND balance - held >= $2"
            }
            LedgerKind::Charge => {
                "UPDATE credit_wallet SET balance = balance - $2, held = held - $2, updated_at = $3 \
                 WHERE api_key_id = $1 AND held >= $2"
            }
            LedgerKind::Release => {
                "UPDATE credit_wallet SET held = held - $2, updated_at = $3 \
                 WHERE api_key_id = $1 AND held >= $2"
            }
        }
    }
}

/// A wallet's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wallet {
    /// Credits owned.
    pub balance: i64,
    /// Credits reserved by unfinished batches.
    pub held: i64,
}

impl Wallet {
    /// `balance - held`.
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }
}

/// Moves credits and records the ledger row. Returns false (and changes nothing) when the
/// wallet's rule would break: overdraft on hold, below held on adjust.
pub async fn apply<C: ConnectionTrait>(
    txn: &C,
    key_id: i64,
    kind: LedgerKind,
    amount: i64,
    note: Option<&str>,
    idempotency_key: Option<&str>,
) -> Result<bool, DbErr> {
    apply_for(txn, key_id, kind, amount, None, None, note, idempotency_key).await
}

/// The ledger row an admin movement with this Idempotency-Key wrote, if any.
pub async fn by_idempotency_key<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    idempotency_key: &str,
) -> Result<Option<entity::credit_ledger::Model>, DbErr> {
    use sea_orm::EntityTrait;
    entity::credit_ledger::Entity::find()
        .from_raw_sql(stmt(
            db.get_database_backend(),
            "SELECT * FROM credit_ledger WHERE api_key_id = $1 AND idempotency_key = $2",
            [key_id.into(), idempotency_key.into()],
        ))
        .one(db)
        .await
}

/// Like [`apply`], tied to a batch and item.
#[allow(clippy::too_many_arguments)]
pub async fn apply_for<C: ConnectionTrait>(
    txn: &C,
    key_id: i64,
    kind: LedgerKind,
    amount: i64,
    batch_id: Option<Uuid>,
    item_id: Option<Uuid>,
    note: Option<&str>,
    idempotency_key: Option<&str>,
) -> Result<bool, DbErr> {
    let backend = txn.get_database_backend();
    let now = Utc::now();
    let res = txn
        .execute_raw(stmt(
            backend,
            kind.wallet_sql(),
            match kind {
                LedgerKind::Grant | LedgerKind::Adjust => {
                    vec![key_id.into(), amount.into(), now.into(), MAX_BALANCE.into()]
                }
                _ => vec![key_id.into(), amount.into(), now.into()],
            },
        ))
        .await?;
    if res.rows_affected() != 1 {
        return Ok(false);
    }
    metrics::counter!("credits_total", "kind" => kind.as_str()).increment(amount.unsigned_abs());
    record(
        txn,
        key_id,
        kind,
        amount,
        batch_id,
        item_id,
        note,
        idempotency_key,
    )
    .await?;
    Ok(true)
}

/// Appends a ledger row (the wallet update is the caller's).
#[allow(clippy::too_many_arguments)]
pub async fn record<C: ConnectionTrait>(
    txn: &C,
    key_id: i64,
    kind: LedgerKind,
    amount: i64,
    batch_id: Option<Uuid>,
    item_id: Option<Uuid>,
    note: Option<&str>,
    idempotency_key: Option<&str>,
) -> Result<(), DbErr> {
    txn.execute_raw(stmt(
        txn.get_database_backend(),
        "INSERT INTO credit_ledger (api_key_id, kind, amount, batch_id, item_id, note, idempotency_key, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            key_id.into(),
            kind.as_str().into(),
            amount.into(),
            batch_id.into(),
            item_id.into(),
            note.map(str::to_string).into(),
            idempotency_key.map(str::to_string).into(),
            Utc::now().into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Reads a wallet.
pub async fn wallet<C: ConnectionTrait>(db: &C, key_id: i64) -> Result<Wallet, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT balance, held FROM credit_wallet WHERE api_key_id = $1",
            [key_id.into()],
        ))
        .await?;
    Ok(match row {
        Some(r) => Wallet {
            balance: r.try_get("", "balance")?,
            held: r.try_get("", "held")?,
        },
        None => Wallet {
            balance: 0,
            held: 0,
        },
    })
}

/// The newest ledger rows of a key, newest first; `before` pages by id.
pub async fn ledger<C: ConnectionTrait>(
    db: &C,
    key_id: i64,
    limit: u64,
    before: Option<i64>,
) -> Result<Vec<entity::credit_ledger::Model>, DbErr> {
    use entity::credit_ledger::{Column, Entity};
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    let mut q = Entity::find().filter(Column::ApiKeyId.eq(key_id));
    if let Some(b) = before {
        q = q.filter(Column::Id.lt(b));
    }
    q.order_by_desc(Column::Id).limit(limit).all(db).await
}
