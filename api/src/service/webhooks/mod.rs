//! Webhooks (Standard Webhooks v1), cut along their seams: signing, the SSRF target guard,
//! the outbox written with each state change, the dispatcher that sends, and admin queries.
pub mod admin;
pub mod customer;
pub mod dispatcher;
pub mod outbox;
pub mod signing;
pub mod target_guard;

pub use admin::{list, redeliver};
pub use dispatcher::{Attempt, claim_due, record_attempt, run_dispatcher, send};
pub use outbox::{enqueue_batch_event, enqueue_item_event};
pub use signing::{decode_whsec, sign, webhook_id};
pub use target_guard::{check_target, refuse_reason};
