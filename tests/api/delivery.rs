//! Webhook delivery at the speed of the receiver: connections are reused, an event committed
//! while the dispatcher is idle goes out at once, and two dispatching nodes deliver 1,000
//! events exactly once each.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::{Receiver, SECRET};

both_backends!(
    a_claim_leaves_deliveries_of_full_endpoints_in_the_outbox,
    a_claim_leaves_deliveries_of_full_keys_in_the_outbox,
    deliveries_reuse_connections,
    an_event_is_sent_at_once_when_the_dispatcher_is_idle,
    two_nodes_deliver_a_thousand_events_exactly_once,
    a_stuck_endpoint_takes_sixteen_attempts_and_sixteen_waiting_and_no_more,
    webhooks_concurrency_bounds_the_attempts_in_flight,
    an_endpoint_that_times_out_three_times_backs_off,
    a_redelivery_never_overlaps_an_attempt_in_flight,
    another_nodes_event_is_found_by_the_dispatching_node,
);

/// A node that does not dispatch commits an event; the node that does finds it by its short
/// poll (no wake-up crosses nodes) and sends it within moments.
async fn another_nodes_event_is_found_by_the_dispatching_node(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let quiet = hooked(backend, &receiver.url())
        .settings(|s| s.webhooks.dispatch = false)
        .build()
        .await;
    let dispatching = quiet.peer_with(|s| s.webhooks.dispatch = true).await;
    let key = quiet.key("acme").to_string();
    let mut lags = Vec::new();
    for i in 0..5 {
        quiet
            .create_and_cancel(&key, &format!("elsewhere-{i}"))
            .await;
        let committed = Instant::now();
        let got = receiver.wait_for(i + 1, Duration::from_secs(20)).await;
        lags.push(got[i].at.saturating_duration_since(committed));
    }
    lags.sort();
    eprintln!("another node's events, commit to receipt: {lags:?}");
    assert!(
        lags[2] < Duration::from_secs(5),
        "median {:?}: the poll (100 ms) should have found them",
        lags[2]
    );
    drop(dispatching);
}

/// An endpoint that never answers, with a 1 s timeout and retries due 1 s later: after its
/// third timeout in a row it backs off for 5 s, so the fourth attempt comes at least about 5 s
/// after the third timed out, where the schedule alone would send it after 1 s.
async fn an_endpoint_that_times_out_three_times_backs_off(backend: Backend) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let at = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            at.lock().unwrap().push(Instant::now());
            held.push(conn);
        }
    });
    let app = TestApp::builder(backend)
        .settings(|s| {
            s.webhooks.timeout = Duration::from_secs(1);
            s.webhooks.retry_schedule = vec![Duration::from_secs(1); 5];
        })
        .key(
            "slow",
            &format!(
                "initial_credits = 1000\nwebhook_url = \"{url}\"\nwebhook_secret = \"{SECRET}\""
            ),
        )
        .build()
        .await;
    let key = app.key("slow").to_string();
    for i in 0..3 {
        app.create_and_cancel(&key, &format!("slow-{i}")).await;
    }
    wait_until("a fourth attempt", async || seen.lock().unwrap().len() >= 4).await;
    let seen = seen.lock().unwrap().clone();
    let gap = seen[3] - seen[2];
    // The third attempt times out 1 s after it started, then 5 s of backoff.
    assert!(
        gap >= Duration::from_millis(5500),
        "the fourth attempt came {gap:?} after the third: no backoff"
    );
}

/// An endpoint that accepts connections and never answers; counts the connections it holds.
async fn stuck_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let open = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&open);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    (url, open)
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 40 events for an endpoint that never answers: 16 attempts go out, 16 more are leased to
/// wait for it, the other 8 stay in the outbox with no attempt counted, and another key's
/// event goes out at once meanwhile (the stuck attempts time out only after two minutes).
async fn a_stuck_endpoint_takes_sixteen_attempts_and_sixteen_waiting_and_no_more(backend: Backend) {
    let (stuck, open) = stuck_endpoint().await;
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .settings(|s| {
            s.webhooks.timeout = Duration::from_secs(120);
            // The endpoint's own cap is what is shown here, not the key's.
            s.webhooks.per_key_concurrency = 64;
        })
        .key(
            "stuck",
            &format!(
                "initial_credits = 100000\nrate_limit_per_min = 1000\n\
                 webhook_url = \"{stuck}\"\nwebhook_secret = \"{SECRET}\""
            ),
        )
        .key(
            "ok",
            &format!(
                "initial_credits = 1000\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                receiver.url()
            ),
        )
        .build()
        .await;
    let key = app.key("stuck").to_string();
    for i in 0..40 {
        app.create_and_cancel(&key, &format!("stuck-{i}")).await;
    }
    let leased = || async {
        app.scalar(&format!(
            "SELECT COUNT(*) AS v FROM webhook_delivery WHERE target_url = '{stuck}' \
             AND locked_until IS NOT NULL"
        ))
        .await
    };
    wait_until("16 attempts in flight", async || {
        open.load(Ordering::SeqCst) >= 16
    })
    .await;
    wait_until("32 deliveries leased", async || leased().await >= 32).await;
    // Another key's event goes out while the endpoint is stuck.
    app.create_and_cancel(app.key("ok"), "ok").await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(
        open.load(Ordering::SeqCst),
        16,
        "at most 16 attempts to one endpoint"
    );
    assert_eq!(leased().await, 32, "16 in flight and 16 waiting");
    assert_eq!(
        app.scalar(&format!(
            "SELECT COUNT(*) AS v FROM webhook_delivery WHERE target_url = '{stuck}' \
                 AND status = 'pending' AND attempt_count = 0 AND locked_until IS NULL"
        ))
        .await,
        8,
        "the rest stay in the outbox, no attempt counted"
    );
}

