//! Entity re-exports.
pub use super::account::Entity as Account;
pub use super::api_key::Entity as ApiKey;
pub use super::batch_item::Entity as BatchItem;
pub use super::batch_job::Entity as BatchJob;
pub use super::charge_rollup::Entity as ChargeRollup;
pub use super::credit_ledger::Entity as CreditLedger;
pub use super::credit_wallet::Entity as CreditWallet;
pub use super::rate_limit_window::Entity as RateLimitWindow;
pub use super::store_probe::Entity as StoreProbe;
pub use super::usage_event::Entity as UsageEvent;
pub use super::usage_rollup::Entity as UsageRollup;
pub use super::webhook_attempt::Entity as WebhookAttempt;
pub use super::webhook_delivery::Entity as WebhookDelivery;
