//! Writes what a group's units appended, before the group commits: the wallet movements summed
//! per account (one update each), the ledger rows and the audit rows (one multi-row statement per
//! table and chunk). The one place the group-commit engine meets the tables.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};

use super::unit::Appended;
use crate::domain::ids::AccountId;
use crate::domain::usage::UsageRow;

/// Writes `a`'s rows. A wallet whose rule the sum would break fails the write.
pub async fn write<C: ConnectionTrait>(db: &C, a: &Appended) -> Result<(), DbErr> {
    let now = Utc::now();
    for (&key, &(balance, held)) in &a.wallets {
        if !super::wallets::add(db, AccountId(key), balance, held, now).await? {
            return Err(DbErr::Custom(format!(
                "the group's credit movements of key {key} break its wallet's rule"
            )));
        }
    }
    super::ledger::insert_many(db, &a.ledger).await?;
    let usage: Vec<(&UsageRow, DateTime<Utc>)> = a.usage.iter().map(|(r, at)| (r, *at)).collect();
    super::usage::insert_many(db, &usage).await
}

/// Writes what a unit run on its own (outside a group: the benchmark's one-commit-per-call
/// loops) appended, into its transaction now.
pub async fn write_unit(txn: &super::unit::Txn<'_>) -> Result<(), DbErr> {
    write(txn, &txn.take_appended()).await
}
