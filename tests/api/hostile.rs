//! A stranger on the network: junk methods and paths, slow clients, bad-key floods, forged
//! forwarding headers and oversize bodies stay bounded in memory, connections and writes.
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

both_backends!(
    bad_key_flood_is_throttled_without_a_row_per_call,
    refused_calls_are_aggregated_into_one_row_per_address_and_outcome,
    oversize_bodies_leave_a_usage_row,
    a_key_flooded_from_a_disallowed_address_writes_bounded_rows,
    a_keys_oversize_bodies_beyond_the_budget_are_aggregated,
);

/// Series of the request metrics in an exposition.
fn request_series(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_methods_and_paths_leave_metrics_flat() {
    let app = TestApp::builder(Backend::Sqlite).build().await;
    let scrape = || app.metrics_text();
    // Warm the fixed label sets first: every junk call below falls into one of them.
    for m in ["JUNKWARM", "GET"] {
        let _ = app
            .client
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                format!("{}/warm/{m}", app.base),
            )
            .send()
            .await;
    }
    let before = scrape().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..2000 {
        let method = reqwest::Method::from_bytes(format!("X{tag}{i}").as_bytes()).unwrap();
        let r = app
            .client
            .request(method, format!("{}/no/such/{tag}/{i}", app.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error());
    }
    let after = scrape().await;
    assert!(
        !after.contains(&tag),
        "no label value may come from the request"
    );
    // Other tests share the process-wide recorder, so allow for their bounded growth only.
    let grown = request_series(&after) as i64 - request_series(&before) as i64;
    assert!(grown < 40, "2,000 junk calls added {grown} request series");
    let bytes = after.len() as i64 - before.len() as i64;
    assert!(
        bytes < 64 * 1024,
        "2,000 junk calls grew /metrics by {bytes} bytes"
    );
    assert!(after.contains("method=\"OTHER\"") && after.contains("route=\"unmatched\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_live_on_the_ops_listener_only() {
    let app = TestApp::builder(Backend::Sqlite)
        .key("acme", "initial_credits = 10")
        .build()
        .await;
    let public = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404, "the public port exposes no metrics");
    let ops = app
        .client
        .get(format!("{}/metrics", app.ops_base))
        .send()
        .await
        .unwrap();
    assert_eq!(ops.status(), 200);
    for path in ["/healthz", "/readyz"] {
        for base in [&app.base, &app.ops_base] {
            let r = app
                .client
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{base}{path}");
        }
    }
    let customer = app
        .client
        .get(format!("{}/api/enterprise/credits", app.ops_base))
        .header("x-api-key", app.key("acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(customer.status(), 404, "the ops port serves no API");
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&buf).into_owned()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_header_clients_are_disconnected_while_others_are_served() {
    let mut app = TestApp::builder(Backend::Sqlite)
        .settings(|s| {
            s.server.header_timeout = std::time::Duration::from_secs(1);
            s.server.shutdown_grace = std::time::Duration::from_secs(30);
        })
        .build()
        .await;
    let addr = format!("127.0.0.1:{}", app.port);
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    // One of them trickles a byte now and then, which an idle timeout alone would not catch.
    let mut trickler = slow.pop().unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            if trickler.write_all(b"a").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "normal calls are served meanwhile");
    for s in &mut slow {
        assert!(
            read_until_closed(s, Duration::from_secs(5)).await.is_some(),
            "a slow-header connection is closed"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        tokio::time::timeout(Duration::from_secs(5), trickle)
            .await
            .unwrap()
            .unwrap(),
        "a trickling client is cut at the header deadline"
    );
    // Slow clients do not hold up shutdown.
    let mut held = TcpStream::connect(&addr).await.unwrap();
    held.write_all(b"GET /healthz HTTP/1.1\r\nHost")
        .await
        .unwrap();
    let t = Instant::now();
    app.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown waited {:?} for a slow client",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_body_clients_get_408_and_are_disconnected() {
    let app = TestApp::builder(Backend::Sqlite)
        .settings(|s| s.server.body_timeout = std::time::Duration::from_secs(1))
        .key("acme", "initial_credits = 10")
        .build()
        .await;
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", app.port))
        .await
        .unwrap();
    let head = format!(
        "POST /api/enterprise/video-batch HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"items\":",
        app.key("acme")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the server answers and closes");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("VALIDATION_ERROR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_wait_instead_of_failing() {
    let app = TestApp::builder(Backend::Sqlite)
        .settings(|s| {
            s.server.max_connections = 2;
            s.server.header_timeout = std::time::Duration::from_secs(1);
        })
        .build()
        .await;
    let addr = format!("127.0.0.1:{}", app.port);
    // The two idle connections are in the listen backlog before the third (their handshakes
    // completed first), so they take both slots; neither is cut before its header deadline,
    // which starts when it is accepted, after `connected`.
    let connected = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        idle.push(s);
    }
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", app.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the third connection is served once a slot frees");
    assert_eq!(r.status(), 200);
    assert!(
        connected.elapsed() >= Duration::from_secs(1),
        "it was served only once an idle connection was cut at its header deadline ({:?})",
        connected.elapsed()
    );
}

async fn usage_rows(app: &TestApp, filter: &str) -> i64 {
    app.scalar(&format!(
        "SELECT COUNT(*) AS v FROM usage_event WHERE {filter}"
    ))
    .await
}

async fn bad_key_flood_is_throttled_without_a_row_per_call(backend: Backend) {
    let mut app = TestApp::builder(backend)
        .key("acme", "initial_credits = 10")
        .build()
        .await;
    // One frozen minute: the budget neither refills nor turns over while the flood runs.
    app.freeze_clock();
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..3000 {
        let r = app
            .client
            .get(format!("{}/api/enterprise/credits", app.base))
            .header("x-api-key", format!("vb_wrong_{i}"))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            401 => unauthorized += 1,
            429 => {
                throttled += 1;
                // 30 per minute, refilled one every 2 s: the next call is 2 s away.
                assert_eq!(r.headers()["retry-after"], "2");
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["error"], "RATE_LIMIT_EXCEEDED");
            }
            s => panic!("unexpected status {s}"),
        }
        if i == 1500 {
            let good = app
                .client
                .get(format!("{}/api/enterprise/credits", app.base))
                .header("x-api-key", app.key("acme"))
                .send()
                .await
                .unwrap();
            assert_eq!(good.status(), 200, "a valid key from the same address");
        }
    }
    assert_eq!((unauthorized, throttled), (30, 2970));
    assert_eq!(
        usage_rows(&app, "status = 401").await,
        30,
        "one row per answered 401"
    );
    assert_eq!(
        usage_rows(&app, "status = 429").await,
        0,
        "none yet for the throttled calls: their minute is still open"
    );
    app.stop().await;
    assert_eq!(
        usage_rows(&app, "status = 429 AND api_key_id IS NULL").await,
        1,
        "one aggregated row for the address, minute and outcome, written at shutdown"
    );
    assert_eq!(
        app.scalar(
            "SELECT CAST(SUM(count) AS BIGINT) AS v FROM usage_event \
             WHERE status = 429 AND api_key_id IS NULL AND client_ip = '127.0.0.1'"
        )
        .await,
        2970
    );
}

async fn refused_calls_are_aggregated_into_one_row_per_address_and_outcome(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.server.unauthenticated_per_min = 5)
        .build()
        .await;
    app.freeze_clock();
    for _ in 0..200 {
        let r = app
            .client
            .post(format!("{}/api/enterprise/video-batch", app.base))
            .header("x-api-key", "vb_not_a_key")
            .json(&TestApp::batch_body(None, 1))
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 401 | 429));
    }
    {
        let state = app.state();
        state.strangers.flush_all(&state.writes).await;
    };
    let answered = usage_rows(&app, "status = 401").await;
    let aggregated = app
        .scalar("SELECT COUNT(*) AS v FROM usage_event WHERE status = 429")
        .await;
    let counted = app
        .scalar(
            "SELECT CAST(SUM(count) AS BIGINT) AS v FROM usage_event \
             WHERE status = 429 AND error_code = 'RATE_LIMIT_EXCEEDED' AND client_ip = '127.0.0.1'",
        )
        .await;
    assert_eq!(answered, 5, "the budget, audited one row each");
    assert_eq!(
        aggregated, 1,
        "one row for the address, the (frozen) minute and the outcome"
    );
    assert_eq!(counted, 195, "every other call is in the aggregated row");
}

