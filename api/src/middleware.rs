//! HTTP middleware: request context (request id, client address, body limit, tracing span)
//! for every route, and the customer layer (quota headers, usage audit).
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poem::http::{HeaderValue, Method, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use serde_json::json;
use tracing::Instrument;

use crate::call::{AuditTemplate, CallRecord, CallState};
use crate::context::{self, RequestCtx};
use crate::domain::ids::AccountId;
use crate::error::{ApiError, ErrorCode, catch_all};
use crate::service::rate_limit::{
    self, RateInfo, SCOPE_BATCH, SCOPE_READ, SCOPE_REFUSED, SCOPE_UNAUTHENTICATED,
};
use crate::service::usage::{self, UsageRow};
use crate::settings::ServerSettings;
use crate::state::AppState;
use crate::strangers::Verdict;

/// Header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The client address: the socket peer, unless the peer is a trusted proxy; then the
/// right-most `X-Forwarded-For` address that is not a trusted proxy. Fails closed: when the
/// header is missing, holds only trusted proxies, or has an unparsable hop before the first
/// untrusted one, the address is unknown (`None`), never the proxy's own.
pub fn client_ip(req: &Request, server: &ServerSettings) -> Option<IpAddr> {
    let peer = unmap(req.remote_addr().as_socket_addr().map(|a| a.ip())?);
    if !server.is_trusted_proxy(peer) {
        return Some(peer);
    }
    // Several headers count as one list, in order; bytes that are not UTF-8 are replaced, so a
    // mangled hop is unparsable rather than a reason to fall back to the peer.
    let values: Vec<String> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let hops: Vec<&str> = values.iter().flat_map(|v| v.split(',')).collect();
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop)?;
        if !server.is_trusted_proxy(ip) {
            return Some(ip);
        }
    }
    None
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` hop: `203.0.113.7`, `203.0.113.7:5123`, `2001:db8::1` or
/// `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(unmap(ip));
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| unmap(a.ip()))
}

/// Method label of the request metrics: a fixed set, anything else is `OTHER`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Route label of the request metrics: the operation id, one of the fixed documentation and
/// health routes, or `unmatched`; never text taken from the request.
fn route_label(op: Option<&'static str>, path: &str) -> &'static str {
    if let Some(op) = op {
        return op;
    }
    const FIXED: [(&str, &str); 9] = [
        ("/healthz", "healthz"),
        ("/readyz", "readyz"),
        ("/metrics", "metrics"),
        ("/openapi.json", "openapi"),
        ("/worker/openapi.json", "worker_openapi"),
        ("/admin/openapi.json", "admin_openapi"),
        ("/docs", "docs"),
        ("/worker/docs", "worker_docs"),
        ("/admin/docs", "admin_docs"),
    ];
    for (prefix, label) in FIXED {
        if path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('/'))
        {
            return label;
        }
    }
    "unmatched"
}

/// True for the customer API, whose every call is audited.
fn is_customer_path(path: &str) -> bool {
    path == "/api/enterprise" || path.starts_with("/api/enterprise/")
}

