//! Admin queries on deliveries: listing and redelivery.
use chrono::Utc;
use entity::webhook_delivery;
use sea_orm::{DatabaseConnection, DbErr};
use uuid::Uuid;

use crate::store::webhooks;

/// Deliveries newest first, optionally by status and key.
pub async fn list(
    db: &DatabaseConnection,
    status: Option<&str>,
    key_id: Option<i64>,
    limit: u64,
) -> Result<Vec<webhook_delivery::Model>, DbErr> {
    webhooks::page(db, status, key_id, limit).await
}

/// Starts a new attempt series of a delivery (same `webhook-id`).
pub async fn redeliver(db: &DatabaseConnection, id: Uuid) -> Result<bool, DbErr> {
    webhooks::restart(db, id, Utc::now()).await
}
