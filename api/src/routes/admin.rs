//! `/api/admin`: credits, keys, usage and config reload for operators.
use std::sync::Arc;

use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use sea_orm::SqlErr;

use crate::auth::AdminAuth;
use crate::domain::ids::AccountId;
use crate::error::{ApiError, ErrorCode};
use crate::schemas::admin::{
    AccountInfo, AdjustRequest, AdminWallet, DeliveryStatus, GrantRequest, KeyInfo, ReloadResult,
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
    /// The account addressed by a path: `/keys/{key}/...` addresses the key's account.
    async fn account(state: &AppState, path: &Owner<'_>) -> Result<(AccountId, String), ApiError> {
        match *path {
            Owner::Key(name) => keys::account_of_key(&state.db, name)
                .await?
                .ok_or_else(|| ApiError::not_found("key", name)),
            Owner::Account(name) => Ok((
                keys::account_id_by_name(&state.db, name)
                    .await?
                    .ok_or_else(|| ApiError::not_found("account", name))?,
                name.to_string(),
            )),
        }
    }

    async fn wallet_view(
        state: &AppState,
        path: &Owner<'_>,
        limit: u64,
        before: Option<i64>,
    ) -> Result<AdminWallet, ApiError> {
        let (id, account) = Self::account(state, path).await?;
        let view = credits::view(&state.db, id, limit, before).await?;
        Ok(AdminWallet {
            account,
            key: path.key().map(str::to_string),
            balance: view.balance,
            held: view.held,
            available: view.available,
            ledger: view.ledger,
        })
    }

    /// A grant to the account a path addresses.
    async fn grant_to(
        state: &AppState,
        owner: Owner<'_>,
        idempotency_key: Option<String>,
        body: GrantRequest,
        req: &poem::Request,
    ) -> Result<Json<AdminWallet>, ApiError> {
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key)?;
        let note = body.note.map(Text::into_string);
        let wallet = Self::movement(
            state,
            &owner,
            LedgerKind::Grant,
            body.amount,
            note,
            idempotency_key,
        )
        .await?;
        Ok(Json(wallet))
    }

    /// An adjust of the account a path addresses.
    async fn adjust_to(
        state: &AppState,
        owner: Owner<'_>,
        idempotency_key: Option<String>,
        body: AdjustRequest,
        req: &poem::Request,
    ) -> Result<Json<AdminWallet>, ApiError> {
        crate::error::refuse_unreadable_header(req, "Idempotency-Key", &idempotency_key)?;
        if body.amount == 0 {
            return Err(ApiError::validation("amount", "must not be 0"));
        }
        let note = body.note.map(Text::into_string);
        let wallet = Self::movement(
            state,
            &owner,
            LedgerKind::Adjust,
            body.amount,
            note,
            idempotency_key,
        )
        .await?;
        Ok(Json(wallet))
    }

    async fn movement(
        state: &AppState,
        path: &Owner<'_>,
        kind: LedgerKind,
        amount: i64,
        note: Option<String>,
        idem: Option<String>,
    ) -> Result<AdminWallet, ApiError> {
        if let Some(k) = &idem {
            crate::domain::RequestId::parse("Idempotency-Key", k)?;
        }
        let (account, _) = Self::account(state, path).await?;
        let runtime = state.runtime();
        let applied = state
            .writes
            .run(Some(account.0), {
                let (note, idem) = (note.clone(), idem.clone());
                move |txn| {
                    let (note, idem) = (note.clone(), idem.clone());
                    let runtime = Arc::clone(&runtime);
                    Box::pin(async move {
                        if let Some(k) = idem.as_deref()
                            && let Some(earlier) =
                                credits::by_idempotency_key(txn, account, k).await?
                        {
                            return same_movement(&earlier, kind, amount, note.as_deref(), k);
                        }
                        let entry = credits::NewEntry::new(account.0, kind, amount)
                            .note(note.as_deref())
                            .idempotency_key(idem.as_deref());
                        match credits::apply(txn, entry).await {
                            Ok(true) => {
                                let w = credits::wallet(txn, account).await?;
                                crate::service::webhooks::outbox::enqueue_low_credits(
                                    txn,
                                    &runtime,
                                    account,
                                    w.available() - amount,
                                    w.available(),
                                    chrono::Utc::now(),
                                )
                                .await?;
                                Ok(())
                            }
                            Ok(false) => {
                                let w = credits::wallet(txn, account).await?;
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
                        credits::by_idempotency_key(&state.db, account, k).await?
                {
                    same_movement(&earlier, kind, amount, note.as_deref(), k)?;
                }
            }
            Err(e) => return Err(e),
        }
        Self::wallet_view(state, path, 20, None).await
    }
}

/// What an admin path addresses: an account, or a key (meaning the key's account).
#[derive(Clone, Copy)]
enum Owner<'a> {
    Key(&'a str),
    Account(&'a str),
}

impl<'a> Owner<'a> {
    fn key(&self) -> Option<&'a str> {
        match *self {
            Owner::Key(k) => Some(k),
            Owner::Account(_) => None,
        }
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
    /// Adds credits to the balance of the key's account. Retrying with the same
    /// `Idempotency-Key` grants once.
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
        Self::grant_to(&state, Owner::Key(&key.0), idempotency_key.0, body.0, req).await
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
        Self::adjust_to(&state, Owner::Key(&key.0), idempotency_key.0, body.0, req).await
    }

    /// Get a key's wallet and ledger
    ///
    /// The wallet of the key's account. Ledger newest first; page with `before` (a ledger id).
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
        Ok(Json(
            Self::wallet_view(
                &state,
                &Owner::Key(&key.0),
                u64::from(limit.0.unwrap_or(50)),
                before.0,
            )
            .await?,
        ))
    }

    /// Get a key's usage
    ///
    /// The usage of the key's account, with a per-key breakdown. Calls and credits charged per
    /// UTC day, `from` to `to` inclusive (default: the last 30
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
        let (id, _) = Self::account(&state, &Owner::Key(&key.0)).await?;
        Ok(Json(
            usage::report(
                &state.db,
                id,
                state.clock.now().date_naive(),
                from.0.as_deref(),
                to.0.as_deref(),
            )
            .await?,
        ))
    }

    /// List accounts
    ///
    /// Every configured account (each key without `account` is its own) with its keys,
    /// effective policy and wallet; secrets are never shown.
    #[oai(
        path = "/accounts",
        method = "get",
        operation_id = "list_accounts",
        tag = "AdminTags::Keys"
    )]
    async fn accounts(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminAuth,
    ) -> Result<Json<Vec<AccountInfo>>, ApiError> {
        let runtime = &auth.0;
        let mut out = Vec::with_capacity(runtime.settings.accounts.len());
        for name in runtime.settings.accounts.keys() {
            if let Some(info) = account_info(&state, runtime, name).await? {
                out.push(info);
            }
        }
        Ok(Json(out))
    }

    /// Get an account
    ///
    /// A configured account with its keys, effective policy and wallet.
    #[oai(
        path = "/accounts/:account",
        method = "get",
        operation_id = "get_account",
        tag = "AdminTags::Keys"
    )]
    async fn get_account(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminAuth,
        account: Path<String>,
    ) -> Result<Json<AccountInfo>, ApiError> {
        account_info(&state, &auth.0, &account.0)
            .await?
            .map(Json)
            .ok_or_else(|| ApiError::not_found("account", &account.0))
    }

    /// Get an account's wallet and ledger
    ///
    /// Ledger newest first; page with `before` (a ledger id).
    #[oai(
        path = "/accounts/:account/credits",
        method = "get",
        operation_id = "get_account_credits",
        tag = "AdminTags::Credits"
    )]
    async fn account_wallet(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        account: Path<String>,
        /// Ledger rows, 1–500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
        /// Only ledger rows with a smaller id.
        before: Query<Option<i64>>,
    ) -> Result<Json<AdminWallet>, ApiError> {
        Ok(Json(
            Self::wallet_view(
                &state,
                &Owner::Account(&account.0),
                u64::from(limit.0.unwrap_or(50)),
                before.0,
            )
            .await?,
        ))
    }

    /// Grant credits to an account
    ///
    /// Adds credits to the account's balance, which all its keys share. Retrying with the same
    /// `Idempotency-Key` grants once.
    #[oai(
        path = "/accounts/:account/credits/grant",
        method = "post",
        operation_id = "grant_account_credits",
        tag = "AdminTags::Credits"
    )]
    async fn account_grant(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        account: Path<String>,
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        body: Json<GrantRequest>,
        req: &poem::Request,
    ) -> Result<Json<AdminWallet>, ApiError> {
        Self::grant_to(
            &state,
            Owner::Account(&account.0),
            idempotency_key.0,
            body.0,
            req,
        )
        .await
    }

    /// Adjust an account's credits
    ///
    /// Adds or (negative amount) removes credits; the balance never drops below what is held.
    #[oai(
        path = "/accounts/:account/credits/adjust",
        method = "post",
        operation_id = "adjust_account_credits",
        tag = "AdminTags::Credits"
    )]
    async fn account_adjust(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        account: Path<String>,
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[A-Za-z0-9._:\-]+$")
        )]
        idempotency_key: Header<Option<String>>,
        body: Json<AdjustRequest>,
        req: &poem::Request,
    ) -> Result<Json<AdminWallet>, ApiError> {
        Self::adjust_to(
            &state,
            Owner::Account(&account.0),
            idempotency_key.0,
            body.0,
            req,
        )
        .await
    }

    /// Get an account's usage
    ///
    /// Calls and credits charged per UTC day across the account's keys, with a per-key
    /// breakdown, `from` to `to` inclusive (default: the last 30 days). `from` must not be after
    /// `to`, and the period spans at most 366 days (422 otherwise).
    #[oai(
        path = "/accounts/:account/usage",
        method = "get",
        operation_id = "get_account_usage",
        tag = "AdminTags::Keys"
    )]
    async fn account_usage(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AdminAuth,
        account: Path<String>,
        /// First day (UTC).
        #[oai(validator(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
        from: Query<Option<String>>,
        /// Last day (UTC), inclusive.
        #[oai(validator(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
        to: Query<Option<String>>,
    ) -> Result<Json<Usage>, ApiError> {
        let (id, _) = Self::account(&state, &Owner::Account(&account.0)).await?;
        Ok(Json(
            usage::report(
                &state.db,
                id,
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
                .map(|k| {
                    let a = &k.account;
                    KeyInfo {
                        name: k.name.clone(),
                        account: a.name.clone(),
                        key_sha256_prefix: k.key_sha256[..12].to_string(),
                        disabled: k.disabled,
                        cost_per_video: a.limits.cost_per_video,
                        rate_limit_per_min: k.create_limit(),
                        read_rate_limit_per_min: k.read_limit(),
                        max_batch_items: a.limits.max_batch_items,
                        max_prompt_chars: a.limits.max_prompt_chars,
                        ip_allowlist: k.ip_allowlist.iter().map(|n| n.to_string()).collect(),
                        scopes: k.scopes.iter().map(|s| s.as_str().to_string()).collect(),
                        webhook_url: a.webhook_url.clone(),
                        webhook_secret_set: a.webhook_secret.is_some(),
                        webhook_events: a.webhook_events.clone(),
                        previous_key_expires_at: k.previous_key.as_ref().map(|p| p.expires_at),
                        low_credit_threshold: a.low_credit_threshold,
                        max_running_items: a.max_running_items,
                    }
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
        /// Only deliveries of this key's account (key name).
        key: Query<Option<String>>,
        /// Only deliveries of this account (name).
        account: Query<Option<String>>,
        /// At most this many, 1–500 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<Vec<WebhookDeliveryView>>, ApiError> {
        let key_id = match (&key.0, &account.0) {
            (Some(name), _) => Some(Self::account(&state, &Owner::Key(name)).await?.0.0),
            (None, Some(name)) => Some(Self::account(&state, &Owner::Account(name)).await?.0.0),
            (None, None) => None,
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

/// A configured account as the admin API shows it (None: not configured).
async fn account_info(
    state: &AppState,
    runtime: &crate::state::Runtime,
    name: &str,
) -> Result<Option<AccountInfo>, ApiError> {
    let (Some(a), Some(entry)) = (
        runtime.settings.accounts.get(name),
        runtime.accounts_by_name.get(name),
    ) else {
        return Ok(None);
    };
    let w = credits::wallet(&state.db, entry.id).await?;
    Ok(Some(AccountInfo {
        name: name.to_string(),
        own_account_of_key: a.implicit,
        disabled: a.disabled,
        keys: runtime
            .settings
            .keys
            .values()
            .filter(|k| k.account.name == name)
            .map(|k| k.name.clone())
            .collect(),
        cost_per_video: a.limits.cost_per_video,
        rate_limit_per_min: a.limits.rate_limit_per_min,
        read_rate_limit_per_min: a.limits.read_rate_limit_per_min,
        max_batch_items: a.limits.max_batch_items,
        max_prompt_chars: a.limits.max_prompt_chars,
        completion_window: a
            .limits
            .completion_window
            .map(|w| humantime::format_duration(w).to_string()),
        webhook_url: a.webhook_url.clone(),
        webhook_secret_set: a.webhook_secret.is_some(),
        webhook_events: a.webhook_events.clone(),
        low_credit_threshold: a.low_credit_threshold,
        max_running_items: a.max_running_items,
        balance: w.balance,
        held: w.held,
        available: w.available(),
    }))
}

fn delivery_view(
    runtime: &crate::state::Runtime,
    d: entity::webhook_delivery::Model,
) -> WebhookDeliveryView {
    WebhookDeliveryView {
        id: d.id,
        webhook_id: crate::service::webhooks::webhook_id(d.id),
        key: runtime
            .accounts
            .get(&d.api_key_id)
            .filter(|a| a.policy.implicit)
            .map(|a| a.policy.name.clone()),
        account: runtime
            .accounts
            .get(&d.api_key_id)
            .map(|a| a.policy.name.clone()),
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