/// Outermost layer of every route.
pub async fn request_context<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let runtime = state.runtime();
    let server = &runtime.settings.server;
    let x_request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_request_id(s))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let ip = client_ip(&req, server);
    let ctx = Arc::new(RequestCtx::new(x_request_id.clone(), ip));
    let method = method_label(req.method());
    let span = tracing::info_span!("request", request_id = %x_request_id, method, path = %req.uri().path());
    let max = server.max_body_bytes;
    let body_timeout = server.body_timeout;
    let resp = context::scope(ctx, async move {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let (resp, op) = match read_body(&mut req, max, body_timeout).await {
            Err(refusal) if is_customer_path(&path) => {
                (audit_refusal(&state, &req, refusal, started).await, None)
            }
            Err(refusal) => (refusal.into_response(), None),
            Ok(()) => match ep.call(req).await {
                Ok(r) => {
                    let r = r.into_response();
                    let op = r.data::<poem_openapi::OperationId>().map(|o| o.0);
                    (r, op)
                }
                Err(e) => {
                    let op = e.data::<poem_openapi::OperationId>().map(|o| o.0);
                    (catch_all(e), op)
                }
            },
        };
        let mut resp = resp;
        if resp.status() == StatusCode::METHOD_NOT_ALLOWED
            && let Some(allow) = crate::routes::documents::allowed_methods(&path)
            && let Ok(v) = HeaderValue::from_str(&allow)
        {
            resp.headers_mut().insert(poem::http::header::ALLOW, v);
        }
        let status = resp.status().as_u16();
        let route = route_label(op, &path);
        let elapsed = started.elapsed();
        metrics::counter!("http_requests_total", "route" => route, "method" => method, "status" => status.to_string()).increment(1);
        metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method).record(elapsed.as_secs_f64());
        tracing::debug!(status, latency_us = elapsed.as_micros() as u64, "request finished");
        resp
    })
    .instrument(span)
    .await;
    let mut resp = resp;
    if let Ok(v) = HeaderValue::from_str(&x_request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    Ok(resp)
}

/// Reads the whole body within the size and time limits, before any handler runs.
async fn read_body(req: &mut Request, max: usize, timeout: Duration) -> Result<(), ApiError> {
    if let Some(len) = req.headers().get(poem::http::header::CONTENT_LENGTH) {
        match len.to_str().ok().and_then(|s| s.parse::<usize>().ok()) {
            Some(n) if n > max => return Err(too_large(max)),
            Some(_) => {}
            None => {
                return Err(
                    ApiError::new(ErrorCode::ValidationError, "invalid Content-Length")
                        .with_status(StatusCode::BAD_REQUEST),
                );
            }
        }
    }
    let body = req.take_body();
    match tokio::time::timeout(timeout, body.into_bytes_limit(max)).await {
        Ok(Ok(bytes)) => {
            req.set_body(Body::from(bytes));
            Ok(())
        }
        Ok(Err(poem::error::ReadBodyError::PayloadTooLarge)) => Err(too_large(max)),
        Ok(Err(e)) => Err(ApiError::new(
            ErrorCode::ValidationError,
            format!("cannot read body: {e}"),
        )
        .with_status(StatusCode::BAD_REQUEST)),
        Err(_) => Err(ApiError::new(
            ErrorCode::ValidationError,
            format!(
                "the request body did not arrive within {} seconds",
                timeout.as_secs()
            ),
        )
        .with_status(StatusCode::REQUEST_TIMEOUT)
        .with_header("connection", "close".into())),
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body exceeds {max} bytes"),
    )
    .with_details(serde_json::json!({ "max_body_bytes": max }))
}

/// Audits a customer call refused before routing (body too large or unreadable): one usage
/// row while the (key or none, address) budget of refused calls lasts, otherwise a 429 counted
/// in its aggregated row.
async fn audit_refusal(
    state: &AppState,
    req: &Request,
    refusal: ApiError,
    started: Instant,
) -> Response {
    let Some(ctx) = context::current() else {
        return refusal.into_response();
    };
    let runtime = state.runtime();
    let key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|k| runtime.authenticate(&crate::service::keys::sha256_hex(k), state.clock.now()))
        .map(|(k, _)| (k.id, k.account.0));
    let key_id = key.map(|(k, _)| k);
    let path = req.original_uri().path().to_string();
    let scope = rate_limit::scope_of(req.method(), &path);
    let mut resp = if let Verdict::Throttled { retry_after } =
        refusals(state, key_id).check(key_id, ctx.client_ip)
    {
        return throttle(state, key_id, ctx.client_ip, retry_after);
    } else {
        refusal.clone().into_response()
    };
    let d = &runtime.settings.defaults;
    let limit = if scope == SCOPE_BATCH {
        d.rate_limit_per_min
    } else {
        d.read_rate_limit_per_min
    };
    let now = state.clock.now();
    set_rate_headers(&mut resp, &RateInfo::untouched(scope, limit, now));
    let row = UsageRow {
        api_key_id: key_id,
        account_id: key.map(|(_, a)| a),
        request_id: Some(ctx.x_request_id.clone()),
        method: req.method().to_string(),
        path,
        status: resp.status().as_u16(),
        error_code: Some(refusal.code.as_str().to_string()),
        client_ip: ctx.client_ip.map(|i| i.to_string()),
        user_agent: user_agent(req),
        latency_us: started.elapsed().as_micros() as i64,
        ..Default::default()
    };
    if let Err(e) = usage::record_through(&state.writes, row, now).await {
        tracing::error!(error = %e, "writing usage row failed");
    }
    resp
}

