//! Credits: the wallet's limits and the kinds of movement the ledger records.
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The largest balance a wallet may hold (far below `i64::MAX`, so sums never overflow; SQLite
/// would silently turn an overflowing integer into a float).
pub const MAX_BALANCE: i64 = 1 << 53;

/// Kinds of ledger rows, stored through sea-orm (an unknown stored kind is refused).
pub use entity::status::LedgerKind;

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

/// A ledger row as it is written (owned: the rows units append wait for their group).
#[derive(Clone, Debug)]
pub struct LedgerRow {
    pub key_id: i64,
    pub kind: LedgerKind,
    pub amount: i64,
    pub batch_id: Option<Uuid>,
    pub item_id: Option<Uuid>,
    pub note: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
}
