//! Webhook operations for customers: each attempt's error kind and the first 1 KB of the
//! answer; a delivery's hold (its endpoint is disabled), the Idempotency-Key of its last
//! resend and when a recover sent it again; the endpoints a key sends to, with their state;
//! and an index to list a key's deliveries newest first.
use sea_orm_migration::{prelude::*, schema::*};

/// Adds the columns, the endpoint table and the index.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum WebhookDelivery {
    Table,
    HeldAt,
    ResendKey,
    RecoveredAt,
}

#[derive(DeriveIden)]
enum WebhookAttempt {
    Table,
    ErrorKind,
    ResponseExcerpt,
}

#[derive(DeriveIden)]
enum WebhookEndpoint {
    Table,
    ApiKeyId,
    Url,
    FailingSince,
    LastSuccessAt,
    LastFailureAt,
    DisabledAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            timestamp_with_time_zone_null(WebhookDelivery::HeldAt).to_owned(),
            string_len_null(WebhookDelivery::ResendKey, 255).to_owned(),
            timestamp_with_time_zone_null(WebhookDelivery::RecoveredAt).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(WebhookDelivery::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        for col in [
            string_len_null(WebhookAttempt::ErrorKind, 32).to_owned(),
            text_null(WebhookAttempt::ResponseExcerpt).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(WebhookAttempt::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(WebhookEndpoint::Table)
                    .col(big_integer(WebhookEndpoint::ApiKeyId))
                    .col(text(WebhookEndpoint::Url))
                    .col(timestamp_with_time_zone_null(WebhookEndpoint::FailingSince))
                    .col(timestamp_with_time_zone_null(
                        WebhookEndpoint::LastSuccessAt,
                    ))
                    .col(timestamp_with_time_zone_null(
                        WebhookEndpoint::LastFailureAt,
                    ))
                    .col(timestamp_with_time_zone_null(WebhookEndpoint::DisabledAt))
                    .col(timestamp_with_time_zone(WebhookEndpoint::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(WebhookEndpoint::ApiKeyId)
                            .col(WebhookEndpoint::Url),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX ix_webhook_delivery_key_id ON webhook_delivery (api_key_id, id)",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX ix_webhook_delivery_key_id")
            .await?;
        manager
            .drop_table(Table::drop().table(WebhookEndpoint::Table).to_owned())
            .await?;
        for col in [WebhookAttempt::ErrorKind, WebhookAttempt::ResponseExcerpt] {
            manager
                .alter_table(
                    Table::alter()
                        .table(WebhookAttempt::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        for col in [
            WebhookDelivery::HeldAt,
            WebhookDelivery::ResendKey,
            WebhookDelivery::RecoveredAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(WebhookDelivery::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
