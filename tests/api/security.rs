//! Security checks: credentials never cross APIs, hostile JSON is refused without harm, odd
//! but valid text round-trips intact, and plaintext keys never reach the database.
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, WORKER_SECRET};

both_backends!(
    credentials_never_cross_apis,
    hostile_json_is_refused_and_odd_text_round_trips,
    the_plaintext_key_reaches_no_column_log_stdout_or_stderr,
);

async fn credentials_never_cross_apis(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 100")
        .build()
        .await;
    for secret in [ADMIN_TOKEN, WORKER_SECRET] {
        let r = app.credits(secret).await;
        assert_eq!(r["error"], "UNAUTHORIZED", "{secret} is not a customer key");
    }
    let key = app.key("acme").to_string();
    let r = app
        .client
        .post(format!("{}/api/internal/worker/claim", app.base))
        .bearer_auth(&key)
        .json(&json!({"worker_id": "w", "max_items": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(format!("{}/api/internal/worker/claim", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"worker_id": "w", "max_items": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(format!("{}/api/admin/keys", app.base))
        .bearer_auth(WORKER_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The key is stored only as its hash.
    let sql =
        format!("SELECT COUNT(*) AS v FROM api_key WHERE key_sha256 = '{key}' OR name = '{key}'");
    assert_eq!(app.scalar(&sql).await, 0);
    // Nowhere else either, after it was used for a batch's whole life.
    let r = app
        .create_batch(&key, &TestApp::batch_body(Some("sec-1"), 1))
        .await;
    assert_eq!(r.status(), 201);
    let item = app.claim("w", 1).await.remove(0);
    assert_eq!(app.complete(&item).await.status(), 200);
    assert_eq!(app.credits_status(&key).await, 200);
    let db = app.db();
    assert_eq!(
        crate::helpers::columns_containing(&db, &crate::helpers::sha256(&key)).await,
        [("api_key".to_string(), "key_sha256".to_string())],
        "the search finds what is stored"
    );
    for secret in [key.as_str(), ADMIN_TOKEN, WORKER_SECRET] {
        assert_eq!(
            crate::helpers::columns_containing(&db, secret).await,
            Vec::<(String, String)>::new(),
            "a secret is stored in these columns"
        );
    }
}

/// The real binary at debug level, driven with a key (and a wrong one): neither plaintext is
/// in any column of any table, in the log (stdout) or on stderr.
async fn the_plaintext_key_reaches_no_column_log_stdout_or_stderr(backend: Backend) {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (url, pg) = crate::helpers::own_database(&backend, dir.path(), "sec").await;
    let key = crate::helpers::key_plaintext("sec");
    let wrong = format!("{key}_but_wrong");
    std::fs::write(
        dir.path().join("base.toml"),
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nops_bind = \"127.0.0.1:0\"\n[database]\nurl = \"{url}\"\n\
             [worker]\nsecret = \"{WORKER_SECRET}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\
             [log]\nformat = \"json\"\n[keys.sec]\nkey_sha256 = \"{}\"\ninitial_credits = 100\n",
            crate::helpers::sha256(&key)
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
    cmd.env("APP_CONFIG_DIR", dir.path())
        .env("APP_ENVIRONMENT", "test")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped());
    let (mut child, port, stderr) = crate::helpers::spawn_server_logged(cmd);
    let mut stdout = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while client.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "binary did not start");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let customer = |k: &str, method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{base}/api/enterprise{path}"))
            .header("x-api-key", k)
    };
    let r = customer(&key, reqwest::Method::POST, "/video-batch")
        .json(&TestApp::batch_body(Some("sec-bin"), 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    for (k, method, path, want) in [
        (
            key.as_str(),
            reqwest::Method::GET,
            format!("/video-batch/{id}"),
            200,
        ),
        (
            key.as_str(),
            reqwest::Method::GET,
            "/video-batch".to_string(),
            200,
        ),
        (
            key.as_str(),
            reqwest::Method::GET,
            "/credits".to_string(),
            200,
        ),
        (
            key.as_str(),
            reqwest::Method::GET,
            "/usage".to_string(),
            200,
        ),
        (
            key.as_str(),
            reqwest::Method::POST,
            format!("/video-batch/{id}/cancel"),
            200,
        ),
        (
            key.as_str(),
            reqwest::Method::GET,
            "/video-batch/not-a-batch".to_string(),
            400,
        ),
        (
            wrong.as_str(),
            reqwest::Method::GET,
            "/credits".to_string(),
            401,
        ),
    ] {
        let r = customer(k, method, &path).send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    // Stop cleanly (SIGTERM) so every log line is written.
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap().join("\n");
    assert!(
        stdout.contains("sec-bin") || stdout.contains(&id),
        "the log saw the calls"
    );
    for secret in [key.as_str(), wrong.as_str(), ADMIN_TOKEN, WORKER_SECRET] {
        assert!(!stdout.contains(secret), "a secret is in the log (stdout)");
        assert!(!stderr.contains(secret), "a secret is on stderr");
    }
    let db = api::db::connect_url(&url, 2, None).await.unwrap();
    assert_eq!(
        crate::helpers::columns_containing(&db, &crate::helpers::sha256(&key)).await,
        [("api_key".to_string(), "key_sha256".to_string())],
        "the search finds what is stored"
    );
    for secret in [key.as_str(), wrong.as_str(), ADMIN_TOKEN, WORKER_SECRET] {
        assert_eq!(
            crate::helpers::columns_containing(&db, secret).await,
            Vec::<(String, String)>::new(),
            "a secret is stored in these columns"
        );
    }
    drop(db);
    if let Some(pg) = pg {
        pg.drop_now().await;
    }
}

async fn hostile_json_is_refused_and_odd_text_round_trips(backend: Backend) {
    let app = TestApp::builder(backend)
        .key("acme", "initial_credits = 1000\nrate_limit_per_min = 100")
        .build()
        .await;
    let key = app.key("acme").to_string();
    let post_raw = |body: String| {
        app.client
            .post(format!("{}/api/enterprise/video-batch", app.base))
            .header("x-api-key", &key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Very deep nesting anywhere in the body: a clear 400, and the server lives on.
    let deep = format!(
        "{{\"items\":[{{\"prompt\":\"p\",\"params\":{{\"a\":{}1{}}}}}]}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let r = post_raw(deep).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "VALIDATION_ERROR"
    );
    // Nested deeper than the params limit but parseable: 422 naming the field.
    let mut nested = json!(1);
    for _ in 0..12 {
        nested = json!({ "n": nested });
    }
    let r = app
        .create_batch(&key, &json!({"items": [{"prompt": "p", "params": nested}]}))
        .await;
    assert_eq!(r.status(), 422);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("items[0].params")
    );
    // Request ids with control characters or quotes are refused clearly.
    for bad in ["a\nb", "a\"b", "a b", "ünï"] {
        let r = app
            .create_batch(
                &key,
                &json!({"request_id": bad, "items": [{"prompt": "p"}]}),
            )
            .await;
        assert_eq!(r.status(), 400, "{bad:?}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "VALIDATION_ERROR"
        );
    }
    // NUL is refused; quotes, control characters and long Unicode round-trip intact.
    let r = app
        .create_batch(&key, &json!({"items": [{"prompt": "a\u{0}b"}]}))
        .await;
    assert_eq!(r.status(), 422);
    let odd = format!(
        "\"quoted\" \\ back\tslash\nline 🎬 {} ʕ•ᴥ•ʔ",
        "漢".repeat(3900)
    );
    let r = app.create_batch(&key, &json!({"request_id": "odd.text:1", "items": [{"prompt": odd, "params": {"q": "'\"<>&"}}]})).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();
    let v: Value = app.get_batch(&key, &id).await.json().await.unwrap();
    assert_eq!(v["items"][0]["prompt"].as_str().unwrap(), odd);
    assert_eq!(v["items"][0]["params"]["q"], "'\"<>&");
    assert_eq!(v["request_id"], "odd.text:1");
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
}
