//! `store_probe`: the readiness probe's write, proof that the store takes writes again.
use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, Set};

use entity::store_probe;

/// Rewrites the probe's one row (a real write: it needs the store to accept a page).
pub async fn touch<C: ConnectionTrait>(db: &C, now: DateTime<Utc>) -> Result<(), DbErr> {
    store_probe::Entity::insert(store_probe::ActiveModel {
        id: Set(1),
        probed_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(store_probe::Column::Id)
            .update_column(store_probe::Column::ProbedAt)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await
    .map(|_| ())
}
