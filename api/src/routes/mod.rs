//! HTTP routes, one file per resource; `startup.rs` mounts them.
pub mod admin;
pub mod batches;
pub mod documents;
pub mod health;
pub mod webhooks;
pub mod worker;
