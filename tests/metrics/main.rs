//! Metrics, in a test binary of their own: the process-wide recorder sees only this file's
//! traffic, so every change is asserted exactly. The two backends take turns.
#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../api/wire.rs"]
mod wire;

use helpers::{Backend, TestApp};

/// The two variants of the test run one after the other, never at once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

both_backends!(
    metrics_parse_and_move_with_traffic,
    a_key_below_its_low_credit_threshold_is_counted
);

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
    // The gauges are sampled in the background (every 5 s, the first time at start).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(12);
    while !scrape()
        .await
        .iter()
        .any(|(s, _)| s.starts_with("queue_items"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "queue depth is exported"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Crossing below `low_credit_threshold` counts one `credits_low_events_total`, and a sample
/// counts the key in `credit_keys_below_threshold`.
async fn a_key_below_its_low_credit_threshold_is_counted(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("low", "initial_credits = 100\nlow_credit_threshold = 50")
        .build()
        .await;
    let scrape = || async { parse_prometheus(&app.metrics_text().await) };
    let _serial = SERIAL.lock().await;
    let before = sum(&scrape().await, "credits_low_events_total", &[]);
    // 6 items × 10 credits: 100 → 40 available.
    let r = app
        .create_batch(app.key("low"), &TestApp::batch_body(Some("low-1"), 6))
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        sum(&scrape().await, "credits_low_events_total", &[]) - before,
        1.0
    );
    // The gauge is process-wide and every app of this binary samples it in the background,
    // each with its own keys: sample this app's keys now and read the gauge at once (again if
    // another app's sample came in between).
    let key_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'low'")
        .await;
    let mut counted = false;
    for _ in 0..20 {
        api::telemetry::sample_low_credits(&app.db(), &[(key_id, 50)])
            .await
            .unwrap();
        if sum(&scrape().await, "credit_keys_below_threshold", &[]) == 1.0 {
            counted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(counted, "the key below its threshold is counted");
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// aggregations, keywords, label names or values.
fn metric_names(expr: &str) -> Vec<String> {
    // Drop label matchers, ranges and grouping clauses.
    let mut plain = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    for c in expr.chars() {
        match c {
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => plain.push(c),
        }
    }
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some(i) = plain.find(&format!("{kw} (")) {
            let end = plain[i..].find(')').map_or(plain.len(), |j| i + j + 1);
            plain.replace_range(i..end, " ");
        }
    }
    let chars: Vec<char> = plain.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            let is_call = j < chars.len() && chars[j] == '(';
            let keyword = ["and", "or", "unless", "bool", "offset", "e"].contains(&word.as_str());
            if !is_call && !keyword {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every metric the Grafana dashboard and the alert rules under `deploy/` name is exported by a
/// freshly started server, before any traffic (counters with known labels start at zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_kit_names_only_exported_metrics() {
    let _serial = SERIAL.lock().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/video-batch-api.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    // `expr:` is either on one line or a `|` block of indented lines.
    let lines: Vec<&str> = rules.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(rest) = l.trim_start().strip_prefix("expr:") {
            if rest.trim() == "|" {
                let indent = l.len() - l.trim_start().len();
                let block: Vec<&str> = lines[i + 1..]
                    .iter()
                    .take_while(|b| b.len() - b.trim_start().len() > indent)
                    .copied()
                    .collect();
                exprs.push(block.join(" "));
            } else {
                exprs.push(rest.trim().to_string());
            }
        }
    }
    assert!(exprs.len() >= 15, "dashboard and rules read: {exprs:?}");
    let app = TestApp::builder(Backend::Sqlite)
        .key("kit", "initial_credits = 10")
        .build()
        .await;
    // The first background tick samples the gauges right after start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let t = app.metrics_text().await;
        if t.contains("queue_oldest_item_age_seconds") || std::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let mut named = std::collections::BTreeSet::new();
    for e in &exprs {
        named.extend(metric_names(e));
    }
    assert!(
        named.contains("credits_total") && named.contains("queue_items"),
        "{named:?}"
    );
    let missing: Vec<&String> = named
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named by deploy/ but not exported: {missing:?}\nexported: {exported:?}"
    );
}
