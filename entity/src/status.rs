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
        assert!(BatchState::try_from_value(&"done".to_string()).is_err());
        assert!(ItemState::try_from_value(&"".to_string()).is_err());
    }
}
