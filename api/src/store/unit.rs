//! The transaction a unit of work sees: the group's transaction (or, when a group runs its
//! units one savepoint each, the unit's savepoint), through a thin recorder.
//!
//! The recorder does two things for the group commit:
//! - it notes whether the unit changed a row: a unit that fails having changed nothing can be
//!   answered without a savepoint to roll back to (the group's fast path);
//! - it holds the rows the unit appends to append-only tables (ledger, audit), which the group
//!   writes for all its units at once, one multi-row statement per table, before it commits
//!   ([`super::appended::write`]). This file names no table module: the tables use it.
//!
//! Statements go to the transaction as they are; nothing else is changed about them.
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, ExecResult, QueryResult, Statement,
};

use crate::domain::ids::AccountId;
use crate::domain::money::LedgerRow;
use crate::domain::usage::UsageRow;

/// What a unit appended, for the group to write.
#[derive(Default)]
pub struct Appended {
    /// Ledger rows, in the order the unit moved the credits.
    pub ledger: Vec<LedgerRow>,
    /// Audit rows, each with the time it was written.
    pub usage: Vec<(UsageRow, DateTime<Utc>)>,
    /// Wallet movements left to the group, summed per account: (balance, held) to add.
    pub wallets: BTreeMap<i64, (i64, i64)>,
}

impl Appended {
    /// Moves `other`'s rows after this one's.
    pub fn extend(&mut self, other: Appended) {
        self.ledger.extend(other.ledger);
        self.usage.extend(other.usage);
        for (key, (balance, held)) in other.wallets {
            let sum = self.wallets.entry(key).or_default();
            sum.0 += balance;
            sum.1 += held;
        }
    }

    /// True when nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.ledger.is_empty() && self.usage.is_empty() && self.wallets.is_empty()
    }

    /// Counts the credits the ledger rows moved in the metrics (once they are committed).
    pub fn count_committed(&self) {
        for row in &self.ledger {
            metrics::counter!("credits_total", "kind" => row.kind.as_str())
                .increment(row.amount.unsigned_abs());
        }
    }
}

/// What the units of one group share: where each key's next batch starts in the fair queue,
/// once a unit of the group has asked (the group's own inserts move it, so it is known
/// without asking the database again).
#[derive(Default)]
pub struct GroupMemo {
    fair_next: Mutex<HashMap<i64, i64>>,
    /// Wallet movements of the group's earlier units not applied yet (summed per account: balance,
    /// held), written by the group before it commits, or by a later unit that needs the
    /// wallet exact ([`Txn::settle_wallet`]).
    wallets: Mutex<BTreeMap<i64, (i64, i64)>>,
}

impl GroupMemo {
    /// Leaves a unit's wallet movements to the group (once the unit has succeeded).
    pub fn defer_wallets(&self, movements: BTreeMap<i64, (i64, i64)>) {
        let mut pending = self.wallets.lock().unwrap_or_else(|p| p.into_inner());
        for (key, (balance, held)) in movements {
            let sum = pending.entry(key).or_default();
            sum.0 += balance;
            sum.1 += held;
        }
    }

