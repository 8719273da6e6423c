//! HTTP middleware: request context (request id, client address, body limit, tracing span)
//! for every route, and the customer layer (quota headers, usage audit).
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use poem::http::{HeaderValue, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

use crate::context::{self, RequestCtx};
use crate::error::{ApiError, ErrorCode, catch_all};
use crate::service::rate_limit::{RateInfo, SCOPE_BATCH, SCOPE_READ};
use crate::service::usage::{self, UsageRow};
use crate::settings::ServerSettings;
use crate::state::AppState;

/// Header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The client address: the socket peer, unless the peer is a trusted proxy; then the
/// right-most `X-Forwarded-For` address that is not a trusted proxy.
pub fn client_ip(req: &Request, server: &ServerSettings) -> Option<IpAddr> {
    let peer = req.remote_addr().as_socket_addr().map(|a| a.ip())?;
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    if !server.is_trusted_proxy(peer) {
        return Some(peer);
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in req.headers().get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return Some(peer);
        };
        for part in text.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                // An unparsable hop: trust nothing to its left.
                Err(_) => hops.clear(),
            }
        }
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        client = *hop;
        if !server.is_trusted_proxy(*hop) {
            break;
        }
    }
    Some(client)
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
    let span = tracing::info_span!("request", request_id = %x_request_id, method = %req.method(), path = %req.uri().path());
    let max = server.max_body_bytes;
    let resp = context::scope(ctx, async move {
        if let Some(len) = req.headers().get(poem::http::header::CONTENT_LENGTH) {
            let len: Option<usize> = len.to_str().ok().and_then(|s| s.parse().ok());
            match len {
                Some(n) if n > max => return too_large(max),
                Some(_) => {}
                None => {
                    return ApiError::new(ErrorCode::ValidationError, "invalid Content-Length")
                        .with_status(StatusCode::BAD_REQUEST)
                        .into_response();
                }
            }
        }
        let body = req.take_body();
        match body.into_bytes_limit(max).await {
            Ok(bytes) => req.set_body(Body::from(bytes)),
            Err(poem::error::ReadBodyError::PayloadTooLarge) => return too_large(max),
            Err(e) => {
                return ApiError::new(ErrorCode::ValidationError, format!("cannot read body: {e}"))
                    .with_status(StatusCode::BAD_REQUEST)
                    .into_response();
            }
        }
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let (resp, op) = match ep.call(req).await {
            Ok(r) => {
                let r = r.into_response();
                let op = r.data::<poem_openapi::OperationId>().map(|o| o.0);
                (r, op)
            }
            Err(e) => {
                let op = e.data::<poem_openapi::OperationId>().map(|o| o.0);
                (catch_all(e), op)
            }
        };
        let status = resp.status().as_u16();
        let route = match op {
            Some(op) => op.to_string(),
            None if status == 404 => "unmatched".to_string(),
            None => path.split('/').take(3).collect::<Vec<_>>().join("/"),
        };
        let elapsed = started.elapsed();
        metrics::counter!("http_requests_total", "route" => route.clone(), "method" => method.to_string(), "status" => status.to_string()).increment(1);
        metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method.to_string()).record(elapsed.as_secs_f64());
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

fn too_large(max: usize) -> Response {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body exceeds {max} bytes"),
    )
    .with_details(serde_json::json!({ "max_body_bytes": max }))
    .into_response()
}

/// Customer layer: quota headers on every response and a usage row for every call.
pub async fn customer_audit<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.original_uri().path().to_string();
    let user_agent = req
        .headers()
        .get(poem::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let is_create = method == "POST" && path.ends_with("/video-batch");
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
        let mut req = req;
        req.extensions_mut()
            .insert(AuditTemplate(template, started));
        return finish(
            ep.call(req).await.map(IntoResponse::into_response),
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
        &state,
        started,
        method,
        path,
        user_agent,
    )
    .await
}

/// The usage-row template and start time handed to the create handler.
#[derive(Clone)]
pub struct AuditTemplate(pub UsageRow, pub Instant);

async fn finish(
    result: poem::Result<Response>,
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
    let call = ctx.snapshot();
    let runtime = state.runtime();
    let rate = call.rate.clone().unwrap_or_else(|| {
        let scope = if method == "POST" && path.ends_with("/video-batch") {
            SCOPE_BATCH
        } else {
            SCOPE_READ
        };
        let d = &runtime.settings.defaults;
        let limit = if scope == SCOPE_BATCH {
            d.rate_limit_per_min
        } else {
            d.read_rate_limit_per_min
        };
        RateInfo::untouched(scope, limit, Utc::now())
    });
    set_rate_headers(&mut resp, &rate);
    if !call.audited {
        let row = UsageRow {
            api_key_id: call.key_id,
            request_id: call
                .call_request_id
                .clone()
                .or_else(|| Some(ctx.x_request_id.clone())),
            method,
            path,
            status: resp.status().as_u16(),
            error_code: call.error_code.map(|c| c.as_str().to_string()),
            client_ip: ctx.client_ip.map(|i| i.to_string()),
            user_agent,
            latency_us: started.elapsed().as_micros() as i64,
            batch_id: call.batch_id,
            items: 0,
            credits: 0,
        };
        if let Err(e) = usage::record(&state.writer, &row, Utc::now()).await {
            tracing::error!(error = %e, "writing usage row failed");
        }
    }
    Ok(resp)
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
