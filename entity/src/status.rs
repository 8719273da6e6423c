//! Status columns as enums: a row is read only if its status is one of these (any other value
//! is refused with an error, never guessed), and written only as one of these.
use sea_orm::entity::prelude::*;

/// `batch_job.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum BatchState {
    #[sea_orm(string_value = "queued")]
    Queued,
    #[sea_orm(string_value = "processing")]
    Processing,
    #[sea_orm(string_value = "completed")]
    Completed,
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
    #[sea_orm(string_value = "expired")]
    Expired,
}

impl BatchState {
    /// True once the batch can change no more (`completed`, `cancelled`, `expired`).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Expired)
    }
}

/// `batch_item.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum ItemState {
    #[sea_orm(string_value = "queued")]
    Queued,
    #[sea_orm(string_value = "running")]
    Running,
    #[sea_orm(string_value = "succeeded")]
    Succeeded,
    #[sea_orm(string_value = "failed")]
    Failed,
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
    #[sea_orm(string_value = "expired")]
    Expired,
}

/// `credit_ledger.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum LedgerKind {
    /// Credits bought or granted: balance += amount.
    #[sea_orm(string_value = "grant")]
    Grant,
    /// Credits reserved for a batch: held += amount.
    #[sea_orm(string_value = "hold")]
    Hold,
    /// A succeeded item: balance -= amount, held -= amount.
    #[sea_orm(string_value = "charge")]
    Charge,
    /// A failed, cancelled or expired item: held -= amount.
    #[sea_orm(string_value = "release")]
    Release,
    /// Admin correction (may be negative): balance += amount, never below held.
    #[sea_orm(string_value = "adjust")]
    Adjust,
}

impl LedgerKind {
    /// The stored name (also the `kind` label of the credits metric).
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

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ActiveEnum, Iterable};

    #[test]
    fn stored_names_round_trip_and_unknown_names_are_refused() {
        for s in BatchState::iter() {
            assert_eq!(BatchState::try_from_value(&s.to_value()).unwrap(), s);
        }
        for s in ItemState::iter() {
            assert_eq!(ItemState::try_from_value(&s.to_value()).unwrap(), s);
        }
        for k in LedgerKind::iter() {
            assert_eq!(k.to_value(), k.as_str());
            assert_eq!(LedgerKind::try_from_value(&k.to_value()).unwrap(), k);
        }
        assert!(LedgerKind::try_from_value(&"refund".to_string()).is_err());
        assert!(BatchState::try_from_value(&"done".to_string()).is_err());
        assert!(ItemState::try_from_value(&"".to_string()).is_err());
    }
}
