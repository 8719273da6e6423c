//! Webhook delivery isolated per endpoint: an endpoint that accepts connections and never
//! answers (a tarpit) fills only its own few slots; another key's events still arrive at once.
use std::time::{Duration, Instant};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::{Receiver, SECRET};

both_backends!(a_tarpit_endpoint_does_not_delay_other_endpoints);

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
