//! Wallet movements: every change of `balance` or `held` is one conditional update plus one
//! append-only ledger row, inside the caller's transaction.
use sea_orm::{ConnectionTrait, DbErr};

use crate::domain::ids::AccountId;
pub use crate::domain::money::{LedgerKind, MAX_BALANCE, Wallet};
pub use crate::store::ledger::{NewEntry, apply, apply_in};
use crate::store::{ledger, wallets};

/// The ledger row an admin movement with this Idempotency-Key wrote, if any.
pub async fn by_idempotency_key<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    idempotency_key: &str,
) -> Result<Option<entity::credit_ledger::Model>, DbErr> {
    ledger::by_idempotency_key(db, account, idempotency_key).await
}

/// Reads a wallet.
pub async fn wallet<C: ConnectionTrait>(db: &C, account: AccountId) -> Result<Wallet, DbErr> {
    wallets::read(db, account).await
}

/// The newest ledger rows of a key, newest first; `before` pages by id.
pub async fn ledger<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    limit: u64,
    before: Option<i64>,
) -> Result<Vec<entity::credit_ledger::Model>, DbErr> {
    ledger::page(db, account, before, limit).await
}

/// The wallet as customers and admins see it: balance, held, available and the newest
/// ledger rows (newest first; `before` pages by id). The one place the view is built.
pub async fn view<C: ConnectionTrait>(
    db: &C,
    account: AccountId,
    limit: u64,
    before: Option<i64>,
) -> Result<crate::schemas::credits::Credits, DbErr> {
    let w = wallet(db, account).await?;
    let rows = ledger(db, account, limit, before).await?;
    Ok(crate::schemas::credits::Credits {
        balance: w.balance,
        held: w.held,
        available: w.available(),
        ledger: rows.into_iter().map(Into::into).collect(),
    })
}
