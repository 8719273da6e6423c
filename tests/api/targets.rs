//! The SSRF rule at create time: a `webhook_url` whose host is an address that is not public
//! (directly, or carried inside an IPv6 form) is refused with 422 before anything is written.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp};
use crate::webhooks::SECRET;

both_backends!(non_public_webhook_targets_are_refused_at_create);

async fn non_public_webhook_targets_are_refused_at_create(backend: Backend) {
    let app = TestApp::builder(backend)
        .public_targets_only()
        .key(
            "acme",
            &format!(
                "initial_credits = 1000\nrate_limit_per_min = 1000\nwebhook_secret = \"{SECRET}\""
            ),
        )
        .build()
        .await;
    let key = app.key("acme").to_string();
    for target in [
        "https://[64:ff9b::a00:5]/",
        "https://[64:ff9b:1::a00:5]/",
        "https://[2002:a00:5::1]/",
        "https://[2001:0:a00:5::1]/",
        "https://[fec0::1]/",
        "https://[::a00:5]/",
        "https://[::ffff:10.0.0.5]/",
        "https://198.18.0.1/",
        "https://192.0.0.8/",
        "https://240.0.0.1/",
        "https://127.0.0.1/",
        "https://10.1.2.3/",
        "https://[fd00::1]/",
        "https://169.254.169.254/",
        // Multicast (224.0.0.0/4, ff00::/8), the unspecified addresses, the rest of the
        // private and link-local ranges.
        "https://224.0.0.1/",
        "https://239.255.255.250/",
        "https://[ff02::1]/",
        "https://[ff0e::1]/",
        "https://[::]/",
        "https://0.0.0.0/",
        "https://172.16.0.1/",
        "https://172.31.255.254/",
        "https://[fe80::1]/",
        "https://[::1]/",
        "https://192.168.1.1/",
    ] {
        let body = json!({ "items": [{ "prompt": "p" }], "webhook_url": target });
        let r = app.create_batch(&key, &body).await;
        assert_eq!(r.status(), 422, "{target}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "VALIDATION_ERROR", "{target}");
        assert!(
            v["message"].as_str().unwrap().contains("webhook_url"),
            "{v}"
        );
    }
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM batch_job").await,
        0,
        "nothing was written"
    );
    let ok = app
        .create_batch(
            &key,
            &json!({ "items": [{ "prompt": "p" }], "webhook_url": "https://93.184.216.34/hook" }),
        )
        .await;
    assert_eq!(ok.status(), 201, "a public address is accepted");
    // Just outside 172.16.0.0/12 and 224.0.0.0/4: public.
    for target in ["https://172.32.0.1/hook", "https://223.255.255.1/hook"] {
        let ok = app
            .create_batch(
                &key,
                &json!({ "items": [{ "prompt": "p" }], "webhook_url": target }),
            )
            .await;
        assert_eq!(ok.status(), 201, "{target} is public");
    }
}
