//! Credits: the wallet's limits and the kinds of movement the ledger records.

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
