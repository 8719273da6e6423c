//! Admin queries on deliveries: listing and redelivery.
use chrono::Utc;
use entity::webhook_delivery;
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter};
use uuid::Uuid;

use crate::db::stmt;

/// Deliveries newest first, optionally by status and key.
pub async fn list(
    db: &DatabaseConnection,
    status: Option<&str>,
    key_id: Option<i64>,
    limit: u64,
) -> Result<Vec<webhook_delivery::Model>, DbErr> {
    use sea_orm::{QueryOrder, QuerySelect};
    let mut q = webhook_delivery::Entity::find();
    if let Some(s) = status {
        q = q.filter(webhook_delivery::Column::Status.eq(s));
    }
    if let Some(k) = key_id {
        q = q.filter(webhook_delivery::Column::ApiKeyId.eq(k));
    }
    q.order_by_desc(webhook_delivery::Column::CreatedAt)
        .limit(limit)
        .all(db)
        .await
}

/// Starts a new attempt series of a delivery (same `webhook-id`).
pub async fn redeliver(db: &DatabaseConnection, id: Uuid) -> Result<bool, DbErr> {
    let now = Utc::now();
    let res = db
        .execute_raw(stmt(
            db.get_database_backend(),
            // locked_until is kept: an attempt in flight finishes (and its lease ends) before
            // the delivery is claimed again, so it is never sent twice at once.
            "UPDATE webhook_delivery SET status = 'pending', attempt_count = 0, next_attempt_at = $2, \
             updated_at = $2 WHERE id = $1",
            [id.into(), now.into()],
        ))
        .await?;
    Ok(res.rows_affected() == 1)
}
