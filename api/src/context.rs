//! Per-request context carried in a task-local, for logs and error bodies only: the request id
//! (`x-request-id`, and a create's own request id once known) and the client address. What a
//! call gathers for its audit is in [`crate::call`], passed explicitly.
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

tokio::task_local! {
    static CTX: Arc<RequestCtx>;
}

/// The request in flight, as logs and error bodies name it.
#[derive(Debug)]
pub struct RequestCtx {
    /// `x-request-id`: echoed from the client or generated.
    pub x_request_id: String,
    /// Client address after the trusted-proxy rule.
    pub client_ip: Option<IpAddr>,
    /// The create's request id (body or Idempotency-Key), when given or assigned.
    call_request_id: Mutex<Option<String>>,
}

impl RequestCtx {
    /// A fresh context.
    pub fn new(x_request_id: String, client_ip: Option<IpAddr>) -> Self {
        Self {
            x_request_id,
            client_ip,
            call_request_id: Mutex::new(None),
        }
    }

    /// The create's request id, if one is known.
    pub fn create_request_id(&self) -> Option<String> {
        self.call_request_id
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
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

/// Names the current call by a create's request id (`None`: by its `x-request-id` again).
pub fn set_call_request_id(id: Option<String>) {
    if let Some(ctx) = current() {
        *ctx.call_request_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = id;
    }
}

/// The request id errors and audit rows carry: the create's id, else `x-request-id`.
pub fn call_request_id() -> Option<String> {
    current().map(|ctx| {
        ctx.create_request_id()
            .unwrap_or_else(|| ctx.x_request_id.clone())
    })
}
