//! `/healthz` and `/readyz`.
use std::sync::Arc;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{IntoResponse, handler};
use serde_json::json;

use crate::readiness::StoreState;
use crate::state::AppState;

/// The process is up.
#[handler]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "ok": true }))
}

/// The store answers reads and takes writes, and every migration is applied: the background
/// probe's latest finding (see [`crate::readiness`]), so this never waits for the store.
#[handler]
pub async fn readyz(state: Data<&Arc<AppState>>) -> impl IntoResponse {
    let found = state.readiness.get();
    let body = json!({
        "ok": found == StoreState::Ready,
        "database": found.database(),
        "migrations": found.migrations(),
    });
    if found == StoreState::Ready {
        Json(body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Prometheus text exposition of the process's metrics. Gauges that need a query are sampled
/// in the background, so a scrape never touches the database.
#[handler]
pub async fn metrics() -> impl IntoResponse {
    crate::telemetry::metrics()
        .render()
        .with_content_type("text/plain; version=0.0.4")
}