/// The budget of refused calls a call spends: the strangers' without a valid key, else its
/// key's.
fn refusals(state: &AppState, key_id: Option<i64>) -> &crate::strangers::Throttle {
    match key_id {
        None => &state.strangers,
        Some(_) => &state.refused_keys,
    }
}

/// The 429 of a (key or none, address) over its budget of refused calls; the call is counted
/// in the aggregated audit row of its key, address, minute and outcome, with no database work
/// now.
fn throttle(
    state: &AppState,
    key_id: Option<i64>,
    ip: Option<IpAddr>,
    retry_after: u32,
) -> Response {
    let budget = refusals(state, key_id);
    let per_min = budget.per_min();
    budget.aggregate(key_id, ip, 429, Some(ErrorCode::RateLimitExceeded.as_str()));
    let (scope, what) = match key_id {
        None => {
            metrics::counter!("unauthenticated_throttled_total").increment(1);
            (SCOPE_UNAUTHENTICATED, "calls without a valid API key")
        }
        Some(_) => {
            metrics::counter!("refused_key_throttled_total").increment(1);
            (SCOPE_REFUSED, "refused calls of this API key")
        }
    };
    let mut resp = ApiError::new(
        ErrorCode::RateLimitExceeded,
        format!(
            "too many {what} from this address (limit {per_min} per minute); \
             retry in {retry_after}s"
        ),
    )
    .with_details(json!({
        "limit": per_min,
        "scope": scope,
        "reset_seconds": retry_after,
    }))
    .with_header("Retry-After", retry_after.to_string())
    .into_response();
    set_rate_headers(
        &mut resp,
        &RateInfo::budget_exhausted(scope, per_min, retry_after),
    );
    resp
}

