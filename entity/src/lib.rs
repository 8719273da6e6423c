//! sea-orm entities, one module per table. No logic lives here.
pub mod account;
pub mod api_key;
pub mod batch_item;
pub mod batch_job;
pub mod charge_rollup;
pub mod credit_ledger;
pub mod credit_wallet;
pub mod prelude;
pub mod rate_limit_window;
pub mod status;
pub mod store_probe;
pub mod usage_event;
pub mod usage_rollup;
pub mod webhook_attempt;
pub mod webhook_delivery;
