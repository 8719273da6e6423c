//! Database schema migrations for video-batch-api (SQLite and PostgreSQL).
pub use sea_orm_migration::prelude::*;

mod m20261124_000001_create_tables;
mod m20261125_000001_usage_count;
mod m20261125_000002_retention_indexes;
mod m20261126_000001_key_policies;
mod m20261126_000002_completion_windows;
mod m20261202_000001_store_probe;
mod m20261202_100001_batch_open_counts;
mod m20261202_100002_usage_rollup;
mod m20261202_100003_batch_status_index;
mod m20261202_200001_failed_items;
mod m20261202_300001_webhook_operations;
mod m20261205_000001_accounts;

/// Every migration, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_create_tables::Migration),
            Box::new(m20261125_000001_usage_count::Migration),
            Box::new(m20261125_000002_retention_indexes::Migration),
            Box::new(m20261126_000001_key_policies::Migration),
            Box::new(m20261126_000002_completion_windows::Migration),
            Box::new(m20261202_000001_store_probe::Migration),
            Box::new(m20261202_100001_batch_open_counts::Migration),
            Box::new(m20261202_100002_usage_rollup::Migration),
            Box::new(m20261202_100003_batch_status_index::Migration),
            Box::new(m20261202_200001_failed_items::Migration),
            Box::new(m20261202_300001_webhook_operations::Migration),
            Box::new(m20261205_000001_accounts::Migration),
        ]
    }
}