async fn oversize_bodies_leave_a_usage_row(backend: Backend) {
    let app = TestApp::builder(backend)
        .settings(|s| s.server.max_body_bytes = 1024)
        .key("acme", "initial_credits = 10")
        .build()
        .await;
    let big = serde_json::json!({ "items": [{ "prompt": "x".repeat(4096) }] });
    let r = app
        .client
        .post(format!("{}/api/enterprise/video-batch", app.base))
        .header("x-api-key", app.key("acme"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.headers().contains_key("x-ratelimit-limit"));
    let chunked = {
        let mut s = TcpStream::connect(format!("127.0.0.1:{}", app.port))
            .await
            .unwrap();
        let body = serde_json::to_vec(&big).unwrap();
        let mut req = format!(
            "POST /api/enterprise/video-batch HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
            app.key("acme"),
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req.extend_from_slice(b"\r\n0\r\n\r\n");
        s.write_all(&req).await.unwrap();
        read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("answer")
    };
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    let bad_length = {
        let mut s = TcpStream::connect(format!("127.0.0.1:{}", app.port))
            .await
            .unwrap();
        s.write_all(
            b"POST /api/enterprise/video-batch HTTP/1.1\r\nHost: x\r\ncontent-length: 12abc\r\n\r\n",
        )
        .await
        .unwrap();
        read_until_closed(&mut s, Duration::from_secs(5)).await
    };
    // hyper itself refuses a malformed Content-Length before the application sees it.
    assert!(bad_length.is_some());
    assert_eq!(
        usage_rows(
            &app,
            "status = 413 AND error_code = 'PAYLOAD_TOO_LARGE' AND api_key_id IS NOT NULL"
        )
        .await,
        2,
        "both oversize calls are audited against the key"
    );
}

/// A leaked key used from an address its allowlist refuses: the first `refused_per_min` calls
/// per minute are answered 403 and audited one row each, the rest 429 and one aggregated row,
/// while the same key keeps working from its allowed address.
async fn a_key_flooded_from_a_disallowed_address_writes_bounded_rows(backend: Backend) {
    // 127.0.0.2 is the key's proxy; the flood comes straight from 127.0.0.1.
    let mut app = TestApp::builder(backend)
        .settings(|s| s.server.trusted_proxies = vec!["127.0.0.2/32".parse().unwrap()])
        .key(
            "fenced",
            "initial_credits = 10\nip_allowlist = [\"10.9.9.9/32\"]",
        )
        .build()
        .await;
    app.freeze_clock();
    let key = app.key("fenced").to_string();
    let key_id = app
        .scalar("SELECT CAST(id AS BIGINT) AS v FROM api_key WHERE name = 'fenced'")
        .await;
    let via_proxy = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let (mut refused, mut throttled, mut allowed) = (0, 0, 0);
    for i in 0..3000 {
        let r = app
            .client
            .get(format!("{}/api/enterprise/credits", app.base))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            403 => refused += 1,
            429 => {
                throttled += 1;
                assert_eq!(r.headers()["retry-after"], "2");
                assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["error"], "RATE_LIMIT_EXCEEDED");
                assert_eq!(body["details"]["scope"], "refused");
            }
            s => panic!("unexpected status {s}"),
        }
        if i % 100 == 50 {
            let good = via_proxy
                .get(format!("{}/api/enterprise/credits", app.base))
                .header("x-api-key", &key)
                .header("x-forwarded-for", "10.9.9.9")
                .send()
                .await
                .unwrap();
            assert_eq!(good.status(), 200, "the key from its allowed address");
            allowed += 1;
        }
    }
    assert_eq!((refused, throttled, allowed), (30, 2970, 30));
    app.stop().await;
    let rows = async |filter: &str| {
        usage_rows(
            &app,
            &format!("api_key_id = {key_id} AND client_ip = '127.0.0.1' AND {filter}"),
        )
        .await
    };
    assert_eq!(rows("status = 403").await, 30, "the budget, one row each");
    assert_eq!(
        rows("status = 429").await,
        1,
        "the rest in one row for the key, address, minute and outcome"
    );
    assert_eq!(
        app.scalar(&format!(
            "SELECT CAST(SUM(count) AS BIGINT) AS v FROM usage_event \
             WHERE api_key_id = {key_id} AND status = 429 AND error_code = 'RATE_LIMIT_EXCEEDED'"
        ))
        .await,
        2970
    );
    assert_eq!(
        usage_rows(&app, &format!("api_key_id = {key_id}")).await,
        30 + 1 + 30,
        "the flood wrote 31 rows; the allowed calls one each"
    );
    assert_eq!(
        usage_rows(
            &app,
            &format!("api_key_id = {key_id} AND status = 200 AND client_ip = '10.9.9.9'")
        )
        .await,
        30
    );
}

