//! The whole initial schema: keys, wallets, ledger, rate windows, usage, batches, items, webhooks.
use sea_orm_migration::{prelude::*, schema::*};

/// Creates every table the service needs.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKey {
    Table,
    Id,
    Name,
    KeySha256,
    Disabled,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum CreditWallet {
    Table,
    ApiKeyId,
    Balance,
    Held,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum CreditLedger {
    Table,
    Id,
    ApiKeyId,
    Kind,
    Amount,
    BatchId,
    ItemId,
    Note,
    IdempotencyKey,
    CreatedAt,
}

#[derive(DeriveIden)]
enum RateLimitWindow {
    Table,
    ApiKeyId,
    Scope,
    WindowStart,
    Count,
}

#[derive(DeriveIden)]
enum UsageEvent {
    Table,
    Id,
    ApiKeyId,
    RequestId,
    Method,
    Path,
    Status,
    ErrorCode,
    ClientIp,
    UserAgent,
    MinuteBucket,
    LatencyUs,
    BatchId,
    Items,
    Credits,
    CreatedAt,
}

#[derive(DeriveIden)]
enum BatchJob {
    Table,
    Id,
    ApiKeyId,
    RequestId,
    Fingerprint,
    Status,
    TotalCount,
    SucceededCount,
    FailedCount,
    CancelledCount,
    CostPerVideo,
    RequiredCredits,
    WebhookUrl,
    Metadata,
    Response,
    CreatedAt,
    UpdatedAt,
    CancelRequestedAt,
    CompletedAt,
}

#[derive(DeriveIden)]
enum BatchItem {
    Table,
    Id,
    BatchId,
    ApiKeyId,
    Idx,
    Prompt,
    Params,
    Status,
    Attempts,
    FairPos,
    LeaseToken,
    WorkerId,
    LeaseExpiresAt,
    ResultUrl,
    Result,
    Error,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum WebhookDelivery {
    Table,
    Id,
    ApiKeyId,
    BatchId,
    EventType,
    Payload,
    TargetUrl,
    Status,
    AttemptCount,
    NextAttemptAt,
    LockedUntil,
    LastStatusCode,
    LastError,
    CreatedAt,
    UpdatedAt,
    DeliveredAt,
}

#[derive(DeriveIden)]
enum WebhookAttempt {
    Table,
    Id,
    DeliveryId,
    Attempt,
    StatusCode,
    Error,
    DurationMs,
    CreatedAt,
}

fn fk_key(from: impl IntoIden, table: impl IntoIden) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .from_col(from)
        .to(ApiKey::Table, ApiKey::Id)
        .on_delete(ForeignKeyAction::Restrict)
        .to_owned()
        .from_tbl(table)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKey::Table)
                    .col(big_pk_auto(ApiKey::Id))
                    .col(string_len_uniq(ApiKey::Name, 64))
                    .col(string_len_uniq(ApiKey::KeySha256, 64))
                    .col(boolean(ApiKey::Disabled).default(false))
                    .col(timestamp_with_time_zone(ApiKey::CreatedAt))
                    .col(timestamp_with_time_zone(ApiKey::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(CreditWallet::Table)
                    .col(big_integer(CreditWallet::ApiKeyId).primary_key())
                    .col(big_integer(CreditWallet::Balance).default(0))
                    .col(big_integer(CreditWallet::Held).default(0))
                    .col(timestamp_with_time_zone(CreditWallet::UpdatedAt))
                    .check(Expr::cust("held >= 0 AND balance >= held"))
                    .foreign_key(&mut fk_key(CreditWallet::ApiKeyId, CreditWallet::Table))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(CreditLedger::Table)
                    .col(big_pk_auto(CreditLedger::Id))
                    .col(big_integer(CreditLedger::ApiKeyId))
                    .col(string_len(CreditLedger::Kind, 16))
                    .col(big_integer(CreditLedger::Amount))
                    .col(uuid_null(CreditLedger::BatchId))
                    .col(uuid_null(CreditLedger::ItemId))
                    .col(text_null(CreditLedger::Note))
                    .col(string_len_null(CreditLedger::IdempotencyKey, 255))
                    .col(timestamp_with_time_zone(CreditLedger::CreatedAt))
                    .check(Expr::cust(
                        "kind IN ('grant','hold','charge','release','adjust') \
                         AND (kind = 'adjust' OR amount > 0)",
                    ))
                    .foreign_key(&mut fk_key(CreditLedger::ApiKeyId, CreditLedger::Table))
                    .index(
                        Index::create()
                            .name("uq_credit_ledger_idempotency")
                            .col(CreditLedger::ApiKeyId)
                            .col(CreditLedger::IdempotencyKey)
                            .unique(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_credit_ledger_key_id")
                    .table(CreditLedger::Table)
                    .col(CreditLedger::ApiKeyId)
                    .col(CreditLedger::Id)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(RateLimitWindow::Table)
                    .col(big_integer(RateLimitWindow::ApiKeyId))
                    .col(string_len(RateLimitWindow::Scope, 16))
                    .col(big_integer(RateLimitWindow::WindowStart))
                    .col(big_integer(RateLimitWindow::Count))
                    .primary_key(
                        Index::create()
                            .col(RateLimitWindow::ApiKeyId)
                            .col(RateLimitWindow::Scope)
                            .col(RateLimitWindow::WindowStart),
                    )
                    .foreign_key(&mut fk_key(
                        RateLimitWindow::ApiKeyId,
                        RateLimitWindow::Table,
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_rate_limit_window_start")
                    .table(RateLimitWindow::Table)
                    .col(RateLimitWindow::WindowStart)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(UsageEvent::Table)
                    .col(big_pk_auto(UsageEvent::Id))
                    .col(big_integer_null(UsageEvent::ApiKeyId))
                    .col(string_len_null(UsageEvent::RequestId, 255))
                    .col(string_len(UsageEvent::Method, 16))
                    .col(text(UsageEvent::Path))
                    .col(integer(UsageEvent::Status))
                    .col(string_len_null(UsageEvent::ErrorCode, 32))
                    .col(string_len_null(UsageEvent::ClientIp, 64))
                    .col(text_null(UsageEvent::UserAgent))
                    .col(timestamp_with_time_zone(UsageEvent::MinuteBucket))
                    .col(big_integer(UsageEvent::LatencyUs))
                    .col(uuid_null(UsageEvent::BatchId))
                    .col(integer(UsageEvent::Items).default(0))
                    .col(big_integer(UsageEvent::Credits).default(0))
                    .col(timestamp_with_time_zone(UsageEvent::CreatedAt))
                    .foreign_key(&mut fk_key(UsageEvent::ApiKeyId, UsageEvent::Table))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_usage_event_key_bucket")
                    .table(UsageEvent::Table)
                    .col(UsageEvent::ApiKeyId)
                    .col(UsageEvent::MinuteBucket)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BatchJob::Table)
                    .col(pk_uuid(BatchJob::Id))
                    .col(big_integer(BatchJob::ApiKeyId))
                    .col(string_len(BatchJob::RequestId, 255))
                    .col(string_len(BatchJob::Fingerprint, 64))
                    .col(string_len(BatchJob::Status, 16))
                    .col(integer(BatchJob::TotalCount))
                    .col(integer(BatchJob::SucceededCount).default(0))
                    .col(integer(BatchJob::FailedCount).default(0))
                    .col(integer(BatchJob::CancelledCount).default(0))
                    .col(big_integer(BatchJob::CostPerVideo))
                    .col(big_integer(BatchJob::RequiredCredits))
                    .col(text_null(BatchJob::WebhookUrl))
                    .col(text_null(BatchJob::Metadata))
                    .col(text(BatchJob::Response))
                    .col(timestamp_with_time_zone(BatchJob::CreatedAt))
                    .col(timestamp_with_time_zone(BatchJob::UpdatedAt))
                    .col(timestamp_with_time_zone_null(BatchJob::CancelRequestedAt))
                    .col(timestamp_with_time_zone_null(BatchJob::CompletedAt))
                    .check(Expr::cust(
                        "status IN ('queued','processing','completed','cancelled') \
                         AND succeeded_count + failed_count + cancelled_count <= total_count",
                    ))
                    .foreign_key(&mut fk_key(BatchJob::ApiKeyId, BatchJob::Table))
                    .index(
                        Index::create()
                            .name("uq_batch_job_key_request_id")
                            .col(BatchJob::ApiKeyId)
                            .col(BatchJob::RequestId)
                            .unique(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_batch_job_key_id")
                    .table(BatchJob::Table)
                    .col(BatchJob::ApiKeyId)
                    .col(BatchJob::Id)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BatchItem::Table)
                    .col(pk_uuid(BatchItem::Id))
                    .col(uuid(BatchItem::BatchId))
                    .col(big_integer(BatchItem::ApiKeyId))
                    .col(integer(BatchItem::Idx))
                    .col(text(BatchItem::Prompt))
                    .col(text_null(BatchItem::Params))
                    .col(string_len(BatchItem::Status, 16))
                    .col(integer(BatchItem::Attempts).default(0))
                    .col(big_integer(BatchItem::FairPos))
                    .col(uuid_null(BatchItem::LeaseToken))
                    .col(string_len_null(BatchItem::WorkerId, 128))
                    .col(timestamp_with_time_zone_null(BatchItem::LeaseExpiresAt))
                    .col(text_null(BatchItem::ResultUrl))
                    .col(text_null(BatchItem::Result))
                    .col(text_null(BatchItem::Error))
                    .col(timestamp_with_time_zone(BatchItem::CreatedAt))
                    .col(timestamp_with_time_zone(BatchItem::UpdatedAt))
                    .check(Expr::cust(
                        "status IN ('queued','running','succeeded','failed','cancelled')",
                    ))
                    .foreign_key(
                        ForeignKey::create()
                            .from(BatchItem::Table, BatchItem::BatchId)
                            .to(BatchJob::Table, BatchJob::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(&mut fk_key(BatchItem::ApiKeyId, BatchItem::Table))
                    .index(
                        Index::create()
                            .name("uq_batch_item_batch_idx")
                            .col(BatchItem::BatchId)
                            .col(BatchItem::Idx)
                            .unique(),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WebhookDelivery::Table)
                    .col(pk_uuid(WebhookDelivery::Id))
                    .col(big_integer(WebhookDelivery::ApiKeyId))
                    .col(uuid_null(WebhookDelivery::BatchId))
                    .col(string_len(WebhookDelivery::EventType, 32))
                    .col(text(WebhookDelivery::Payload))
                    .col(text(WebhookDelivery::TargetUrl))
                    .col(string_len(WebhookDelivery::Status, 16))
                    .col(integer(WebhookDelivery::AttemptCount).default(0))
                    .col(timestamp_with_time_zone(WebhookDelivery::NextAttemptAt))
                    .col(timestamp_with_time_zone_null(WebhookDelivery::LockedUntil))
                    .col(integer_null(WebhookDelivery::LastStatusCode))
                    .col(text_null(WebhookDelivery::LastError))
                    .col(timestamp_with_time_zone(WebhookDelivery::CreatedAt))
                    .col(timestamp_with_time_zone(WebhookDelivery::UpdatedAt))
                    .col(timestamp_with_time_zone_null(WebhookDelivery::DeliveredAt))
                    .check(Expr::cust("status IN ('pending','succeeded','failed')"))
                    .foreign_key(&mut fk_key(
                        WebhookDelivery::ApiKeyId,
                        WebhookDelivery::Table,
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_webhook_delivery_key_created")
                    .table(WebhookDelivery::Table)
                    .col(WebhookDelivery::ApiKeyId)
                    .col(WebhookDelivery::CreatedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WebhookAttempt::Table)
                    .col(big_pk_auto(WebhookAttempt::Id))
                    .col(uuid(WebhookAttempt::DeliveryId))
                    .col(integer(WebhookAttempt::Attempt))
                    .col(integer_null(WebhookAttempt::StatusCode))
                    .col(text_null(WebhookAttempt::Error))
                    .col(big_integer(WebhookAttempt::DurationMs))
                    .col(timestamp_with_time_zone(WebhookAttempt::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(WebhookAttempt::Table, WebhookAttempt::DeliveryId)
                            .to(WebhookDelivery::Table, WebhookDelivery::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        // Partial indexes for the hot paths; the same SQL works on SQLite and PostgreSQL.
        let db = manager.get_connection();
        for sql in [
            // Claim: next queued item in fair order.
            "CREATE INDEX ix_batch_item_queued_fair ON batch_item (fair_pos, created_at) WHERE status = 'queued'",
            // Fair queuing: the tail of a key's queued items.
            "CREATE INDEX ix_batch_item_key_queued ON batch_item (api_key_id, fair_pos) WHERE status = 'queued'",
            // Lease reaper: running items by lease expiry.
            "CREATE INDEX ix_batch_item_running_lease ON batch_item (lease_expires_at) WHERE status = 'running'",
            // Dispatcher: due pending deliveries.
            "CREATE INDEX ix_webhook_delivery_due ON webhook_delivery (next_attempt_at) WHERE status = 'pending'",
            "CREATE INDEX ix_webhook_attempt_delivery ON webhook_attempt (delivery_id, attempt)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            WebhookAttempt::Table.into_iden(),
            WebhookDelivery::Table.into_iden(),
            BatchItem::Table.into_iden(),
            BatchJob::Table.into_iden(),
            UsageEvent::Table.into_iden(),
            RateLimitWindow::Table.into_iden(),
            CreditLedger::Table.into_iden(),
            CreditWallet::Table.into_iden(),
            ApiKey::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
