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

#[test]
fn credits_grant_and_show_use_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("db.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"sqlite://{}/cli.db?mode=rwc\"\n",
            dir.path().display()
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
    let help = bin().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for cmd in [
        "serve", "migrate", "openapi", "keys", "credits", "config", "worker",
    ] {
        assert!(help.contains(cmd), "{help}");
    }
}