    /// The movements still left to the group, taken to be written.
    pub fn take_wallets(&self) -> BTreeMap<i64, (i64, i64)> {
        std::mem::take(&mut *self.wallets.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[derive(Default)]
struct Record {
    /// A statement changed at least one row, failed, or could not be told apart from one
    /// that did.
    changed: bool,
    appended: Appended,
}

/// A unit's transaction. It runs statements like the transaction it wraps (it is a
/// [`ConnectionTrait`]), and records what the group needs to know of them.
pub struct Txn<'a> {
    inner: &'a DatabaseTransaction,
    memo: &'a GroupMemo,
    record: Mutex<Record>,
}

impl<'a> Txn<'a> {
    /// The unit's view of `inner`, sharing `memo` with the other units of its group.
    pub fn new(inner: &'a DatabaseTransaction, memo: &'a GroupMemo) -> Self {
        Self {
            inner,
            memo,
            record: Mutex::new(Record::default()),
        }
    }

    /// The transaction itself.
    pub fn inner(&self) -> &DatabaseTransaction {
        self.inner
    }

    fn with<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        // A poisoned lock only means another thread panicked while holding it; the record is
        // still the best knowledge there is.
        let mut guard = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Appends a ledger row, written by the group with the others of its kind.
    pub fn append_ledger(&self, row: LedgerRow) {
        self.with(|r| r.appended.ledger.push(row));
    }

    /// Leaves a wallet movement to the group, which sums those of one key into one update.
    pub fn append_wallet(&self, key_id: i64, balance: i64, held: i64) {
        self.with(|r| {
            let sum = r.appended.wallets.entry(key_id).or_default();
            sum.0 += balance;
            sum.1 += held;
        });
    }

    /// Appends an audit row, written by the group with the others of its kind.
    pub fn append_usage(&self, row: UsageRow, at: DateTime<Utc>) {
        self.with(|r| r.appended.usage.push((row, at)));
    }

    /// True when the unit changed nothing so far: no statement changed a row or failed, and
    /// nothing was appended.
    pub fn changed_nothing(&self) -> bool {
        self.with(|r| !r.changed && r.appended.is_empty())
    }

    /// Hands over what the unit appended.
    pub fn take_appended(&self) -> Appended {
        self.with(|r| std::mem::take(&mut r.appended))
    }

    /// Applies the wallet movements of `key_id` that earlier units of the group left to it, so
    /// that what this unit reads of the wallet (a create's hold, its remaining credits and a
    /// low-credit crossing) is exact. Sends nothing when there are none (always on PostgreSQL,
    /// where units move wallets themselves).
    pub async fn settle_wallet(&self, key_id: i64) -> Result<(), DbErr> {
        let pending = self
            .memo
            .wallets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key_id);
        let Some((balance, held)) = pending else {
            return Ok(());
        };
        if super::wallets::add(self, AccountId(key_id), balance, held, chrono::Utc::now()).await? {
            Ok(())
        } else {
            Err(DbErr::Custom(format!(
                "the group's credit movements of key {key_id} break its wallet's rule"
            )))
        }
    }

    /// Where a new batch of `n` items of `key_id` starts in the fair queue: asked of the
    /// database (`ask`) the first time in the group, then advanced by the group's own
    /// batches, which the units of a key insert one after the other.
    pub async fn fair_start<F, Fut>(&self, key_id: i64, n: i64, ask: F) -> Result<i64, DbErr>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<i64, DbErr>>,
    {
        let known = self.memo_get(key_id);
        let start = match known {
            Some(next) => next,
            None => ask().await?,
        };
        let mut memo = self
            .memo
            .fair_next
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        memo.insert(key_id, start + n);
        Ok(start)
    }

    fn memo_get(&self, key_id: i64) -> Option<i64> {
        self.memo
            .fair_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key_id)
            .copied()
    }

    fn note_write(&self, rows: u64) {
        if rows > 0 {
            self.with(|r| r.changed = true);
        }
    }

    /// Notes a statement that returned `rows` rows (or failed).
    fn note_returned(&self, kind: Returning, rows: Result<usize, &DbErr>) {
        match rows {
            Err(_) => self.note_write(1),
            Ok(n) => match kind {
                Returning::Read => {}
                Returning::RowPerChange => self.note_write(n as u64),
                Returning::Unknown => self.note_write(1),
            },
        }
    }

    fn note<T>(&self, result: &Result<T, DbErr>) {
        if result.is_err() {
            // On PostgreSQL a failed statement aborts the transaction: nothing after it
            // counts, so the unit cannot be answered as if it changed nothing.
            self.with(|r| r.changed = true);
        }
    }
}

/// How a statement that returns rows may change them.
enum Returning {
    /// A plain `SELECT`: reads only (its row locks are released with the transaction).
    Read,
    /// `INSERT`/`UPDATE`/`DELETE … RETURNING`: one row per row changed.
    RowPerChange,
    /// Anything else (a `WITH` that may write): counted as a change.
    Unknown,
}