/// A valid key's oversize bodies spend the same per-address budget of refused calls.
async fn a_keys_oversize_bodies_beyond_the_budget_are_aggregated(backend: Backend) {
    let mut app = TestApp::builder(backend)
        .settings(|s| {
            s.server.max_body_bytes = 1024;
            s.server.refused_per_min = 2;
        })
        .key("acme", "initial_credits = 10")
        .build()
        .await;
    app.freeze_clock();
    let big = serde_json::json!({ "items": [{ "prompt": "x".repeat(4096) }] });
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = app
            .client
            .post(format!("{}/api/enterprise/video-batch", app.base))
            .header("x-api-key", app.key("acme"))
            .json(&big)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [413, 413, 429, 429, 429]);
    let ok = app
        .create_batch(app.key("acme"), &TestApp::batch_body(None, 1))
        .await;
    assert_eq!(ok.status(), 201, "the key's other calls are not throttled");
    app.stop().await;
    assert_eq!(
        usage_rows(&app, "status = 413 AND api_key_id IS NOT NULL").await,
        2
    );
    assert_eq!(
        app.scalar(
            "SELECT CAST(SUM(count) AS BIGINT) AS v FROM usage_event \
             WHERE status = 429 AND api_key_id IS NOT NULL"
        )
        .await,
        3
    );
    assert_eq!(
        usage_rows(&app, "status = 429 AND api_key_id IS NOT NULL").await,
        1
    );
}

