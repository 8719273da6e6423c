//! `/api/admin`: credits, keys, usage and config reload for operators.
use std::sync::Arc;

use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use sea_orm::SqlErr;

use crate::auth::AdminAuth;
use crate::domain::ids::KeyId;
use crate::error::{ApiError, ErrorCode};
use crate::schemas::admin::{
    AdjustRequest, AdminWallet, DeliveryStatus, GrantRequest, KeyInfo, ReloadResult,
    WebhookDeliveryView,
};
use crate::schemas::credits::Usage;
use crate::schemas::text::Text;
use crate::service::credits::{self, LedgerKind};
use crate::service::{keys, usage};
use crate::state::AppState;

/// Groups of the admin API.
#[derive(Tags)]
pub enum AdminTags {
    /// Wallets and ledgers.
    Credits,
    /// Keys, usage and configuration.
    Keys,
    /// Webhook deliveries.
    Webhooks,
}

/// The admin API.
pub struct AdminApi;

impl AdminApi {
    async fn key_id(state: &AppState, name: &str) -> Result<i64, ApiError> {
        keys::id_by_name(&state.db, name)
            .await?
            .ok_or_else(|| ApiError::not_found("key", name))
    }

    async fn wallet_view(
        state: &AppState,
        name: &str,
        key_id: i64,
        limit: u64,
        before: Option<i64>,
    ) -> Result<AdminWallet, ApiError> {
        let view = credits::view(&state.db, KeyId(key_id), limit, before).await?;
        Ok(AdminWallet {
            key: name.to_string(),
            balance: view.balance,
            held: view.held,
            available: view.available,
            ledger: view.ledger,
        })
    }

    async fn movement(
        state: &AppState,
        name: &str,
        kind: LedgerKind,
        amount: i64,
        note: Option<String>,
        idem: Option<String>,
    ) -> Result<AdminWallet, ApiError> {
        if let Some(k) = &idem {
            crate::domain::RequestId::parse("Idempotency-Key", k)?;
        }
        let key_id = Self::key_id(state, name).await?;
        let runtime = state.runtime();
        let applied = state
            .writes
            .run(Some(key_id), {
                let (note, idem) = (note.clone(), idem.clone());
                move |txn| {
                    let (note, idem) = (note.clone(), idem.clone());
                    let runtime = Arc::clone(&runtime);
                    Box::pin(async move {
                        if let Some(k) = idem.as_deref()
                            && let Some(earlier) =
                                credits::by_idempotency_key(txn, KeyId(key_id), k).await?
                        {
                            return same_movement(&earlier, kind, amount, note.as_deref(), k);
                        }
                        let entry = credits::NewEntry::new(key_id, kind, amount)
                            .note(note.as_deref())
                            .idempotency_key(idem.as_deref());
                        match credits::apply(txn, entry).await {
                            Ok(true) => {
                                let w = credits::wallet(txn, KeyId(key_id)).await?;
                                crate::service::webhooks::outbox::enqueue_low_credits(
                                    txn,
                                    &runtime,
                                    KeyId(key_id),
                                    w.available() - amount,
                                    w.available(),
                                    chrono::Utc::now(),
                                )
                                .await?;
                                Ok(())
                            }
                            Ok(false) => {
                                let w = credits::wallet(txn, KeyId(key_id)).await?;
                                Err(ApiError::new(
                                ErrorCode::Conflict,
                                format!(
                                    "{amount} credits would leave the balance below the {} credits \
                                     held or above the maximum of {}",
                                    w.held,
                                    credits::MAX_BALANCE
                                ),
                            )
                            .with_details(
                                serde_json::json!({ "balance": w.balance, "held": w.held }),
                            ))
                            }
                            Err(e)
                                if matches!(
                                    e.sql_err(),
                                    Some(SqlErr::UniqueConstraintViolation(_))
                                ) =>
                            {
                                // Rolled back to the savepoint; answered below as a repeat.
                                Err(ApiError::new(ErrorCode::IdempotencyConflict, REPEATED))
                            }
                            Err(e) => Err(e.into()),
                        }
                    })
                }
            })
            .await;
        match applied {
            Ok(()) => {}
            // A concurrent movement with the same Idempotency-Key won: compare with it.
            Err(e) if e.code == ErrorCode::IdempotencyConflict && e.message == REPEATED => {
                if let Some(k) = idem.as_deref()
                    && let Some(earlier) =
                        credits::by_idempotency_key(&state.db, KeyId(key_id), k).await?
                {
                    same_movement(&earlier, kind, amount, note.as_deref(), k)?;
                }
            }
            Err(e) => return Err(e),
        }
        Self::wallet_view(state, name, key_id, 20, None).await
    }
}

