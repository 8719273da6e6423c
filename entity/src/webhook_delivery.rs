//! One webhook event to one target: an outbox row retried until success or exhaustion.
use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "webhook_delivery")]
pub struct Model {
    /// Also the `webhook-id` (as `msg_<simple uuid>`), stable across attempts.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The owning account (`account.id`): the column keeps the name it had before accounts,
    /// when each key was its own account with the key's id.
    pub api_key_id: i64,
    pub batch_id: Option<Uuid>,
    pub event_type: String,
    pub payload: String,
    pub target_url: String,
    /// pending, succeeded or failed.
    pub status: String,
    pub attempt_count: i32,
    pub next_attempt_at: DateTimeUtc,
    pub locked_until: Option<DateTimeUtc>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub delivered_at: Option<DateTimeUtc>,
    /// Set while its endpoint is disabled: not sent until the endpoint is enabled again.
    pub held_at: Option<DateTimeUtc>,
    /// The `Idempotency-Key` of the customer's last resend.
    pub resend_key: Option<String>,
    /// When a customer's recover sent it again (once per delivery).
    pub recovered_at: Option<DateTimeUtc>,
}

impl ActiveModelBehavior for ActiveModel {}
