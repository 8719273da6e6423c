//! The three OpenAPI documents, built in one place from the route types: the services
//! `startup` mounts, the refined JSON served and exported, and the methods each path accepts.
use poem::{EndpointExt, Route};
use poem_openapi::OpenApiService;

use crate::routes::{
    admin::AdminApi, batches::CustomerApi, webhooks::CustomerWebhooksApi, worker::WorkerApi,
};

/// Title shown in the documents.
pub const TITLE: &str = "video-batch-api";

/// Builds one API's document the same way for all three: title, version, licence, server.
fn service<T: poem_openapi::OpenApi>(
    api: T,
    name: &str,
    description: &str,
    server: &str,
) -> OpenApiService<T, ()> {
    OpenApiService::new(api, format!("{TITLE} — {name}"), env!("CARGO_PKG_VERSION"))
        .description(description)
        .license(
            poem_openapi::LicenseObject::new("Apache-2.0")
                .url("https://www.apache.org/licenses/LICENSE-2.0"),
        )
        .server(server)
}

/// The customer document (`/openapi.json`), served under `/api/enterprise`.
pub fn customer_service() -> OpenApiService<(CustomerApi, CustomerWebhooksApi), ()> {
    service(
        (CustomerApi, CustomerWebhooksApi),
        "customer API",
        "Submit batches of video prompts, follow them, and read your credits and usage. \
         Authenticate with the `x-api-key` header. Every error has the same JSON shape.",
        "/api/enterprise",
    )
}

/// The worker document (`/worker/openapi.json`), served under `/api/internal/worker`.
pub fn worker_service() -> OpenApiService<WorkerApi, ()> {
    service(
        WorkerApi,
        "worker API",
        "Internal API of the GPU workers: claim items under a lease and report outcomes.",
        "/api/internal/worker",
    )
}

/// The admin document (`/admin/openapi.json`), served under `/api/admin`.
pub fn admin_service() -> OpenApiService<AdminApi, ()> {
    service(
        AdminApi,
        "admin API",
        "Operators' API: credits, keys, usage and configuration reload.",
        "/api/admin",
    )
}

/// The three documents as pretty JSON, refined (see [`crate::docs`]): (customer, worker, admin).
pub fn specs() -> [(&'static str, String); 3] {
    [
        (
            "openapi.json",
            crate::docs::refine(&customer_service().spec()),
        ),
        (
            "openapi-worker.json",
            crate::docs::refine(&worker_service().spec()),
        ),
        (
            "openapi-admin.json",
            crate::docs::refine(&admin_service().spec()),
        ),
    ]
}

/// The refined document at its URL and Swagger UI showing it, for one API.
pub fn doc_endpoints<T: poem_openapi::OpenApi>(
    service: &OpenApiService<T, ()>,
) -> (
    poem::endpoint::BoxEndpoint<'static>,
    poem::endpoint::BoxEndpoint<'static>,
) {
    let raw = service.spec();
    let refined = crate::docs::refine(&raw);
    let html = service.swagger_ui_html().replace(&raw, &refined);
    let ui = Route::new()
        .at(
            "/",
            poem::endpoint::make_sync(move |_| poem::web::Html(html.clone())),
        )
        .map_to_response()
        .boxed();
    let doc = poem::endpoint::make_sync(move |_| {
        poem::Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(refined.clone())
    })
    .map_to_response()
    .boxed();
    (ui, doc)
}

/// The methods a path of the three APIs accepts, for the `Allow` header of a 405 (RFC 9110),
/// read once from the documents themselves so that they never disagree.
pub fn allowed_methods(path: &str) -> Option<String> {
    static ROUTES: std::sync::OnceLock<Vec<(Vec<String>, Vec<String>)>> =
        std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(|| {
        let mut out = Vec::new();
        for (prefix, spec) in [
            ("/api/enterprise", customer_service().spec()),
            ("/api/internal/worker", worker_service().spec()),
            ("/api/admin", admin_service().spec()),
        ] {
            let doc: serde_json::Value = serde_json::from_str(&spec).unwrap_or_default();
            let Some(paths) = doc["paths"].as_object() else {
                continue;
            };
            for (template, ops) in paths {
                let segments = format!("{prefix}{template}")
                    .split('/')
                    .map(str::to_string)
                    .collect();
                let mut methods: Vec<String> = ops
                    .as_object()
                    .map(|o| o.keys().map(|m| m.to_ascii_uppercase()).collect())
                    .unwrap_or_default();
                methods.sort();
                out.push((segments, methods));
            }
        }
        out
    });
    let parts: Vec<&str> = path.split('/').collect();
    routes
        .iter()
        .find(|(segments, _)| {
            segments.len() == parts.len()
                && segments
                    .iter()
                    .zip(&parts)
                    .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
        })
        .map(|(_, methods)| methods.join(", "))
}
