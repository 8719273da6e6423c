//! HTTP routes, one file per resource; `startup.rs` mounts them.
pub mod admin;
pub mod batches;
pub mod health;
pub mod worker;