/// Sends a raw request from 127.0.0.1 (a trusted proxy in these tests) with the given
/// `X-Forwarded-For` bytes; returns the status.
async fn via_proxy(app: &TestApp, key: &str, forwarded: Option<&[u8]>) -> u16 {
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", app.port))
        .await
        .unwrap();
    let mut req = format!(
        "GET /api/enterprise/credits HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\nconnection: close\r\n"
    )
    .into_bytes();
    if let Some(f) = forwarded {
        req.extend_from_slice(b"x-forwarded-for: ");
        req.extend_from_slice(f);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    answer
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_addresses_fail_closed() {
    let app = TestApp::builder(Backend::Sqlite)
        .settings(|s| s.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()])
        .key("client", "ip_allowlist = [\"198.51.100.7/32\"]")
        .key("proxyaddr", "ip_allowlist = [\"127.0.0.1/32\"]")
        .key("open", "")
        .build()
        .await;
    let client = app.key("client").to_string();
    let proxyaddr = app.key("proxyaddr").to_string();
    let open = app.key("open").to_string();
    assert_eq!(via_proxy(&app, &client, Some(b"198.51.100.7")).await, 200);
    assert_eq!(
        via_proxy(&app, &client, Some(b"\xff\xfe bad, 198.51.100.7")).await,
        200,
        "a non-UTF-8 header is read lossily; the right-most untrusted hop still counts"
    );
    assert_eq!(
        via_proxy(&app, &client, Some(b"198.51.100.7, 203.0.113.9")).await,
        403,
        "a hop the client prepended is not believed"
    );
    assert_eq!(
        via_proxy(&app, &client, Some(b"[198.51.100.7]:443")).await,
        403
    );
    assert_eq!(
        via_proxy(&app, &client, Some(b"198.51.100.7:5123")).await,
        200
    );
    for forwarded in [
        None,
        Some(&b"garbage"[..]),
        Some(&b"198.51.100.7, \xff"[..]),
        Some(&b"127.0.0.1"[..]),
    ] {
        assert_eq!(
            via_proxy(&app, &proxyaddr, forwarded).await,
            403,
            "an unknown client address is never checked against the proxy's own ({forwarded:?})"
        );
        assert_eq!(
            via_proxy(&app, &open, forwarded).await,
            200,
            "a key without an allowlist does not need the address"
        );
    }
}

/// An `Idempotency-Key` that is not text is refused (400), never silently ignored: ignoring it
/// would turn a retry into a second batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_idempotency_key_is_refused() {
    let app = TestApp::builder(Backend::Sqlite)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", app.port))
        .await
        .unwrap();
    let body = br#"{"items":[{"prompt":"p"}]}"#;
    let mut req = format!(
        "POST /api/enterprise/video-batch HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        app.key("acme"),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(b"Idempotency-Key: \xd7\xf8\xc2\x9b\r\n\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 0);
}