fn returning(sql: &str) -> Returning {
    let first_word = |part: &str| -> String {
        part.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    if sql.starts_with(super::sql::NO_ROW_NO_CHANGE) {
        return Returning::RowPerChange;
    }
    // Several statements sent as one (see `sql::run_together`) are read as one: reads only
    // when all are reads, one row per change when each returns its changed rows.
    let parts: Vec<&str> = sql.split(';').filter(|p| !p.trim().is_empty()).collect();
    if parts.iter().all(|p| first_word(p) == "SELECT") {
        return Returning::Read;
    }
    let each_returns_its_changes = parts.iter().all(|p| {
        matches!(first_word(p).as_str(), "INSERT" | "UPDATE" | "DELETE")
            && p.to_ascii_uppercase().contains("RETURNING")
    });
    if each_returns_its_changes {
        Returning::RowPerChange
    } else {
        Returning::Unknown
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Txn<'_> {
    fn get_database_backend(&self) -> DbBackend {
        self.inner.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let r = self.inner.execute_raw(stmt).await;
        self.note(&r);
        if let Ok(done) = &r {
            self.note_write(done.rows_affected());
        }
        r
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let r = self.inner.execute_unprepared(sql).await;
        // Unprepared text may hold several statements: counted as a change.
        self.note_write(1);
        r
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        let kind = returning(&stmt.sql);
        let r = self.inner.query_one_raw(stmt).await;
        self.note_returned(kind, r.as_ref().map(|row| usize::from(row.is_some())));
        r
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let kind = returning(&stmt.sql);
        let r = self.inner.query_all_raw(stmt).await;
        self.note_returned(kind, r.as_ref().map(Vec::len));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_told_apart_by_their_first_word() {
        assert!(matches!(returning("  select 1"), Returning::Read));
        assert!(matches!(
            returning("UPDATE t SET v = 1 RETURNING v"),
            Returning::RowPerChange
        ));
        assert!(matches!(
            returning("INSERT INTO t VALUES (1) RETURNING id"),
            Returning::RowPerChange
        ));
        // Without RETURNING its changes are not seen: counted as a change.
        assert!(matches!(
            returning("UPDATE t SET v = 1"),
            Returning::Unknown
        ));
        assert!(matches!(
            returning("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"),
            Returning::Unknown
        ));
    }

    /// Statements sent together share their values, return their rows in order, and count as
    /// a change exactly when one of them changed a row.
    #[tokio::test]
    async fn statements_sent_together_share_values_and_report_their_changes() {
        use sea_orm::TransactionTrait;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/u.db?mode=rwc", dir.path().display());
        let db = crate::db::connect_url(&url, 1, None).await.unwrap();
        db.execute_unprepared(
            "CREATE TABLE a (id INTEGER PRIMARY KEY, v INTEGER NOT NULL); \
             CREATE TABLE b (id INTEGER PRIMARY KEY, w INTEGER NOT NULL); \
             INSERT INTO a VALUES (1, 0); INSERT INTO b VALUES (1, 0)",
        )
        .await
        .unwrap();
        let parts = [
            "UPDATE a SET v = v + $2 WHERE id = $1 RETURNING 'a' AS part, v",
            "UPDATE b SET w = w + $2 WHERE id = $1 RETURNING 'b' AS part, w",
        ];
        let txn = db.begin().await.unwrap();
        let memo = GroupMemo::default();
        let t = Txn::new(&txn, &memo);
        let none = super::super::sql::run_together(&t, &parts, vec![9i64.into(), 5i64.into()])
            .await
            .unwrap();
        assert!(none.is_empty());
        assert!(t.changed_nothing(), "no row matched");
        let rows = super::super::sql::run_together(&t, &parts, vec![1i64.into(), 5i64.into()])
            .await
            .unwrap();
        let seen: Vec<(Option<String>, i64)> = rows
            .iter()
            .map(|r| {
                let part = super::super::sql::part_of(r);
                let col = if part.as_deref() == Some("a") {
                    "v"
                } else {
                    "w"
                };
                (part, r.try_get::<i64>("", col).unwrap())
            })
            .collect();
        assert_eq!(seen, [(Some("a".into()), 5), (Some("b".into()), 5)]);
        assert!(!t.changed_nothing());
        drop(t);
        txn.commit().await.unwrap();
    }

    #[test]
    fn statements_sent_together_are_read_as_one() {
        assert!(matches!(
            returning(
                "UPDATE a SET v = 1 RETURNING 'a' AS part;\nUPDATE b SET w = 2 RETURNING 'b' AS part"
            ),
            Returning::RowPerChange
        ));
        assert!(matches!(
            returning("UPDATE a SET v = 1;\nUPDATE b SET w = 2 RETURNING 'b' AS part"),
            Returning::Unknown
        ));
        assert!(matches!(returning("SELECT 1; SELECT 2"), Returning::Read));
        let marked = format!(
            "{}WITH w AS (UPDATE a SET v = 1 RETURNING v) SELECT v FROM w",
            super::super::sql::NO_ROW_NO_CHANGE
        );
        assert!(matches!(returning(&marked), Returning::RowPerChange));
    }
}