fn user_agent(req: &Request) -> Option<String> {
    req.headers()
        .get(poem::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Customer layer: quota headers on every response and a usage row for every call.
/// A retry of failed items has only options: sent without a body (and so without a
/// `Content-Type`), it reads as `{}` instead of being refused for its missing media type.
fn empty_options_read_as_json(req: &mut Request, path: &str) {
    use poem::http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
    let headers = req.headers();
    let empty = headers
        .get(CONTENT_LENGTH)
        .is_none_or(|l| l.as_bytes() == b"0")
        && !headers.contains_key(TRANSFER_ENCODING);
    if req.method() == poem::http::Method::POST
        && path.trim_end_matches('/').ends_with("/retry-failed")
        && !headers.contains_key(CONTENT_TYPE)
        && empty
    {
        req.headers_mut().insert(
            CONTENT_TYPE,
            poem::http::HeaderValue::from_static("application/json"),
        );
    }
}

pub async fn customer_audit<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.original_uri().path().to_string();
    let user_agent = user_agent(&req);
    let mut req = req;
    empty_options_read_as_json(&mut req, &path);
    // What the call gathers for its row, handed on explicitly in the request's data.
    let record = Arc::new(CallRecord::default());
    req.set_data(Arc::clone(&record));
    let is_create = rate_limit::scope_of(req.method(), &path) == SCOPE_BATCH;
    if is_create {
        // The create transaction writes its own usage row; give it the template.
        let template = UsageRow {
            method: method.clone(),
            path: path.clone(),
            client_ip: context::current()
                .and_then(|c| c.client_ip)
                .map(|i| i.to_string()),
            user_agent: user_agent.clone(),
            ..Default::default()
        };
        req.extensions_mut()
            .insert(AuditTemplate(template, started));
        return finish(
            ep.call(req).await.map(IntoResponse::into_response),
            &record,
            &state,
            started,
            method,
            path,
            user_agent,
        )
        .await;
    }
    finish(
        ep.call(req).await.map(IntoResponse::into_response),
        &record,
        &state,
        started,
        method,
        path,
        user_agent,
    )
    .await
}

async fn finish(
    result: poem::Result<Response>,
    record: &CallRecord,
    state: &AppState,
    started: Instant,
    method: String,
    path: String,
    user_agent: Option<String>,
) -> poem::Result<Response> {
    let mut resp = match result {
        Ok(r) => r.into_response(),
        Err(e) => {
            // Keep the operation id for the metrics of the outer layer.
            let op = e.data::<poem_openapi::OperationId>().map(|o| o.0);
            let mut r = catch_all(e);
            if let Some(op) = op {
                r.set_data(poem_openapi::OperationId(op));
            }
            r
        }
    };
    let Some(ctx) = context::current() else {
        return Ok(resp);
    };
    let call = record.snapshot();
    // The error code of the answer, as the error that made it left it on the response.
    let error_code = resp.data::<ErrorCode>().copied();
    if call.key_id.is_none()
        && !call.audited
        && let Verdict::Throttled { retry_after } = state.strangers.check(None, ctx.client_ip)
    {
        return Ok(throttle(state, None, ctx.client_ip, retry_after));
    }
    // A valid key refused for its client address or its scopes: bounded like strangers, per
    // key and address (the key's admitted calls never spend this budget).
    if let Some(key_id) = call.key_id
        && matches!(
            error_code,
            Some(ErrorCode::IpNotAllowed | ErrorCode::ForbiddenScope)
        )
        && let Verdict::Throttled { retry_after } =
            state.refused_keys.check(Some(key_id), ctx.client_ip)
    {
        let throttled = throttle(state, Some(key_id), ctx.client_ip, retry_after);
        return Ok(keep_operation(&resp, throttled));
    }
    if call.audited {
        set_rate_headers(&mut resp, &call_rate(state, &call, &method, &path));
        return Ok(resp);
    }
    // The call's usage row, as answered with `status` and `error_code`.
    let row_of = |status: StatusCode, error_code: Option<ErrorCode>, request_id: String| UsageRow {
        api_key_id: call.key_id,
        account_id: call.account_id,
        key_version: call.key_version,
        request_id: Some(request_id),
        method: method.clone(),
        path: path.clone(),
        status: status.as_u16(),
        error_code: error_code.map(|c| c.as_str().to_string()),
        client_ip: ctx.client_ip.map(|i| i.to_string()),
        user_agent: user_agent.clone(),
        latency_us: started.elapsed().as_micros() as i64,
        batch_id: call.batch_id,
        count: 1,
        ..Default::default()
    };
    let request_id = ctx
        .create_request_id()
        .unwrap_or_else(|| ctx.x_request_id.clone());
    let row = row_of(resp.status(), error_code, request_id);
    if error_code == Some(ErrorCode::StoreUnavailable) {
        // The store fails: the call is answered now, not after another wait for the store. Its
        // usage row is attempted once in the background; a failure is logged once.
        set_rate_headers(&mut resp, &call_rate(state, &call, &method, &path));
        let (writes, at) = (state.writes.clone(), state.clock.now());
        tokio::spawn(async move {
            if let Err(e) = usage::record_through(&writes, row, at).await {
                tracing::warn!(error = %e, "the usage row of a call refused for a store failure was not written");
            }
        });
        return Ok(resp);
    }
    let audited = match (&call.pending_quota, call.account_id) {
        (Some(q), Some(account_id)) if !call.quota_consulted => {
            // A read: its count and its row in one commit; over the quota it becomes a 429.
            let refused_id = ctx.x_request_id.clone();
            match rate_limit::admit_and_audit(
                &state.writes,
                AccountId(account_id),
                q,
                row,
                refused_id,
            )
            .await
            {
                Ok((info, audited)) => {
                    let info = rate_limit::tighter(info, q.own.clone());
                    if info.exceeded {
                        resp = keep_operation(
                            &resp,
                            rate_limit::refusal(&q.key_name, &info, "account").into_response(),
                        );
                    }
                    set_rate_headers(&mut resp, &info);
                    audited
                }
                Err(e) if e.fault.is_some() => {
                    // The store fails: the read was answered from what could be read, so it is
                    // served, uncounted; its usage row went with the count and is lost (logged
                    // once here, never retried).
                    set_rate_headers(&mut resp, &call_rate(state, &call, &method, &path));
                    tracing::warn!(error = %e, "a read was served uncounted and unaudited: the store fails");
                    return Ok(resp);
                }
                Err(e) => {
                    // Not counted, so not admitted: a 500, audited as one if the store lets it.
                    let mut failed = keep_operation(&resp, e.into_response());
                    set_rate_headers(&mut failed, &call_rate(state, &call, &method, &path));
                    let row = UsageRow {
                        batch_id: None,
                        ..row_of(
                            failed.status(),
                            Some(ErrorCode::Internal),
                            ctx.x_request_id.clone(),
                        )
                    };
                    if let Err(e) =
                        usage::record_through(&state.writes, row, state.clock.now()).await
                    {
                        tracing::error!(error = %e, "writing usage row failed");
                    }
                    return Ok(failed);
                }
            }
        }
        _ => {
            set_rate_headers(&mut resp, &call_rate(state, &call, &method, &path));
            usage::record_through(&state.writes, row, state.clock.now()).await
        }
    };
    if let Err(e) = audited {
        tracing::error!(error = %e, "writing usage row failed");
    }
    Ok(resp)
}

/// `next` with the operation id of `resp` kept, for the metrics of the outer layer.
fn keep_operation(resp: &Response, mut next: Response) -> Response {
    if let Some(op) = resp.data::<poem_openapi::OperationId>() {
        next.set_data(poem_openapi::OperationId(op.0));
    }
    next
}

/// The quota a call's headers report: what it consulted, else the untouched default quota of
/// its scope.
fn call_rate(state: &AppState, call: &CallState, method: &str, path: &str) -> RateInfo {
    call.rate.clone().unwrap_or_else(|| {
        let scope = match method.parse::<Method>() {
            Ok(m) => rate_limit::scope_of(&m, path),
            Err(_) => SCOPE_READ,
        };
        let runtime = state.runtime();
        let d = &runtime.settings.defaults;
        let limit = if scope == SCOPE_BATCH {
            d.rate_limit_per_min
        } else {
            d.read_rate_limit_per_min
        };
        RateInfo::untouched(scope, limit, state.clock.now())
    })
}

fn set_rate_headers(resp: &mut Response, r: &RateInfo) {
    let h = resp.headers_mut();
    let pairs = [
        (
            "ratelimit-policy",
            format!("\"{}\";q={};w=60", r.scope, r.limit),
        ),
        (
            "ratelimit",
            format!("\"{}\";r={};t={}", r.scope, r.remaining, r.reset_secs),
        ),
        ("x-ratelimit-limit", r.limit.to_string()),
        ("x-ratelimit-remaining", r.remaining.to_string()),
        ("x-ratelimit-reset", r.reset_secs.to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}
