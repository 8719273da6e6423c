//! Webhook delivery: signatures as a customer verifies them, retries, restarts, two
//! dispatchers, 410, Retry-After, exhaustion and redelivery.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use poem::http::StatusCode;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, IntoResponse, Request, Response, Route, Server, handler, post};
use serde_json::Value;
use sha2::Sha256;

use crate::both_backends;
use crate::helpers::{Backend, TestApp};

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) id: String,
    timestamp: i64,
    signature: String,
    pub(crate) body: String,
    pub(crate) at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<(u16, Option<&'static str>)>>,
    location: Mutex<Option<String>>,
}

/// A local webhook endpoint that answers from a script (then 200) and records every call.
pub(crate) struct Receiver {
    port: u16,
    state: Arc<ReceiverState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

#[handler]
async fn receive(
    req: &Request,
    body: String,
    state: poem::web::Data<&Arc<ReceiverState>>,
) -> Response {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    state.got.lock().unwrap().push(Received {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp").parse().unwrap_or(0),
        signature: h("webhook-signature"),
        body,
        at: Instant::now(),
    });
    let (status, retry_after) = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((200, None));
    let mut resp = StatusCode::from_u16(status).unwrap().into_response();
    if (300..400).contains(&status)
        && let Some(to) = state.location.lock().unwrap().clone()
    {
        resp.headers_mut().insert("location", to.parse().unwrap());
    }
    if let Some(ra) = retry_after {
        resp.headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    resp
}

impl Receiver {
    pub(crate) async fn start(port: u16, script: &[(u16, Option<&'static str>)]) -> Receiver {
        let acceptor = TcpListener::bind(format!("127.0.0.1:{port}"))
            .into_acceptor()
            .await
            .unwrap();
        Self::start_with(acceptor, script)
    }

    /// Starts listening on `socket`, a port reserved earlier with [`reserve_port`].
    pub(crate) fn start_on(
        socket: tokio::net::TcpSocket,
        script: &[(u16, Option<&'static str>)],
    ) -> Receiver {
        let listener = socket.listen(128).unwrap();
        Self::start_with(
            poem::listener::TcpAcceptor::from_tokio(listener).unwrap(),
            script,
        )
    }

    fn start_with(
        acceptor: poem::listener::TcpAcceptor,
        script: &[(u16, Option<&'static str>)],
    ) -> Receiver {
        let state = Arc::new(ReceiverState::default());
        state.script.lock().unwrap().extend(script.iter().cloned());
        let port = acceptor.local_addr()[0].as_socket_addr().unwrap().port();
        let app = Route::new()
            .at("/hook", post(receive))
            .data(Arc::clone(&state));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(
                app,
                async move {
                    let _ = rx.await;
                },
                Some(Duration::from_secs(1)),
            ),
        );
        Receiver {
            port,
            state,
            stop: Some(tx),
        }
    }

    /// Redirect answers (3xx in the script) point at `to`.
    pub(crate) fn redirect_to(&self, to: &str) {
        *self.state.location.lock().unwrap() = Some(to.to_string());
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub(crate) fn got(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    pub(crate) async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.got().len() >= n {
                return self.got();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("receiver got {} of {n} webhooks", self.got().len());
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Verifies a webhook exactly as a customer would, with the Standard Webhooks rules.
pub(crate) fn verify(secret: &str, r: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", r.id, r.timestamp, r.body).as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let fresh = (chrono::Utc::now().timestamp() - r.timestamp).abs() < 300;
    fresh
        && r.signature
            .split(' ')
            .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

/// A port that stays ours but refuses connections (bound, not listening) until a receiver
/// starts on it with [`Receiver::start_on`]: it is never released for another process to take.
pub(crate) fn reserve_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// An app whose key `acme` sends its webhooks to `url`, retried after each of `schedule`
/// seconds.
async fn app_for(backend: Backend, url: &str, schedule: &[u64]) -> TestApp {
    let schedule: Vec<Duration> = schedule.iter().map(|s| Duration::from_secs(*s)).collect();
    TestApp::builder(backend)
        .key(
            "acme",
            &format!("initial_credits = 10000\nrate_limit_per_min = 1000\nwebhook_url = \"{url}\"\nwebhook_secret = \"{SECRET}\""),
        )
        .settings(move |s| {
            s.webhooks.retry_schedule = schedule.clone();
            s.webhooks.timeout = Duration::from_secs(5);
        })
        .build()
        .await
}

async fn complete_batch(app: &TestApp, rid: &str, n: usize) -> String {
    let r = app
        .create_batch(app.key("acme"), &TestApp::batch_body(Some(rid), n))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while done < n {
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} items could be claimed"
        );
        for item in app.claim("w", 10).await {
            assert_eq!(app.complete(&item).await.status(), 200);
            done += 1;
        }
    }
    id
}

async fn deliveries(app: &TestApp) -> Vec<Value> {
    app.client
        .get(format!("{}/api/admin/webhooks", app.base))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub(crate) async fn wait_status(app: &TestApp, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let d = deliveries(app).await;
        if let Some(x) = d.iter().find(|x| x["status"] == status) {
            return x.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no delivery reached {status}: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

both_backends!(
    reference_worker_batch_is_signed_and_retried_until_success,
    pending_delivery_survives_a_restart,
    two_dispatchers_send_each_attempt_once,
    gone_stops_retry_after_delays_exhaustion_fails_and_redelivery_succeeds,
    item_events_for_subscribed_keys_and_rotation_signatures,
);

async fn item_events_for_subscribed_keys_and_rotation_signatures(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    const OLD: &str = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let app = TestApp::builder(backend)
        .key(
            "acme",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\
                 webhook_previous_secret = \"{OLD}\"\n\
                 webhook_events = [\"batch.completed\", \"item.succeeded\", \"item.failed\"]",
                receiver.url()
            ),
        )
        // Same endpoint, default events: no item.* event.
        .key(
            "plain",
            &format!(
                "initial_credits = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                receiver.url()
            ),
        )
        .build()
        .await;
    let r = app
        .create_batch(app.key("plain"), &TestApp::batch_body(Some("ev-plain"), 2))
        .await;
    assert_eq!(r.status(), 201);
    let plain_batch = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let items = app.claim("w", 2).await;
    assert_eq!(items.len(), 2);
    assert_eq!(app.complete(&items[0]).await.status(), 200);
    assert_eq!(app.fail(&items[1], false).await.status(), 200);
    let r = app
        .create_batch(app.key("acme"), &TestApp::batch_body(Some("ev"), 2))
        .await;
    assert_eq!(r.status(), 201);
    let items = app.claim("w", 2).await;
    assert_eq!(app.complete(&items[0]).await.status(), 200);
    assert_eq!(app.fail(&items[1], false).await.status(), 200);
    // The outbox holds every event either key will ever get: the unsubscribed key's batch has
    // its batch.completed and no item event.
    let rows = crate::helpers::wait_outbox_final(&app.db(), 4).await;
    let plain: Vec<&str> = rows
        .iter()
        .filter(|r| r.batch_id.as_deref() == Some(plain_batch.as_str()))
        .map(|r| r.event_type.as_str())
        .collect();
    assert_eq!(plain, ["batch.completed"], "{rows:?}");
    assert_eq!(rows.len(), 4, "{rows:?}");
    let got = receiver.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 4);
    let got: Vec<_> = got
        .into_iter()
        .filter(|r| {
            serde_json::from_str::<Value>(&r.body).unwrap()["data"]["batch_id"]
                != plain_batch.as_str()
        })
        .collect();
    assert_eq!(got.len(), 3, "the subscribed key got its three events");
    let mut types: Vec<String> = got
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(&r.body).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    types.sort();
    assert_eq!(types, ["batch.completed", "item.failed", "item.succeeded"]);
    for r in &got {
        assert!(verify(SECRET, r), "new secret verifies");
        assert!(verify(OLD, r), "previous secret verifies during rotation");
        assert_eq!(r.signature.split(' ').count(), 2);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        if body["type"] != "batch.completed" {
            assert!(body["data"]["item"]["item_id"].is_string(), "{body}");
        }
    }
}

async fn reference_worker_batch_is_signed_and_retried_until_success(backend: Backend) {
    let receiver = Receiver::start(0, &[(500, None), (500, None)]).await;
    let app = app_for(backend, &receiver.url(), &[1, 1, 1]).await;
    let r = app
        .create_batch(app.key("acme"), &TestApp::batch_body(Some("wh-1"), 2))
        .await;
    let batch_id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    api::worker_client::run(api::worker_client::WorkerArgs {
        base_url: app.base.clone(),
        secret: crate::helpers::WORKER_SECRET.into(),
        concurrency: 2,
        renderer_cmd: "cat >/dev/null; echo https://cdn.example/$ITEM_ID.mp4".into(),
        worker_id: "ref".into(),
        lease_seconds: 30,
        timeout_seconds: 30,
        exit_when_idle: true,
        poll_seconds: 1,
    })
    .await
    .unwrap();
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    // Once the one delivery is final no attempt follows: the receiver saw all there will be.
    let d = wait_status(&app, "succeeded", Duration::from_secs(5)).await;
    let rows = crate::helpers::wait_outbox_final(&app.db(), 1).await;
    assert_eq!(rows.len(), 1, "one delivery: {rows:?}");
    let got_after = receiver.got();
    assert_eq!(got_after.len(), 3, "exactly three attempts");
    assert!(
        got.iter().all(|r| r.id == got[0].id),
        "webhook-id stable across attempts"
    );
    assert!(got[0].id.starts_with("msg_"));
    assert!(
        got.iter().all(|r| verify(SECRET, r)),
        "every signature verifies"
    );
    assert!(
        got.windows(2)
            .all(|w| w[1].at.duration_since(w[0].at) >= Duration::from_millis(800))
    );
    assert!(got.windows(2).all(|w| w[1].timestamp >= w[0].timestamp));
    let body: Value = serde_json::from_str(&got[2].body).unwrap();
    assert_eq!(body["type"], "batch.completed");
    assert_eq!(body["data"]["batch_id"], batch_id.as_str());
    assert_eq!(body["data"]["counts"]["succeeded"], 2);
    assert!(body["data"].get("items").is_none());
    assert_eq!(d["attempt_count"], 3);
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM webhook_attempt")
            .await,
        3
    );
}

async fn pending_delivery_survives_a_restart(backend: Backend) {
    let (socket, port) = reserve_port();
    let mut app = app_for(
        backend,
        &format!("http://127.0.0.1:{port}/hook"),
        &[1, 1, 1, 1, 1],
    )
    .await;
    complete_batch(&app, "restart-1", 1).await;
    // The receiver is down: attempts fail and the delivery stays pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app
        .scalar("SELECT COUNT(*) AS v FROM webhook_attempt")
        .await
        < 1
    {
        assert!(Instant::now() < deadline, "no attempt made");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
    let receiver = Receiver::start_on(socket, &[]);
    app.restart().await;
    let got = receiver.wait_for(1, Duration::from_secs(15)).await;
    assert!(verify(SECRET, &got[0]));
    wait_status(&app, "succeeded", Duration::from_secs(5)).await;
}

async fn two_dispatchers_send_each_attempt_once(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let app = app_for(backend, &receiver.url(), &[1]).await;
    let peer = app.peer().await;
    for i in 0..20 {
        complete_batch(
            if i % 2 == 0 { &app } else { &peer },
            &format!("two-{i}"),
            1,
        )
        .await;
    }
    receiver.wait_for(20, Duration::from_secs(20)).await;
    // Every delivery final with one attempt: neither dispatcher sends anything more.
    let rows = crate::helpers::wait_outbox_final(&app.db(), 20).await;
    assert_eq!(rows.len(), 20);
    for r in &rows {
        assert_eq!(
            (r.status.as_str(), r.attempt_count, r.attempts),
            ("succeeded", 1, 1),
            "{r:?}"
        );
    }
    let got = receiver.got();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *per_id.entry(r.id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 20);
    assert!(
        per_id.values().all(|n| *n == 1),
        "an attempt was sent twice: {per_id:?}"
    );
}

async fn gone_stops_retry_after_delays_exhaustion_fails_and_redelivery_succeeds(backend: Backend) {
    // 410 stops at once.
    let gone = Receiver::start(0, &[(410, None)]).await;
    let app = app_for(backend.clone(), &gone.url(), &[1, 1]).await;
    complete_batch(&app, "gone", 1).await;
    let d = wait_status(&app, "failed", Duration::from_secs(10)).await;
    assert_eq!(d["attempt_count"], 1);
    assert_eq!(d["last_status_code"], 410);
    drop(app);

    // Retry-After later than the schedule is honoured.
    let slow = Receiver::start(0, &[(503, Some("3"))]).await;
    let app = app_for(backend.clone(), &slow.url(), &[1]).await;
    complete_batch(&app, "slow", 1).await;
    let got = slow.wait_for(2, Duration::from_secs(15)).await;
    assert!(
        got[1].at.duration_since(got[0].at) >= Duration::from_millis(2900),
        "Retry-After honoured"
    );
    drop(app);

    // Exhaustion, then redelivery with the same webhook-id.
    let mut flaky = Receiver::start(0, &[(500, None), (500, None)]).await;
    let app = app_for(backend, &flaky.url(), &[1]).await;
    complete_batch(&app, "flaky", 1).await;
    let d = wait_status(&app, "failed", Duration::from_secs(10)).await;
    assert_eq!(d["attempt_count"], 2);
    assert_eq!(flaky.got().len(), 2);
    let r = app
        .admin_post(
            &format!("/webhooks/{}/redeliver", d["id"].as_str().unwrap()),
            &serde_json::json!({}),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let got = flaky.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(got[2].id, got[0].id, "redelivery keeps the webhook-id");
    assert!(verify(SECRET, &got[2]));
    wait_status(&app, "succeeded", Duration::from_secs(5)).await;
    flaky.stop();
    let mut gone = gone;
    gone.stop();
    let mut slow = slow;
    slow.stop();
}

/// The real binary with every proxy variable pointing at a listener of the test: deliveries
/// go straight to the (pinned) target, and the proxy sees no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_are_ignored_by_webhook_delivery() {
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&proxied);
    tokio::spawn(async move {
        while let Ok((conn, _)) = proxy.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let receiver = Receiver::start(0, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = crate::helpers::key_plaintext("px");
    std::fs::write(
        dir.path().join("base.toml"),
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\n[database]\n\
             url = \"sqlite://{}/px.db?mode=rwc\"\n[worker]\nsecret = \"{}\"\n[admin]\n\
             token = \"{}\"\n[webhooks]\nallow_private_targets = true\n\
             [keys.px]\nkey_sha256 = \"{}\"\ninitial_credits = 100\nwebhook_url = \"{}\"\n\
             webhook_secret = \"{SECRET}\"\n",
            dir.path().display(),
            crate::helpers::WORKER_SECRET,
            crate::helpers::ADMIN_TOKEN,
            crate::helpers::sha256(&key),
            receiver.url()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
    cmd.env("APP_CONFIG_DIR", dir.path())
        .env("APP_ENVIRONMENT", "test")
        .env("RUST_LOG", "warn")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdout(std::process::Stdio::null());
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env(var, &proxy_url);
    }
    let (mut child, port) = crate::helpers::spawn_server(cmd);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "binary did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .post(format!("{base}/api/enterprise/video-batch"))
        .header("x-api-key", &key)
        .json(&TestApp::batch_body(Some("px"), 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = client
        .post(format!("{base}/api/enterprise/video-batch/{id}/cancel"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert!(verify(SECRET, &got[0]));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        proxied.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a delivery went through the proxy"
    );
}
