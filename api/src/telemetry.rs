//! Logging (`RUST_LOG` filtering, text or JSON lines) and Prometheus metrics.
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global log subscriber (once; later calls do nothing).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("duration_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); then this handle renders nothing new.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Describes every metric once, so `/metrics` documents them.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "http_requests_total",
        "HTTP requests by route, method and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        "HTTP latency by route and method"
    );
    describe_counter!(
        "rate_limit_rejections_total",
        "Calls refused by the rate limit, by key and scope"
    );
    describe_counter!(
        "credits_total",
        "Credits moved, by ledger kind (grant, hold, charge, release, adjust)"
    );
    describe_gauge!("queue_items", "Items by status (queued, running)");
    describe_gauge!(
        "webhook_deliveries_pending",
        "Webhook deliveries waiting to be sent"
    );
    describe_counter!("worker_claims_total", "Claim calls");
    describe_counter!("worker_claimed_items_total", "Items leased to workers");
    describe_counter!("worker_reports_total", "Worker reports by kind and outcome");
    describe_counter!("webhook_attempts_total", "Webhook attempts by outcome");
    describe_counter!("config_reloads_total", "Configuration reloads by outcome");
    describe_counter!("batches_created_total", "Batches created");
}