/// `webhooks.concurrency = 4`: four attempts in flight at most, at most twice that leased.
async fn webhooks_concurrency_bounds_the_attempts_in_flight(backend: Backend) {
    let (stuck, open) = stuck_endpoint().await;
    let app = TestApp::builder(backend)
        .settings(|s| {
            s.webhooks.timeout = Duration::from_secs(120);
            s.webhooks.concurrency = 4;
        })
        .key(
            "stuck",
            &format!(
                "initial_credits = 100000\nrate_limit_per_min = 1000\n\
                 webhook_url = \"{stuck}\"\nwebhook_secret = \"{SECRET}\""
            ),
        )
        .build()
        .await;
    let key = app.key("stuck").to_string();
    for i in 0..12 {
        app.create_and_cancel(&key, &format!("c-{i}")).await;
    }
    let leased = || async {
        app.scalar(
            "SELECT COUNT(*) AS v FROM webhook_delivery WHERE status = 'pending' \
             AND locked_until IS NOT NULL",
        )
        .await
    };
    wait_until("4 attempts in flight", async || {
        open.load(Ordering::SeqCst) >= 4
    })
    .await;
    // A later event wakes the dispatcher, which has no room: nothing more is sent.
    app.create_and_cancel(&key, "c-last").await;
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM webhook_delivery")
            .await,
        13
    );
    let held = leased().await;
    assert_eq!(
        open.load(Ordering::SeqCst),
        4,
        "webhooks.concurrency attempts at once"
    );
    assert!(
        (4..=8).contains(&held),
        "{held} leased: at most twice the concurrency"
    );
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) AS v FROM webhook_delivery WHERE status = 'pending' \
             AND attempt_count = 0 AND locked_until IS NULL"
        )
        .await,
        13 - held,
        "the rest stay in the outbox, no attempt counted"
    );
}

/// A TCP forwarder to `target` that counts the connections it accepts.
async fn counting_proxy(target: u16) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, accepted)
}

fn hooked(backend: Backend, url: &str) -> crate::helpers::TestAppBuilder {
    TestApp::builder(backend).key(
        "acme",
        &format!(
            "initial_credits = 1000000\nrate_limit_per_min = 100000\nread_rate_limit_per_min = 100000\n\
             webhook_url = \"{url}\"\nwebhook_secret = \"{SECRET}\""
        ),
    )
}

fn receiver_port(r: &Receiver) -> u16 {
    r.url()
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/hook")
        .parse()
        .unwrap()
}

async fn deliveries_reuse_connections(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let (port, connections) = counting_proxy(receiver_port(&receiver)).await;
    let app = hooked(backend, &format!("http://127.0.0.1:{port}/hook"))
        .build()
        .await;
    let key = app.key("acme").to_string();
    for i in 0..60 {
        app.create_and_cancel(&key, &format!("reuse-{i}")).await;
    }
    receiver.wait_for(60, Duration::from_secs(30)).await;
    let opened = connections.load(Ordering::SeqCst);
    eprintln!("60 webhook deliveries used {opened} connections");
    assert!(
        opened <= 8,
        "60 deliveries opened {opened} connections: connections are not reused"
    );
}

