//! Beginning and rolling back a group's transaction.
use sea_orm::{DatabaseConnection, DatabaseTransaction};

use crate::error::ApiError;

/// Begins a group's transaction. A pooled connection the database dropped (a restart) fails
/// at once, before anything ran: the group tries once more, on a connection checked first.
pub(super) async fn begin(db: &DatabaseConnection) -> Result<DatabaseTransaction, ApiError> {
    match crate::db::begin_write(db).await {
        Ok(txn) => Ok(txn),
        Err(e) => {
            let e = ApiError::from(e);
            match e.fault {
                Some(f) if f.kind == crate::fault::FaultKind::Unavailable => {
                    crate::db::begin_write(db).await.map_err(ApiError::from)
                }
                _ => Err(e),
            }
        }
    }
}

/// Rolls a failed group back; the connection decides on release whether it can be reused.
pub(super) async fn roll_back(txn: DatabaseTransaction) {
    if let Err(e) = txn.rollback().await {
        tracing::warn!(error = %e, "rolling a failed group back failed; its connection is closed");
    }
}
