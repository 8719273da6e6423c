//! The command line, run as a user would.
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_video-batch-api"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn keys_generate_prints_a_key_once_and_its_hash() {
    let out = bin().args(["keys", "generate", "acme"]).output().unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("vb_") && key.len() >= 40, "{key}");
    let err = String::from_utf8(out.stderr).unwrap();
    let hash = crate::helpers::sha256(&key);
    assert!(err.contains("[keys.acme]") && err.contains(&hash), "{err}");
    let again = bin().args(["keys", "generate", "acme"]).output().unwrap();
    assert_ne!(
        String::from_utf8(again.stdout).unwrap().trim(),
        key,
        "random every time"
    );
}

/// `keys rotate demo --overlap 48h` prints a new key once and the lines that keep the current
/// key working as the previous one until the overlap ends; the lines load as configuration.
#[test]
fn keys_rotate_prints_a_new_key_and_the_overlap_lines() {
    let out = bin()
        .args(["keys", "rotate", "demo", "--overlap", "48h"])
        .env("APP_ENVIRONMENT", "local")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("vb_") && key.len() >= 40, "{key}");
    let err = String::from_utf8(out.stderr).unwrap();
    let toml_start = err.find("[keys.demo]").expect("TOML lines");
    let lines: toml::Table = err[toml_start..].parse().expect("the lines are TOML");
    let demo = &lines["keys"]["demo"];
    assert_eq!(
        demo["key_sha256"].as_str(),
        Some(crate::helpers::sha256(&key).as_str())
    );
    assert_eq!(
        demo["previous_key_sha256"].as_str(),
        Some(api::settings::DEMO_KEY_SHA256),
        "the current key becomes the previous one"
    );
    let until =
        chrono::DateTime::parse_from_rfc3339(demo["previous_key_expires_at"].as_str().unwrap())
            .unwrap();
    let hours = (until.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes();
    assert!(
        (47 * 60..=48 * 60).contains(&hours),
        "{hours} minutes of overlap"
    );
    assert!(
        !err.contains(&key),
        "the key itself is printed once, on stdout"
    );

    let unknown = bin()
        .args(["keys", "rotate", "nobody"])
        .env("APP_ENVIRONMENT", "local")
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no key named"));
}

#[test]
fn config_check_prints_the_policy_without_secrets() {
    let out = bin()
        .args(["config", "check"])
        .env("APP_ENVIRONMENT", "local")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("[keys.demo]") && text.contains("cost_per_video = 10"),
        "{text}"
    );
    assert!(!text.contains("local-admin-token") && !text.contains("local-worker-secret"));
    let bad = bin()
        .args(["config", "check"])
        .env("APP_ENVIRONMENT", "nope")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown environment"));
}

crate::both_backends!(credits_grant_and_show_use_the_ledger);

async fn credits_grant_and_show_use_the_ledger(backend: crate::helpers::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("db.toml");
    let (url, pg) = crate::helpers::own_database(&backend, dir.path(), "cli").await;
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{url}\"\n[accounts.acme]\ninitial_credits = 100\n\
             [keys.acme-a]\nkey_sha256 = \"{}\"\naccount = \"acme\"\n\
             [keys.acme-b]\nkey_sha256 = \"{}\"\naccount = \"acme\"\n",
            crate::helpers::sha256("a"),
            crate::helpers::sha256("b")
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env("APP_ENVIRONMENT", "local")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["credits", "grant", "demo", "250", "--note", "invoice 9"]);
    let shown = run(&["credits", "show", "demo"]);
    assert!(shown.contains("balance 1250"), "{shown}");
    assert!(
        shown.contains("invoice 9") && shown.contains("grant"),
        "{shown}"
    );
    // An account is named directly or by any of its keys.
    run(&["credits", "grant", "acme", "50"]);
    assert!(run(&["credits", "show", "acme-b"]).contains("balance 150"));
    run(&["credits", "grant", "acme-a", "5"]);
    assert!(run(&["credits", "show", "acme"]).contains("balance 155"));
    let check = run(&["config", "check"]);
    assert!(
        check.contains("[accounts.acme]") && check.contains("keys = [\"acme-a\", \"acme-b\"]"),
        "{check}"
    );
    assert!(
        check.contains("[keys.acme-b]\naccount = \"acme\""),
        "{check}"
    );
    let help = bin().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for cmd in [
        "serve", "migrate", "openapi", "keys", "credits", "config", "worker",
    ] {
        assert!(help.contains(cmd), "{help}");
    }
    if let Some(pg) = pg {
        pg.drop_now().await;
    }
}

/// A configuration mistake reads like a tool's message: exit status 2, one line naming the
/// file, the field and the reason, and no backtrace even when one is asked for.
#[test]
fn invalid_configuration_exits_2_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.toml"),
        "[server]\nbind = \"127.0.0.1:0\"\nheader_timeout_seconds = -5\n[database]\nurl = \"sqlite::memory:\"\n\
         [worker]\nsecret = \"w\"\n[admin]\ntoken = \"a\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("test.toml"), "").unwrap();
    for args in [&["serve"][..], &["config", "check"][..]] {
        let out = bin()
            .args(args)
            .env("APP_CONFIG_DIR", dir.path())
            .env("APP_ENVIRONMENT", "test")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("base.toml") && err.contains("server.header_timeout_seconds"),
            "{err}"
        );
        assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    }
}

/// `local` ships a public demo key: it refuses to serve it on an address other machines reach.
#[test]
fn local_refuses_a_public_bind_with_the_demo_key() {
    let out = bin()
        .args(["config", "check"])
        .env("APP_ENVIRONMENT", "local")
        .env("APP__SERVER__BIND", "0.0.0.0:8080")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("server.bind") && err.contains("demo key"),
        "{err}"
    );
}

/// Disabling the demo key does not make `local` safe to expose: its shipped worker secret and
/// admin token are still in effect.
#[test]
fn local_refuses_a_public_bind_with_the_demo_key_disabled() {
    let out = bin()
        .args(["config", "check"])
        .env("APP_ENVIRONMENT", "local")
        .env("APP__KEYS__DEMO__DISABLED", "true")
        .env("APP__SERVER__BIND", "0.0.0.0:8080")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("server.bind") && err.contains("worker.secret"),
        "{err}"
    );
}
