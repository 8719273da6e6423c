//! Request and response bodies (`Object`s), per resource.
pub mod admin;
pub mod batches;
pub mod credits;
pub mod text;
pub mod webhooks;
pub mod worker;
