//! Webhook delivery isolated per endpoint and per key: an endpoint that accepts connections and
//! never answers (a tarpit) fills only its own few slots, a key with many such endpoints only
//! its own; another key's events still arrive at once.
use std::time::{Duration, Instant};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::{Receiver, SECRET};

both_backends!(
    a_tarpit_endpoint_does_not_delay_other_endpoints,
    a_key_with_many_tarpit_hosts_does_not_delay_other_keys,
);

/// Accepts connections and never answers; keeps them open until dropped.
async fn tarpit() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

async fn a_tarpit_endpoint_does_not_delay_other_endpoints(backend: Backend) {
    let (tarpit_port, tarpit_task) = tarpit().await;
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "slow",
            &format!(
                "initial_credits = 10000\nrate_limit_per_min = 1000\n\
                 webhook_url = \"http://127.0.0.1:{tarpit_port}/hook\"\nwebhook_secret = \"{SECRET}\""
            ),
        )
        .key(
            "fast",
            &format!(
                "initial_credits = 10000\nrate_limit_per_min = 1000\n\
                 webhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                receiver.url()
            ),
        )
        .settings(|s| {
            s.webhooks.retry_schedule = vec![std::time::Duration::from_secs(30)];
            s.webhooks.timeout = std::time::Duration::from_secs(10);
        })
        .build()
        .await;
    let slow = app.key("slow").to_string();
    for i in 0..40 {
        app.create_and_cancel(&slow, &format!("slow-{i}")).await;
    }
    // Let the dispatcher take up the tarpit's deliveries first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    app.create_and_cancel(app.key("fast"), "fast-1").await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    let took = got[0].at.duration_since(started);
    eprintln!(
        "batch.cancelled of the other key arrived after {took:?} behind a 40-delivery tarpit"
    );
    assert!(
        took < Duration::from_secs(2),
        "another key's webhook waited {took:?} behind a tarpit"
    );
    tarpit_task.abort();
}

/// `n` tarpits, and the number of connections all of them have accepted so far.
async fn counting_tarpits(
    n: usize,
) -> (
    Vec<u16>,
    tokio::sync::watch::Receiver<usize>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let tx = std::sync::Arc::new(tx);
    let mut ports = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        let tx = std::sync::Arc::clone(&tx);
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
                tx.send_modify(|n| *n += 1);
            }
        }));
    }
    (ports, rx, tasks)
}

/// One tenant with 200 deliveries pending over 50 hosts that never answer holds its own
/// `webhooks.per_key_concurrency` slots, not `webhooks.concurrency`: another key's event
/// arrives at once.
async fn a_key_with_many_tarpit_hosts_does_not_delay_other_keys(backend: Backend) {
    use sea_orm::ActiveModelTrait;
    let (ports, mut accepted, tasks) = counting_tarpits(50).await;
    let receiver = Receiver::start(0, &[]).await;
    let app = TestApp::builder(backend)
        .key(
            "wide",
            &format!(
                "initial_credits = 10000\nwebhook_url = \"http://127.0.0.1:{}/hook\"\n\
                 webhook_secret = \"{SECRET}\"",
                ports[0]
            ),
        )
        .key(
            "fast",
            &format!(
                "initial_credits = 10000\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
                receiver.url()
            ),
        )
        .settings(|s| {
            s.webhooks.retry_schedule = vec![Duration::from_secs(30)];
            s.webhooks.timeout = Duration::from_secs(15);
            s.webhooks.concurrency = 32;
            s.webhooks.per_key_concurrency = 8;
        })
        .build()
        .await;
    let db = app.state().writer.clone();
    let wide = api::service::keys::id_by_name(&db, "wide")
        .await
        .unwrap()
        .unwrap();
    let due = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    for i in 0..200 {
        let target = format!("http://127.0.0.1:{}/hook", ports[i % ports.len()]);
        crate::helpers::delivery_row(wide, &target, "pending", due, due)
            .insert(&db)
            .await
            .unwrap();
    }
    app.state().webhook_wakeup.notify_one();
    // The wide key's sends are in flight: its hosts have accepted as many connections as it
    // has slots.
    tokio::time::timeout(Duration::from_secs(10), accepted.wait_for(|n| *n >= 8))
        .await
        .expect("the wide key's deliveries are being sent")
        .unwrap();
    let started = Instant::now();
    app.create_and_cancel(app.key("fast"), "fast-1").await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    let took = got[0].at.duration_since(started);
    eprintln!("another key's event arrived after {took:?} behind 200 deliveries over 50 tarpits");
    assert!(
        took < Duration::from_secs(2),
        "another key's webhook waited {took:?} behind one key's 50 tarpit hosts"
    );
    assert_eq!(
        *accepted.borrow(),
        8,
        "the wide key never had more than its 8 slots in flight (no send has timed out yet)"
    );
    for t in tasks {
        t.abort();
    }
}
