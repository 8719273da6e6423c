//! `/healthz` and `/readyz`.
use std::sync::Arc;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{IntoResponse, handler};
use serde_json::json;

use crate::state::AppState;

/// The process is up.
#[handler]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "ok": true }))
}

/// The database answers and every migration is applied.
#[handler]
pub async fn readyz(state: Data<&Arc<AppState>>) -> impl IntoResponse {
    match crate::db::migrations_applied(&state.db).await {
        Ok(true) => {
            Json(json!({ "ok": true, "database": "ok", "migrations": "applied" })).into_response()
        }
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ok": false, "database": "ok", "migrations": "pending" })),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "ok": false, "database": "unreachable" })),
            )
                .into_response()
        }
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
