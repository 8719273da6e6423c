//! Per-request context carried in a task-local: the request id, the client address,
//! and what handlers learn (key, quota, outcome) for headers and the usage audit.
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::domain::error_code::ErrorCode;
use crate::domain::quota::RateInfo;

tokio::task_local! {
    static CTX: Arc<RequestCtx>;
}

/// What the service knows about the call in flight.
#[derive(Debug)]
pub struct RequestCtx {
    /// `x-request-id`: echoed from the client or generated.
    pub x_request_id: String,
    /// Client address after the trusted-proxy rule.
    pub client_ip: Option<IpAddr>,
    state: Mutex<CallState>,
}

/// Facts gathered while the call runs.
#[derive(Debug, Default, Clone)]
pub struct CallState {
    /// The create's request id (body or Idempotency-Key), when given or assigned.
    pub call_request_id: Option<String>,
    /// Authenticated key.
    pub key_id: Option<i64>,
    /// Which of the key's secrets authenticated the call (`current` or `previous`).
    pub key_version: Option<&'static str>,
    /// Quota consulted for this call.
    pub rate: Option<RateInfo>,
    /// The quota of a call that creates a batch, counted late: by the create service (which
    /// receives it with the caller) in the batch's commit, else by the audit layer with the
    /// call's usage row.
    pub pending_quota: Option<PendingQuota>,
    /// The create service has consulted the pending quota (counted it, or failed trying): the
    /// audit layer does not count the call again.
    pub quota_consulted: bool,
    /// Error code of the response.
    pub error_code: Option<ErrorCode>,
    /// Batch touched.
    pub batch_id: Option<Uuid>,
    /// Items in the batch created.
    pub items: i32,
    /// Credits held by the call.
    pub credits: i64,
    /// The usage row was already written inside the create transaction.
    pub audited: bool,
}

/// The quota a call that creates a batch counts against, counted in the same commit as what the
/// call writes: the batch (the create service, which receives it as an argument), or the
/// call's usage row when the create was refused before it counted (the audit layer). Whatever ran
/// before the count only read, so a call over the quota is answered 429 as if refused first.
#[derive(Debug, Clone)]
pub struct PendingQuota {
    /// The key's name (for the rejection metric).
    pub key_name: String,
    /// The quota scope.
    pub scope: &'static str,
    /// Calls allowed per window.
    pub limit: u32,
    /// When the call was authenticated: its window.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl RequestCtx {
    /// A fresh context.
    pub fn new(x_request_id: String, client_ip: Option<IpAddr>) -> Self {
        Self {
            x_request_id,
            client_ip,
            state: Mutex::new(CallState::default()),
        }
    }

    /// A copy of the gathered facts.
    pub fn snapshot(&self) -> CallState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Changes the gathered facts.
    pub fn update(&self, f: impl FnOnce(&mut CallState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }
}

/// Runs `fut` with `ctx` as the current request context.
pub async fn scope<F: Future>(ctx: Arc<RequestCtx>, fut: F) -> F::Output {
    CTX.scope(ctx, fut).await
}

/// The current context, if inside a request.
pub fn current() -> Option<Arc<RequestCtx>> {
    CTX.try_with(Arc::clone).ok()
}

/// Updates the current context, if any.
pub fn update(f: impl FnOnce(&mut CallState)) {
    if let Some(ctx) = current() {
        ctx.update(f);
    }
}

/// The request id errors and audit rows carry: the create's id, else `x-request-id`.
pub fn call_request_id() -> Option<String> {
    current().map(|ctx| {
        ctx.snapshot()
            .call_request_id
            .unwrap_or_else(|| ctx.x_request_id.clone())
    })
}

/// Records the error code of the response being built.
pub fn note_error(code: ErrorCode) {
    update(|s| s.error_code = Some(code));
}

/// The usage-row template and start time the audit layer hands to the create handler, which
/// writes the row in the create's own transaction.
#[derive(Clone)]
pub struct AuditTemplate(pub crate::domain::usage::UsageRow, pub std::time::Instant);
