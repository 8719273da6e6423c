//! Security schemes: customer API key (with IP allowlist and rate limit), worker and admin
//! bearer secrets compared in constant time.
use std::sync::Arc;

use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::{ApiKey, Bearer};
use subtle::ConstantTimeEq;

use crate::call::PendingQuota;
use crate::domain::ids::KeyId;
use crate::error::{ApiError, ErrorCode};
use crate::service::keys::sha256_hex;
use crate::service::rate_limit::{self, SCOPE_BATCH};
use crate::settings::KeyScope;
use crate::state::{AppState, KeyEntry, Runtime};

/// An authenticated customer: the key, the configuration it was checked against, and the
/// call's quota when the call is counted later, in the commit of what it writes.
pub struct Caller {
    /// The key.
    pub key: KeyEntry,
    /// The configuration in force for this call.
    pub runtime: Arc<Runtime>,
    /// Which of the key's secrets authenticated the call (`current` or `previous`).
    pub key_version: &'static str,
    /// A call that creates a batch is counted in the commit that writes it: its quota is
    /// handed to the service with the call ([`crate::service::batches::AuditInfo::quota`]).
    /// `None` for every other call (counted before the handler ran).
    pub quota: Option<PendingQuota>,
}

/// Customer API key, sent in the `x-api-key` header.
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "x-api-key",
    key_in = "header",
    checker = "check_api_key"
)]
pub struct CustomerKey(pub Caller);

fn state(req: &Request) -> Result<&Arc<AppState>, ApiError> {
    req.data::<Arc<AppState>>()
        .ok_or_else(|| ApiError::internal("application state missing"))
}

async fn check_api_key(req: &Request, key: ApiKey) -> poem::Result<Caller> {
    Ok(authorize_customer(req, &key.key).await?)
}

