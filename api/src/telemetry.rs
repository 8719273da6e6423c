//! Logging (`RUST_LOG` filtering, text or JSON lines) and Prometheus metrics.
use std::sync::OnceLock;

use crate::domain::ids::AccountId;
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
        "store_errors_total",
        "Store failures by kind (full, io, unavailable, timeout); each call they failed was answered 503"
    );
    describe_gauge!(
        "store_up",
        "1 while the readiness probe finds the store readable and writable, else 0"
    );
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
        "webhook_endpoints_disabled",
        "Webhook endpoints disabled after failing for webhooks.disable_after (their events are held)"
    );
    describe_counter!(
        "webhook_endpoints_disabled_total",
        "Webhook endpoints disabled after failing for webhooks.disable_after"
    );
    describe_gauge!(
        "webhook_deliveries_pending",
        "Webhook deliveries waiting to be sent"
    );
    describe_counter!("worker_claims_total", "Claim calls");
    describe_counter!("worker_claimed_items_total", "Items leased to workers");
    describe_counter!("webhook_attempts_total", "Webhook attempts by outcome");
    describe_counter!("config_reloads_total", "Configuration reloads by outcome");
    describe_counter!("batches_created_total", "Batches created");
    describe_counter!(
        "unauthenticated_throttled_total",
        "Calls without a valid key refused by the per-address budget"
    );
    describe_counter!(
        "refused_key_throttled_total",
        "A valid key's refused calls beyond its per-address budget"
    );
    describe_counter!(
        "retention_pruned_rows_total",
        "Rows deleted by the retention pruner, by table"
    );
    describe_gauge!(
        "queue_oldest_item_age_seconds",
        "Age of the item at the head of the queue (0 when nothing is queued)"
    );
    describe_gauge!("credits_held", "Credits held across all wallets");
    describe_gauge!(
        "credit_keys_below_threshold",
        "Accounts whose available credits are below their low_credit_threshold"
    );
    describe_counter!(
        "items_expired_total",
        "Queued items expired because their batch's completion window ended"
    );
    describe_counter!(
        "credits_low_events_total",
        "Crossings below a key's low_credit_threshold (each one credits.low event)"
    );
    describe_histogram!(
        "write_group_size",
        "Units of work committed together by one group commit"
    );
    describe_counter!(
        "write_conflicts_total",
        "Units of work rolled back to their savepoint after a deadlock or serialization failure, and run again"
    );
}

/// Exports every counter whose label values are known in advance at zero, so that alert rules
/// and dashboards can rely on the series before the first event (a rate over a series that
/// does not exist yet is no rate at all). Called at start and after each reload.
pub fn register_known_series<'a>(key_names: impl Iterator<Item = &'a str>) {
    for kind in ["grant", "hold", "charge", "release", "adjust"] {
        metrics::counter!("credits_total", "kind" => kind).increment(0);
    }
    for result in ["success", "http_error", "transport_error", "refused"] {
        metrics::counter!("webhook_attempts_total", "result" => result).increment(0);
    }
    for outcome in ["applied", "followed", "rejected"] {
        metrics::counter!("config_reloads_total", "outcome" => outcome).increment(0);
    }
    for table in ["usage_event", "webhook_delivery", "usage_rollup"] {
        metrics::counter!("retention_pruned_rows_total", "table" => table).increment(0);
    }
    for kind in crate::fault::FaultKind::ALL {
        metrics::counter!("store_errors_total", "kind" => kind.as_str()).increment(0);
    }
    for name in [
        "batches_created_total",
        "worker_claims_total",
        "worker_claimed_items_total",
        "unauthenticated_throttled_total",
        "refused_key_throttled_total",
        "write_conflicts_total",
        "credits_low_events_total",
        "items_expired_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    // Request series exist once a route is called; the health route's are there from the start
    // so that request-rate and latency expressions have a series to read.
    metrics::counter!("http_requests_total", "route" => "healthz", "method" => "GET", "status" => "200")
        .increment(0);
    let _ = metrics::histogram!("http_request_duration_seconds", "route" => "healthz", "method" => "GET");
    for key in key_names {
        for scope in ["batch", "read"] {
            metrics::counter!("rate_limit_rejections_total", "key" => key.to_string(), "scope" => scope)
                .increment(0);
        }
    }
}

/// Queue depth gauges, read through the partial indexes.
pub async fn sample_gauges(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    use crate::store::{items, wallets, webhooks};
    let (queued, running) = items::queue_depth(db).await?;
    metrics::gauge!("queue_items", "status" => "queued").set(queued as f64);
    metrics::gauge!("queue_items", "status" => "running").set(running as f64);
    metrics::gauge!("webhook_deliveries_pending").set(webhooks::pending_count(db).await? as f64);
    metrics::gauge!("webhook_endpoints_disabled")
        .set(webhooks::disabled_endpoints(db).await? as f64);
    // The head of the fair queue (through its partial index): how long work has been waiting.
    let age = items::queue_head_created_at(db).await?.map_or(0.0, |t| {
        (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    });
    metrics::gauge!("queue_oldest_item_age_seconds").set(age);
    let held = wallets::total_held(db).await?;
    metrics::gauge!("credits_held").set(held as f64);
    Ok(())
}

/// Keys whose available credits are below their `low_credit_threshold` (`thresholds`: key
/// id and threshold of every key that has one).
pub async fn sample_low_credits(
    db: &sea_orm::DatabaseConnection,
    thresholds: &[(i64, i64)],
) -> Result<(), sea_orm::DbErr> {
    let mut below = 0u32;
    for (key_id, threshold) in thresholds {
        if crate::store::wallets::read(db, AccountId(*key_id))
            .await?
            .available()
            < *threshold
        {
            below += 1;
        }
    }
    metrics::gauge!("credit_keys_below_threshold").set(f64::from(below));
    Ok(())
}