/// The dispatcher's poll is an hour here, so every event that arrives within seconds of its
/// commit was sent because the commit woke the idle dispatcher, not because a poll found it.
async fn an_event_is_sent_at_once_when_the_dispatcher_is_idle(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let app = hooked(backend, &receiver.url())
        .settings(|s| s.webhooks.poll = Duration::from_secs(3600))
        .build()
        .await;
    let key = app.key("acme").to_string();
    let mut lags = Vec::new();
    for i in 0..5 {
        app.create_and_cancel(&key, &format!("lag-{i}")).await;
        let committed = Instant::now();
        let got = receiver.wait_for(i + 1, Duration::from_secs(20)).await;
        lags.push(got[i].at.saturating_duration_since(committed));
    }
    lags.sort();
    eprintln!("commit-to-receipt delays while idle: {lags:?}");
    assert!(
        lags[4] < Duration::from_secs(60),
        "slowest delay {:?} from commit to receipt: a poll, not the commit, sent it",
        lags[4]
    );
}

async fn two_nodes_deliver_a_thousand_events_exactly_once(backend: Backend) {
    let receiver = Receiver::start(0, &[]).await;
    let app = hooked(backend, &receiver.url()).build().await;
    let peer = app.peer().await;
    let key = app.key("acme").to_string();
    let started = Instant::now();
    for chunk in 0..20 {
        let calls = (0..50).map(|i| {
            let n = chunk * 50 + i;
            let node = if n % 2 == 0 { &app } else { &peer };
            let key = key.clone();
            async move { node.create_and_cancel(&key, &format!("many-{n}")).await }
        });
        join_all(calls).await;
    }
    receiver.wait_for(1000, Duration::from_secs(120)).await;
    let took = started.elapsed();
    // Every delivery final after one attempt: nothing will be sent again.
    let rows = crate::helpers::wait_outbox_final(&app.db(), 1000).await;
    assert_eq!(rows.len(), 1000);
    for r in &rows {
        assert_eq!(
            (r.status.as_str(), r.attempt_count, r.attempts),
            ("succeeded", 1, 1),
            "{r:?}"
        );
    }
    let got = receiver.got();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for r in &got {
        *per_id.entry(r.id.as_str()).or_default() += 1;
    }
    eprintln!("1,000 events from two nodes received in {took:?}");
    assert_eq!(per_id.len(), 1000, "every event arrived");
    assert!(per_id.values().all(|n| *n == 1), "no event arrived twice");
}