/// A repeat of an earlier movement (same Idempotency-Key) is answered with the wallet and
/// changes nothing; the same key with another kind, amount or note is a 409, as for creates.
fn same_movement(
    earlier: &entity::credit_ledger::Model,
    kind: LedgerKind,
    amount: i64,
    note: Option<&str>,
    key: &str,
) -> Result<(), ApiError> {
    if earlier.kind == kind && earlier.amount == amount && earlier.note.as_deref() == note {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::IdempotencyConflict,
            format!("Idempotency-Key {key:?} was already used for a different movement"),
        )
        .with_details(serde_json::json!({ "ledger_id": earlier.id })))
    }
}

/// Marker of a movement whose Idempotency-Key was applied before (never sent to a client).
const REPEATED: &str = "idempotency key already applied";

#[OpenApi(prefix_path = "/")]
impl AdminApi {
    /// Grant credits
    ///
    /// Adds credits to a key's balance. Retrying with the same `Idempotency-Key` grants once.
    #[oai(
        path = "/keys/:key/credits/grant",
        method = "post",
        operation_id = "grant_credits",
        tag = "AdminTags::Credits"
    )]
    async fn grant(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        key: Path<String>,
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        body: Json<GrantRequest>,
        req: &poem::Request,
    ) -> Result<Json<AdminWallet>, ApiError> {
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key.0)?;
        Ok(Json(
            Self::movement(
                &state,
                &key.0,
                LedgerKind::Grant,
                body.0.amount,
                body.0.note.map(Text::into_string),
                idempotency_key.0,
            )
            .await?,
        ))
    }

    /// Adjust credits
    ///
    /// Adds or (negative amount) removes credits; the balance never drops below what is held.
    #[oai(
        path = "/keys/:key/credits/adjust",
        method = "post",
        operation_id = "adjust_credits",
        tag = "AdminTags::Credits"
    )]
    async fn adjust(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        key: Path<String>,
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        body: Json<AdjustRequest>,
        req: &poem::Request,
    ) -> Result<Json<AdminWallet>, ApiError> {
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key.0)?;
        if body.0.amount == 0 {
            return Err(ApiError::validation("amount", "must not be 0"));
        }
        Ok(Json(
            Self::movement(
                &state,
                &key.0,
                LedgerKind::Adjust,
                body.0.amount,
                body.0.note.map(Text::into_string),
                idempotency_key.0,
            )
            .await?,
        ))
    }

    /// Get a key's wallet and ledger
    ///
    /// Ledger newest first; page with `before` (a ledger id).
    #[oai(
        path = "/keys/:key/credits",
        method = "get",
        operation_id = "get_key_credits",
        tag = "AdminTags::Credits"
    )]
    async fn wallet(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        key: Path<String>,
        /// Ledger rows, 1–500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
        /// Only ledger rows with a smaller id.
        before: Query<Option<i64>>,
    ) -> Result<Json<AdminWallet>, ApiError> {
        let id = Self::key_id(&state, &key.0).await?;
        Ok(Json(
            Self::wallet_view(
                &state,
                &key.0,
                id,
                u64::from(limit.0.unwrap_or(50)),
                before.0,
            )
            .await?,
        ))
    }

    /// Get a key's usage
    ///
    /// Calls and credits charged per UTC day, `from` to `to` inclusive (default: the last 30
    /// days). `from` must not be after `to`, and the period spans at most 366 days (422
    /// otherwise).
    #[oai(
        path = "/keys/:key/usage",
        method = "get",
        operation_id = "get_key_usage",
        tag = "AdminTags::Keys"
    )]
    async fn key_usage(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        key: Path<String>,
        /// First day (UTC).
        #[oai(validator(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
        from: Query<Option<String>>,
        /// Last day (UTC), inclusive.
        #[oai(validator(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
        to: Query<Option<String>>,
    ) -> Result<Json<Usage>, ApiError> {
        let id = Self::key_id(&state, &key.0).await?;
        Ok(Json(
            usage::report(
                &state.db,
                KeyId(id),
                state.clock.now().date_naive(),
                from.0.as_deref(),
                to.0.as_deref(),
            )
            .await?,
        ))
    }

    /// List keys
    ///
    /// Every configured key with its effective policy; secrets are never shown.
    #[oai(
        path = "/keys",
        method = "get",
        operation_id = "list_keys",
        tag = "AdminTags::Keys"
    )]
    async fn keys(&self, auth: AdminAuth) -> Result<Json<Vec<KeyInfo>>, ApiError> {
        Ok(Json(
            auth.0
                .settings
                .keys
                .values()
                .map(|k| KeyInfo {
                    name: k.name.clone(),
                    key_sha256_prefix: k.key_sha256[..12].to_string(),
                    disabled: k.disabled,
                    cost_per_video: k.limits.cost_per_video,
                    rate_limit_per_min: k.limits.rate_limit_per_min,
                    read_rate_limit_per_min: k.limits.read_rate_limit_per_min,
                    max_batch_items: k.limits.max_batch_items,
                    max_prompt_chars: k.limits.max_prompt_chars,
                    ip_allowlist: k
                        .limits
                        .ip_allowlist
                        .iter()
                        .map(|n| n.to_string())
                        .collect(),
                    scopes: k.scopes.iter().map(|s| s.as_str().to_string()).collect(),
                    webhook_url: k.webhook_url.clone(),
                    webhook_secret_set: k.webhook_secret.is_some(),
                    webhook_events: k.webhook_events.clone(),
                    previous_key_expires_at: k.previous_key.as_ref().map(|p| p.expires_at),
                    low_credit_threshold: k.low_credit_threshold,
                    max_running_items: k.max_running_items,
                })
                .collect(),
        ))
    }

    /// Reload configuration
    ///
    /// Loads and validates every layer again; if valid, the new policy applies to the next
    /// request. If not, the running policy stays and the error names file and field.
    #[oai(
        path = "/config/reload",
        method = "post",
        operation_id = "reload_config",
        tag = "AdminTags::Keys"
    )]
    async fn reload(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
    ) -> Result<Json<ReloadResult>, ApiError> {
        state.reload().await.map(Json).map_err(|e| {
            ApiError::new(
                ErrorCode::ValidationError,
                format!("configuration rejected: {e}"),
            )
        })
    }

    /// List webhook deliveries
    ///
    /// Newest first; filter by status and key name.
    #[oai(
        path = "/webhooks",
        method = "get",
        operation_id = "list_webhooks",
        tag = "AdminTags::Webhooks"
    )]
    async fn list_webhooks(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminAuth,
        /// Only deliveries in this status.
        status: Query<Option<DeliveryStatus>>,
        /// Only deliveries of this key (name).
        key: Query<Option<String>>,
        /// At most this many, 1–500 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<Vec<WebhookDeliveryView>>, ApiError> {
        let key_id = match &key.0 {
            Some(name) => Some(Self::key_id(&state, name).await?),
            None => None,
        };
        let rows = crate::service::webhooks::list(
            &state.db,
            status.0.map(DeliveryStatus::as_str),
            key_id,
            u64::from(limit.0.unwrap_or(100)),
        )
        .await?;
        Ok(Json(
            rows.into_iter()
                .map(|d| delivery_view(&auth.0, d))
                .collect(),
        ))
    }

    /// Redeliver a webhook
    ///
    /// Starts a new series of attempts with the same `webhook-id`.
    #[oai(
        path = "/webhooks/:id/redeliver",
        method = "post",
        operation_id = "redeliver_webhook",
        tag = "AdminTags::Webhooks"
    )]
    async fn redeliver(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminAuth,
        id: Path<uuid::Uuid>,
    ) -> Result<Json<WebhookDeliveryView>, ApiError> {
        if !crate::service::webhooks::redeliver(&state.writer, id.0).await? {
            return Err(ApiError::not_found("webhook delivery", id.0));
        }
        let d = crate::store::webhooks::by_id(&state.db, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("webhook delivery", id.0))?;
        Ok(Json(delivery_view(&auth.0, d)))
    }
}

fn delivery_view(
    runtime: &crate::state::Runtime,
    d: entity::webhook_delivery::Model,
) -> WebhookDeliveryView {
    WebhookDeliveryView {
        id: d.id,
        webhook_id: crate::service::webhooks::webhook_id(d.id),
        key: runtime
            .by_id
            .get(&d.api_key_id)
            .map(|k| k.policy.name.clone()),
        batch_id: d.batch_id,
        event_type: d.event_type,
        target_url: d.target_url,
        status: d.status,
        attempt_count: d.attempt_count,
        next_attempt_at: d.next_attempt_at,
        last_status_code: d.last_status_code,
        last_error: d.last_error,
        created_at: d.created_at,
        delivered_at: d.delivered_at,
    }
}
