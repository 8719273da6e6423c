//! Metrics, in a test binary of their own: the process-wide recorder sees only this file's
//! traffic, so every change is asserted exactly. The two backends take turns.
#[path = "../api/helpers.rs"]
mod helpers;

use helpers::{Backend, TestApp};

/// The two variants of the test run one after the other, never at once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

both_backends!(metrics_parse_and_move_with_traffic);

/// Parses Prometheus text exposition; panics on a malformed line. Returns (series, value).
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        out.push((series.to_string(), v));
    }
    out
}

fn sum(series: &[(String, f64)], name: &str, must_contain: &[&str]) -> f64 {
    series
        .iter()
        .filter(|(s, _)| s.starts_with(name) && must_contain.iter().all(|m| s.contains(m)))
        .map(|(_, v)| v)
        .sum()
}

async fn metrics_parse_and_move_with_traffic(backend: Backend) {
    let tag = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let app = TestApp::builder(backend)
        .key(&tag, "initial_credits = 1000\nrate_limit_per_min = 2")
        .build()
        .await;
    let scrape = || async { parse_prometheus(&app.metrics_text().await) };
    app.freeze_clock();
    let _serial = SERIAL.lock().await;
    let before = scrape().await;
    let key = app.key(&tag).to_string();
    for i in 0..3 {
        app.create_batch(&key, &TestApp::batch_body(Some(&format!("m-{i}")), 1))
            .await;
    }
    let after = scrape().await;
    let label = format!("key=\"{tag}\"");
    assert_eq!(
        sum(&after, "rate_limit_rejections_total", &[&label]),
        1.0,
        "who is rate limited, and in which scope"
    );
    // This process runs no other test at the same time: every delta is exact.
    let delta =
        |name: &str, labels: &[&str]| sum(&after, name, labels) - sum(&before, name, labels);
    let created = |s: &[(String, f64)]| {
        sum(
            s,
            "http_requests_total",
            &["route=\"create_batch\"", "status=\"201\""],
        )
    };
    assert_eq!(created(&after) - created(&before), 2.0);
    assert_eq!(
        delta(
            "http_request_duration_seconds_count",
            &["route=\"create_batch\""]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "http_requests_total",
            &["route=\"create_batch\"", "status=\"429\""]
        ),
        1.0
    );
    assert_eq!(delta("credits_total", &["kind=\"hold\""]), 20.0);
    assert!(
        after.iter().any(|(s, _)| s.starts_with("queue_items")),
        "queue depth is exported"
    );
}