/// A claim that is told which target URLs have no room leases none of their deliveries: they
/// stay pending and unleased, their attempt not counted, while every other due delivery is
/// leased (so a stuck endpoint's backlog is not leased and given back over and over).
async fn a_claim_leaves_deliveries_of_full_keys_in_the_outbox(backend: Backend) {
    use sea_orm::ActiveModelTrait;
    let app = TestApp::builder(backend)
        .key("wide", "initial_credits = 100")
        .key("other", "initial_credits = 100")
        .settings(|s| s.webhooks.dispatch = false)
        .build()
        .await;
    let db = app.state().writer.clone();
    let id = |name: &'static str| {
        let db = db.clone();
        async move {
            api::service::keys::id_by_name(&db, name)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let (wide, other) = (id("wide").await, id("other").await);
    let now = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    for i in 0..20 {
        let (key, target) = if i % 2 == 0 {
            (wide, format!("https://h{i}.wide.example/hook"))
        } else {
            (other, "https://other.example/hook".to_string())
        };
        crate::helpers::delivery_row(key, &target, "pending", now, now)
            .insert(&db)
            .await
            .unwrap();
    }
    let lock = Duration::from_secs(60);
    let leased = api::service::webhooks::claim_due(&db, 100, lock, &[], &[wide])
        .await
        .unwrap();
    assert_eq!(leased.len(), 10);
    assert!(leased.iter().all(|d| d.api_key_id == other), "{leased:?}");
    let untouched = app
        .scalar(&format!(
            "SELECT COUNT(*) AS v FROM webhook_delivery WHERE api_key_id = {wide} \
             AND locked_until IS NULL AND attempt_count = 0"
        ))
        .await;
    assert_eq!(
        untouched, 10,
        "the full key's deliveries stay in the outbox"
    );
    let rest = api::service::webhooks::claim_due(&db, 100, lock, &[], &[])
        .await
        .unwrap();
    assert_eq!(
        rest.len(),
        10,
        "without the skip they are due like any other"
    );
    assert!(rest.iter().all(|d| d.api_key_id == wide));
}

async fn a_claim_leaves_deliveries_of_full_endpoints_in_the_outbox(backend: Backend) {
    use sea_orm::ActiveModelTrait;
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .settings(|s| s.webhooks.dispatch = false)
        .build()
        .await;
    let db = app.state().writer.clone();
    let key_id = api::service::keys::id_by_name(&db, "acme")
        .await
        .unwrap()
        .unwrap();
    let (stuck, other) = ("https://stuck.example/hook", "https://fine.example/hook");
    let now = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    for i in 0..20 {
        let target = if i % 2 == 0 { stuck } else { other };
        crate::helpers::delivery_row(key_id, target, "pending", now, now)
            .insert(&db)
            .await
            .unwrap();
    }
    let lock = Duration::from_secs(60);
    let leased = api::service::webhooks::claim_due(&db, 100, lock, &[stuck.to_string()], &[])
        .await
        .unwrap();
    assert_eq!(leased.len(), 10);
    assert!(leased.iter().all(|d| d.target_url == other), "{leased:?}");
    let untouched = app
        .scalar(&format!(
            "SELECT COUNT(*) AS v FROM webhook_delivery WHERE target_url = '{stuck}' \
             AND locked_until IS NULL AND attempt_count = 0"
        ))
        .await;
    assert_eq!(
        untouched, 10,
        "the full endpoint's deliveries stay in the outbox"
    );
    let rest = api::service::webhooks::claim_due(&db, 100, lock, &[], &[])
        .await
        .unwrap();
    assert_eq!(
        rest.len(),
        10,
        "without the skip they are due like any other"
    );
    assert!(rest.iter().all(|d| d.target_url == stuck));
}

/// An endpoint that holds every request until the test opens its gate, then answers 200;
/// counts the requests it got and the most it held at once.
struct Gate {
    url: String,
    open: Arc<tokio::sync::Semaphore>,
    got: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

async fn gate() -> Gate {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let g = Gate {
        url: format!("http://{}/hook", listener.local_addr().unwrap()),
        open: Arc::new(tokio::sync::Semaphore::new(0)),
        got: Arc::new(AtomicUsize::new(0)),
        held: Arc::new(AtomicUsize::new(0)),
        most: Arc::new(AtomicUsize::new(0)),
    };
    let (open, got, held, most) = (
        Arc::clone(&g.open),
        Arc::clone(&g.got),
        Arc::clone(&g.held),
        Arc::clone(&g.most),
    );
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (open, got, held, most) = (
                Arc::clone(&open),
                Arc::clone(&got),
                Arc::clone(&held),
                Arc::clone(&most),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                if conn.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                got.fetch_add(1, Ordering::SeqCst);
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                open.acquire().await.unwrap().forget();
                held.fetch_sub(1, Ordering::SeqCst);
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    g
}

/// A redelivery asked for while an attempt is in flight does not start a second one beside
/// it: the endpoint never holds two requests of the delivery at once.
async fn a_redelivery_never_overlaps_an_attempt_in_flight(backend: Backend) {
    let gate = gate().await;
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .settings(|s| s.webhooks.timeout = Duration::from_secs(60))
        .key(
            "held",
            &format!(
                "initial_credits = 1000\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                gate.url
            ),
        )
        .key(
            "other",
            &format!(
                "initial_credits = 1000\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                receiver.url()
            ),
        )
        .build()
        .await;
    app.create_and_cancel(app.key("held"), "held").await;
    wait_until("the attempt is in flight", async || {
        gate.held.load(Ordering::SeqCst) == 1
    })
    .await;
    let rows = crate::helpers::outbox_rows(&app.db()).await;
    assert_eq!(rows.len(), 1);
    let r = app
        .admin_post(
            &format!("/webhooks/{}/redeliver", rows[0].id),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    // The dispatcher claims again (another key's event goes out) while the attempt is held.
    app.create_and_cancel(app.key("other"), "other").await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(
        gate.got.load(Ordering::SeqCst),
        1,
        "a second attempt started beside the first"
    );
    // Let the held attempt finish: it is recorded, and the redelivery waits for the
    // attempt's lease to end.
    gate.open.add_permits(1000);
    wait_until("the held attempt is recorded", async || {
        app.scalar("SELECT COUNT(*) AS v FROM webhook_attempt")
            .await
            >= 2
    })
    .await;
    let id: uuid::Uuid = rows[0].id.parse().unwrap();
    {
        use sea_orm::{ActiveModelTrait, EntityTrait, Set};
        let d = entity::webhook_delivery::Entity::find_by_id(id)
            .one(&app.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            d.status, "pending",
            "the redelivery is still to come: {d:?}"
        );
        assert!(d.locked_until.is_some(), "{d:?}");
        // The lease ends (as it would after its 150 s).
        entity::webhook_delivery::ActiveModel {
            id: Set(id),
            locked_until: Set(None),
            ..Default::default()
        }
        .update(&app.db())
        .await
        .unwrap();
    }
    app.create_and_cancel(app.key("other"), "wake").await;
    let rows = crate::helpers::wait_outbox_final(&app.db(), 3).await;
    assert!(rows.iter().all(|r| r.status == "succeeded"), "{rows:?}");
    assert_eq!(
        gate.got.load(Ordering::SeqCst),
        2,
        "the redelivery was sent once"
    );
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        1,
        "two attempts overlapped"
    );
}