/// Authenticates the key, checks the client address and the key's scopes, then counts the call
/// against the key's own tighter quota if it has one and its account's quota (401 and 403 use
/// no quota, and read nothing from the database).
async fn authorize_customer(req: &Request, presented: &str) -> Result<Caller, ApiError> {
    let state = state(req)?;
    let runtime = state.runtime();
    let hash = sha256_hex(presented);
    let Some((key, version)) = runtime
        .authenticate(&hash, state.clock.now())
        .filter(|(k, _)| !state.revoked.load().contains(&k.id))
        .map(|(k, v)| (k.clone(), v))
    else {
        return Err(ApiError::unauthorized("invalid or disabled API key"));
    };
    let ctx = crate::context::current();
    let record = crate::call::of(req).map(|r| &**r);
    crate::call::note(record, |s| {
        s.key_id = Some(key.id);
        s.account_id = Some(key.account.0);
        s.key_version = Some(version.as_str());
    });
    let scope = rate_limit::scope_of(req.method(), req.original_uri().path());
    let (account_limit, own_limit) = key.policy.limits(scope == SCOPE_BATCH);
    let limit = own_limit.unwrap_or(account_limit);
    let now = state.clock.now();
    let ip = ctx.as_ref().and_then(|c| c.client_ip);
    if !key.policy.allows_client(ip) {
        // Answered from what is in memory: a leaked key used from elsewhere costs no database
        // read, and the audit layer bounds its rows per key and address.
        let info = rate_limit::RateInfo::untouched(scope, limit, now);
        crate::call::note(record, |s| s.rate = Some(info.clone()));
        return Err(ApiError::new(
            ErrorCode::IpNotAllowed,
            format!(
                "client address {} is not allowed for this key",
                ip.map(|i| i.to_string())
                    .unwrap_or_else(|| "unknown".into())
            ),
        ));
    }
    if let Some(needed) = KeyScope::of_call(req.method(), req.original_uri().path())
        && !key.policy.has_scope(needed)
    {
        // Outside the key's scopes: refused before any quota is used or any work done; the
        // audit layer writes its row, bounded per key and address like an allowlist refusal.
        let info = rate_limit::RateInfo::untouched(scope, limit, now);
        crate::call::note(record, |s| s.rate = Some(info.clone()));
        let held: Vec<&str> = key.policy.scopes.iter().map(|s| s.as_str()).collect();
        return Err(ApiError::new(
            ErrorCode::ForbiddenScope,
            format!(
                "this key's scopes ({}) do not include {}",
                held.join(", "),
                needed.as_str()
            ),
        )
        .with_details(serde_json::json!({
            "required_scope": needed.as_str(),
            "key_scopes": held,
        })));
    }
    // A key's own tighter limit is counted first, in a commit of its own: a call over it uses
    // none of its account's quota.
    let mut own_info = None;
    if let Some(own) = own_limit {
        match rate_limit::admit_key(&state.writes, KeyId(key.id), scope, own, now).await {
            Ok(info) if info.exceeded => {
                crate::call::note(record, |s| s.rate = Some(info.clone()));
                return Err(rate_limit::refusal(&key.policy.name, &info, "key"));
            }
            Ok(info) => own_info = Some(info),
            Err(e) => {
                served_uncounted(req, e)?;
                return Ok(Caller {
                    key,
                    runtime,
                    key_version: version.as_str(),
                    quota: None,
                });
            }
        }
    }
    let key_version = version.as_str();
    if scope == SCOPE_BATCH {
        // Counted later, in one commit with what the call writes: the batch, by the create
        // service that receives the quota with the caller; a create refused before it counts
        // (a bad body) is counted with its usage row by the audit layer, which is told of the
        // quota here. Either answers 429 if over the quota; what ran before only read.
        let quota = PendingQuota {
            key_name: key.policy.name.clone(),
            scope,
            limit: account_limit,
            at: now,
            own: own_info,
        };
        crate::call::note(record, |s| s.pending_quota = Some(quota.clone()));
        return Ok(Caller {
            key,
            runtime,
            key_version,
            quota: Some(quota),
        });
    }
    // Counted before the handler runs: a call over its quota does no work at all.
    let info = match rate_limit::admit(&state.writes, key.account, scope, account_limit, now).await
    {
        Ok(info) => info,
        Err(e) => {
            served_uncounted(req, e)?;
            return Ok(Caller {
                key,
                runtime,
                key_version,
                quota: None,
            });
        }
    };
    let info = rate_limit::tighter(info, own_info);
    crate::call::note(record, |s| s.rate = Some(info.clone()));
    if info.exceeded {
        return Err(rate_limit::refusal(&key.policy.name, &info, "account"));
    }
    Ok(Caller {
        key,
        runtime,
        key_version,
        quota: None,
    })
}

/// Whether a call whose quota the store failed to count is served: a read is, from what can
/// be read (while SQLite is full, reads keep working), uncounted; anything else fails with
/// the store's error.
fn served_uncounted(req: &Request, e: ApiError) -> Result<(), ApiError> {
    if e.fault.is_some() && req.method() == poem::http::Method::GET {
        tracing::warn!(error = %e, "a read is served uncounted: the store fails");
        Ok(())
    } else {
        Err(e)
    }
}

/// Worker secret, sent as `Authorization: Bearer <secret>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_worker")]
pub struct WorkerAuth(pub Arc<Runtime>);

async fn check_worker(req: &Request, bearer: Bearer) -> poem::Result<Arc<Runtime>> {
    let runtime = state(req)?.runtime();
    if constant_eq(&bearer.token, runtime.settings.worker.secret.expose()) {
        Ok(runtime)
    } else {
        Err(ApiError::unauthorized("invalid worker secret").into())
    }
}

/// Admin token, sent as `Authorization: Bearer <token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_admin")]
pub struct AdminAuth(pub Arc<Runtime>);

async fn check_admin(req: &Request, bearer: Bearer) -> poem::Result<Arc<Runtime>> {
    let runtime = state(req)?.runtime();
    if constant_eq(&bearer.token, runtime.settings.admin.token.expose()) {
        Ok(runtime)
    } else {
        Err(ApiError::unauthorized("invalid admin token").into())
    }
}

/// Compares secrets without leaking where they differ (lengths may leak; they are not secret).
pub fn constant_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}
