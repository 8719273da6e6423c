//! Business logic, callable without HTTP: each function takes a connection or transaction.
pub mod batches;
pub mod credits;
pub mod fair_share;
pub mod keys;
pub mod leases;
pub mod rate_limit;
pub mod retention;
pub mod retry;
pub mod usage;
pub mod validate;
pub mod views;
pub mod webhooks;
pub mod windows;
