//! `credit_wallet`: one row per account, `balance` and `held`. Every change is one conditional
//! update that keeps the wallet's rule (`0 <= held <= balance <= MAX_BALANCE`); the caller
//! appends the matching ledger row in the same transaction.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};

use super::sql::stmt;
use crate::domain::ids::AccountId;
use crate::domain::money::{LedgerKind, MAX_BALANCE, Wallet};

/// The statement of [`read`]: one row by its primary key.
pub(super) const READ: &str = "SELECT balance, held FROM credit_wallet WHERE api_key_id = $1";

/// Reads a wallet (a key without one has nothing).
pub async fn read<C: ConnectionTrait>(db: &C, account: AccountId) -> Result<Wallet, DbErr> {
    let row = db
        .query_one_raw(stmt(db.get_database_backend(), READ, [account.into()]))
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

/// Moves `amount` as `kind` says when the rule allows it: false (nothing changed) when it
/// would overdraw on a hold, or go below held or above the maximum on a grant or adjust.
pub async fn apply<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    kind: LedgerKind,
    amount: i64,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let (sql, values) = match kind {
        LedgerKind::Grant | LedgerKind::Adjust => (
            "UPDATE credit_wallet SET balance = balance + $2, updated_at = $3 \
             WHERE api_key_id = $1 AND balance + $2 >= held AND balance <= $4 - $2",
            vec![
                account.into(),
                amount.into(),
                now.into(),
                MAX_BALANCE.into(),
            ],
        ),
        LedgerKind::Hold => (
            "UPDATE credit_wallet SET held = held + $2, updated_at = $3 \
             WHERE api_key_id = $1 AND balance - held >= $2",
            vec![account.into(), amount.into(), now.into()],
        ),
        LedgerKind::Charge => (
            "UPDATE credit_wallet SET balance = balance - $2, held = held - $2, updated_at = $3 \
             WHERE api_key_id = $1 AND held >= $2",
            vec![account.into(), amount.into(), now.into()],
        ),
        LedgerKind::Release => (
            "UPDATE credit_wallet SET held = held - $2, updated_at = $3 \
             WHERE api_key_id = $1 AND held >= $2",
            vec![account.into(), amount.into(), now.into()],
        ),
    };
    let r = txn
        .execute_raw(stmt(txn.get_database_backend(), sql, values))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Adds `balance` and `held` (either may be negative) to a wallet in one update, when the
/// wallet's rule still holds after it: false (nothing changed) otherwise. For the charges and
/// releases of one key that a group sums (see [`super::unit`]).
pub async fn add<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    balance: i64,
    held: i64,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let r = txn
        .execute_raw(stmt(
            txn.get_database_backend(),
            "UPDATE credit_wallet SET balance = balance + $2, held = held + $3, updated_at = $4 \
             WHERE api_key_id = $1 AND held + $3 >= 0 AND balance + $2 >= held + $3 \
             AND balance + $2 <= $5",
            [
                account.into(),
                balance.into(),
                held.into(),
                now.into(),
                MAX_BALANCE.into(),
            ],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Holds `amount` when available (the create's hold): the wallet after it, or `None` when
/// the credits are not there (nothing changed).
pub async fn hold<C: ConnectionTrait>(
    txn: &C,
    account: AccountId,
    amount: i64,
    now: DateTime<Utc>,
) -> Result<Option<Wallet>, DbErr> {
    match txn
        .query_one_raw(stmt(
            txn.get_database_backend(),
            "UPDATE credit_wallet SET held = held + $2, updated_at = $3 \
             WHERE api_key_id = $1 AND balance - held >= $2 RETURNING balance, held",
            [account.into(), amount.into(), now.into()],
        ))
        .await?
    {
        Some(r) => Ok(Some(Wallet {
            balance: r.try_get("", "balance")?,
            held: r.try_get("", "held")?,
        })),
        None => Ok(None),
    }
}

/// Credits held over all wallets (for the gauge).
pub async fn total_held<C: ConnectionTrait>(db: &C) -> Result<i64, DbErr> {
    match db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT CAST(COALESCE(SUM(held), 0) AS BIGINT) AS n FROM credit_wallet",
            [],
        ))
        .await?
    {
        Some(r) => r.try_get("", "n"),
        None => Ok(0),
    }
}
