//! Layered configuration and every refusal.
use std::collections::HashMap;
use std::path::Path;

use api::settings::{ConfigSource, DEMO_KEY_SHA256};

const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn base() -> String {
    "[server]\nbind = \"127.0.0.1:8080\"\n[database]\nurl = \"sqlite::memory:\"\n\
     [worker]\nsecret = \"env:WORKER_SECRET\"\n[admin]\ntoken = \"admin-token\"\n"
        .to_string()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn source(dir: &Path, env: &str, vars: &[(&str, &str)]) -> ConfigSource {
    ConfigSource {
        dir: dir.to_path_buf(),
        environment: env.to_string(),
        extra_files: vec![],
        env: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        refresh_env: false,
    }
}

fn refused(extra: &str, vars: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", &base());
    write(dir.path(), "local.toml", extra);
    let mut all = vec![("WORKER_SECRET", "s3cret")];
    all.extend_from_slice(vars);
    source(dir.path(), "local", &all)
        .load()
        .expect_err("configuration should be refused")
        .to_string()
}

#[test]
fn layers_apply_in_order_and_keys_merge_defaults() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        &format!(
            "{}[defaults]\ncost_per_video = 10\nmax_batch_items = 100\n[keys.acme]\nkey_sha256 = \"{HASH}\"\n",
            base()
        ),
    );
    write(
        dir.path(),
        "local.toml",
        "[defaults]\ncost_per_video = 7\n[keys.acme]\nrate_limit_per_min = 5\n",
    );
    let extra = dir.path().join("extra.toml");
    write(
        dir.path(),
        "extra.toml",
        "[keys.acme]\nmax_batch_items = 3\nip_allowlist = [\"10.0.0.0/8\"]\n",
    );
    let mut src = source(
        dir.path(),
        "local",
        &[
            ("WORKER_SECRET", "w"),
            ("APP__KEYS__ACME__RATE_LIMIT_PER_MIN", "9"),
            ("APP__DEFAULTS__MAX_PROMPT_CHARS", "50"),
        ],
    );
    src.extra_files = vec![extra];
    let s = src.load().expect("valid");
    let acme = s.key("acme").unwrap();
    assert_eq!(
        acme.account.limits.cost_per_video, 7,
        "environment file overrides base"
    );
    assert_eq!(
        acme.account.limits.max_batch_items, 3,
        "--config file overrides environment file"
    );
    assert_eq!(
        acme.account.limits.rate_limit_per_min, 9,
        "APP__ variables override files"
    );
    assert_eq!(
        acme.account.limits.max_prompt_chars, 50,
        "defaults flow into keys"
    );
    assert_eq!(
        acme.account.limits.read_rate_limit_per_min, 600,
        "built-in default"
    );
    assert_eq!(acme.ip_allowlist.len(), 1);
    assert_eq!(s.worker.secret.expose(), "w", "env: secrets are resolved");
    assert!(
        !format!("{s:?}").contains("admin-token"),
        "Debug never prints secrets"
    );
}

#[test]
fn ip_allowlist_accepts_a_comma_separated_string() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        &format!("{}[keys.acme]\nkey_sha256 = \"{HASH}\"\n", base()),
    );
    write(dir.path(), "local.toml", "");
    let s = source(
        dir.path(),
        "local",
        &[
            ("WORKER_SECRET", "w"),
            (
                "APP__KEYS__ACME__IP_ALLOWLIST",
                "203.0.113.0/24, 2001:db8::/32",
            ),
        ],
    )
    .load()
    .expect("valid");
    assert_eq!(s.key("acme").unwrap().ip_allowlist.len(), 2);
}

#[test]
fn unknown_field_is_refused_naming_file_and_field() {
    let msg = refused("[defaults]\ncost_per_vidoe = 3\n", &[]);
    assert!(msg.contains("local.toml"), "{msg}");
    assert!(msg.contains("cost_per_vidoe"), "{msg}");
}

#[test]
fn bad_hash_is_refused() {
    let msg = refused("[keys.acme]\nkey_sha256 = \"abc\"\n", &[]);
    assert!(
        msg.contains("local.toml") && msg.contains("keys.acme.key_sha256") && msg.contains("64"),
        "{msg}"
    );
}

#[test]
fn bad_cidr_is_refused() {
    let msg = refused(
        &format!("[keys.acme]\nkey_sha256 = \"{HASH}\"\nip_allowlist = [\"10.0.0.0/33\"]\n"),
        &[],
    );
    assert!(
        msg.contains("keys.acme.ip_allowlist") && msg.contains("10.0.0.0/33"),
        "{msg}"
    );
}

#[test]
fn zero_and_negative_limits_are_refused() {
    let msg = refused(
        &format!("[keys.acme]\nkey_sha256 = \"{HASH}\"\nrate_limit_per_min = 0\n"),
        &[],
    );
    assert!(
        msg.contains("keys.acme.rate_limit_per_min") && msg.contains("positive"),
        "{msg}"
    );
    let msg = refused("[defaults]\ncost_per_video = -1\n", &[]);
    assert!(msg.contains("defaults.cost_per_video"), "{msg}");
}

#[test]
fn missing_env_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", &base());
    write(dir.path(), "local.toml", "");
    let msg = source(dir.path(), "local", &[])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("worker.secret") && msg.contains("WORKER_SECRET") && msg.contains("base.toml"),
        "{msg}"
    );
}

#[test]
fn unknown_environment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", &base());
    let msg = source(dir.path(), "staging", &[("WORKER_SECRET", "w")])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown environment") && msg.contains("staging"),
        "{msg}"
    );
}

#[test]
fn production_refuses_demo_key_short_secrets_and_private_targets() {
    let long = "x".repeat(40);
    let check = |extra: &str, worker: &str| {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "base.toml",
            &base().replace("admin-token", &long),
        );
        write(dir.path(), "production.toml", extra);
        source(dir.path(), "production", &[("WORKER_SECRET", worker)]).load()
    };
    assert!(check("", &long).is_ok());
    let demo = check(
        &format!("[keys.demo]\nkey_sha256 = \"{DEMO_KEY_SHA256}\"\n"),
        &long,
    )
    .unwrap_err()
    .to_string();
    assert!(demo.contains("demo key"), "{demo}");
    let short = check("", "short").unwrap_err().to_string();
    assert!(
        short.contains("worker.secret") && short.contains("32"),
        "{short}"
    );
    let private = check("[webhooks]\nallow_private_targets = true\n", &long)
        .unwrap_err()
        .to_string();
    assert!(private.contains("allow_private_targets"), "{private}");
}

#[test]
fn committed_config_files_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let vars = [("INTERNAL_WORKER_SECRET", "w"), ("ADMIN_TOKEN", "a")];
    let local = source(&dir, "local", &vars)
        .load()
        .expect("local.toml is valid");
    assert!(local.key("demo").is_some(), "local ships the demo key");
    source(&dir, "test", &vars)
        .load()
        .expect("test.toml is valid");
    let long = "y".repeat(40);
    let prod = source(
        &dir,
        "production",
        &[
            ("INTERNAL_WORKER_SECRET", long.as_str()),
            ("ADMIN_TOKEN", long.as_str()),
            ("DATABASE_URL", "postgres://db/app"),
        ],
    )
    .load()
    .expect("production.toml is valid with its secrets set");
    assert!(prod.keys.is_empty());
}

#[test]
fn empty_env_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", &base());
    write(dir.path(), "local.toml", "");
    let msg = source(dir.path(), "local", &[("WORKER_SECRET", "")])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("worker.secret") && msg.contains("empty"),
        "{msg}"
    );
}

/// A folder's base.toml may set only what it changes: every other value comes from the
/// shipped `config/base.toml`, compiled in as the first layer, and is the same value the
/// shipped file gives.
#[test]
fn values_not_written_come_from_the_shipped_base_toml() {
    let minimal = tempfile::tempdir().unwrap();
    write(minimal.path(), "base.toml", &base());
    write(minimal.path(), "local.toml", "");
    let vars = [
        ("WORKER_SECRET", "s3cret"),
        ("INTERNAL_WORKER_SECRET", "s3cret"),
        ("ADMIN_TOKEN", "admin-token"),
    ];
    let got = source(minimal.path(), "local", &vars).load().unwrap();

    let shipped = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/base.toml");
    write(
        shipped.path(),
        "base.toml",
        &std::fs::read_to_string(repo).unwrap(),
    );
    write(shipped.path(), "local.toml", "");
    let want = source(shipped.path(), "local", &vars).load().unwrap();

    assert_eq!(got.webhooks.retry_schedule, want.webhooks.retry_schedule);
    assert_eq!(got.webhooks.concurrency, want.webhooks.concurrency);
    assert_eq!(got.worker.lease_seconds, want.worker.lease_seconds);
    assert_eq!(got.worker.max_attempts, want.worker.max_attempts);
    assert_eq!(got.database.write_lanes, want.database.write_lanes);
    assert_eq!(
        got.database.sqlite_synchronous,
        want.database.sqlite_synchronous
    );
    assert_eq!(got.server.ops_bind, want.server.ops_bind);
    assert_eq!(got.retention.usage_days, want.retention.usage_days);
    assert_eq!(
        format!("{:?}", got.defaults),
        format!("{:?}", want.defaults)
    );
    // What the minimal folder did write wins.
    assert_eq!(got.database.url.expose(), "sqlite::memory:");

    // The defaults the README documents, pinned (both sides above could drift together).
    use std::time::Duration;
    let (m, h) = (60, 3600);
    assert_eq!(
        got.webhooks.retry_schedule,
        [5, 5 * m, 30 * m, 2 * h, 5 * h, 10 * h, 10 * h].map(Duration::from_secs),
        "retried after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h"
    );
    assert_eq!(got.webhooks.timeout, Duration::from_secs(15));
    assert_eq!(got.webhooks.concurrency, 32);
    assert!(got.webhooks.dispatch);
    assert!(!got.webhooks.allow_private_targets);
    assert_eq!(
        got.database.sqlite_synchronous,
        api::settings::SqliteSynchronous::Full,
        "synchronous=FULL by default"
    );
    assert_eq!(got.database.write_lanes, 4);
    assert_eq!(got.server.unauthenticated_per_min, 30);
    assert_eq!(got.server.ops_bind, "127.0.0.1:9100");
    assert_eq!(got.server.max_body_bytes, 1_048_576);
    assert_eq!(got.server.header_timeout, Duration::from_secs(10));
    assert_eq!(got.server.body_timeout, Duration::from_secs(30));
    assert_eq!(got.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(got.server.max_connections, 10_000);
    assert_eq!(
        got.defaults.completion_window,
        Some(Duration::from_secs(24 * h))
    );
    assert_eq!(got.defaults.cost_per_video, 10);
    assert!(got.defaults.ip_allowlist.is_empty(), "empty = any address");
    assert_eq!(
        (got.retention.usage_days, got.retention.webhook_days),
        (90, 30)
    );
    assert_eq!(got.worker.lease_seconds, 300);
    assert_eq!(got.worker.max_attempts, 3);
}

/// The rotation, alert, window and cap fields of a key are checked like every other field.
#[test]
fn key_policy_fields_are_checked() {
    let key = |lines: &str| format!("[keys.acme]\nkey_sha256 = \"{HASH}\"\n{lines}\n");
    let other = "a".repeat(64);
    for (lines, field, why) in [
        (
            format!("previous_key_sha256 = \"{other}\""),
            "previous_key_expires_at",
            "is required",
        ),
        (
            "previous_key_expires_at = \"2026-12-01T00:00:00Z\"".to_string(),
            "previous_key_sha256",
            "is required",
        ),
        (
            format!("previous_key_sha256 = \"{other}\"\nprevious_key_expires_at = \"tomorrow\""),
            "previous_key_expires_at",
            "RFC 3339",
        ),
        (
            format!(
                "previous_key_sha256 = \"{HASH}\"\nprevious_key_expires_at = \"2026-12-01T00:00:00Z\""
            ),
            "previous_key_sha256",
            "already configured",
        ),
        (
            "low_credit_threshold = 0".to_string(),
            "low_credit_threshold",
            "between 1",
        ),
        (
            "max_running_items = 0".to_string(),
            "max_running_items",
            "positive",
        ),
        (
            "completion_window = \"soon\"".to_string(),
            "completion_window",
            "not a duration",
        ),
    ] {
        let msg = refused(&key(&lines), &[]);
        assert!(
            msg.contains(&format!("keys.acme.{field}")) && msg.contains(why),
            "{lines}: {msg}"
        );
    }
}

/// The issue's own case: the shipped `local` environment with its demo key disabled and a
/// public bind still has the shipped worker secret, admin token and private targets in effect.
#[test]
fn a_public_bind_is_refused_while_a_shipped_secret_is_in_effect() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let long = "z".repeat(40);
    let mut vars = vec![
        ("APP__KEYS__DEMO__DISABLED", "true"),
        ("APP__SERVER__BIND", "0.0.0.0:8080"),
    ];
    let load = |vars: &[(&str, &str)]| source(&dir, "local", vars).load();
    let msg = load(&vars).unwrap_err().to_string();
    assert!(
        msg.contains("server.bind")
            && msg.contains("APP__SERVER__BIND")
            && msg.contains("worker.secret"),
        "{msg}"
    );
    vars.push(("APP__WORKER__SECRET", &long));
    let msg = load(&vars).unwrap_err().to_string();
    assert!(
        msg.contains("server.bind") && msg.contains("admin.token"),
        "{msg}"
    );
    vars.push(("APP__ADMIN__TOKEN", &long));
    let msg = load(&vars).unwrap_err().to_string();
    assert!(
        msg.contains("webhooks.allow_private_targets")
            && msg.contains("allow_private_targets_on_public_bind"),
        "{msg}"
    );
    vars.push((
        "APP__WEBHOOKS__ALLOW_PRIVATE_TARGETS_ON_PUBLIC_BIND",
        "true",
    ));
    let s = load(&vars).expect("no shipped secret left, private targets acknowledged");
    assert!(s.webhooks.allow_private_targets);
    // The demo key enabled again is refused first; on loopback every shipped secret is fine.
    let msg = load(&vars[1..]).unwrap_err().to_string();
    assert!(
        msg.contains("server.bind") && msg.contains("demo key"),
        "{msg}"
    );
    load(&[]).expect("local on loopback keeps its shipped secrets");
}

/// An environment with another name gets the same guards: they follow what is in effect.
#[test]
fn an_environment_named_staging_is_guarded_like_any_other() {
    let long = "w".repeat(40);
    let check = |extra: &str, worker: &str| {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", &base());
        write(
            dir.path(),
            "staging.toml",
            &format!("[server]\nbind = \"0.0.0.0:8080\"\n{extra}"),
        );
        source(dir.path(), "staging", &[("WORKER_SECRET", worker)]).load()
    };
    let refused = |extra: &str, worker: &str| check(extra, worker).unwrap_err().to_string();
    let s = check("", &long).expect("own secrets on a public bind");
    assert_eq!(s.environment, "staging");

    let demo = refused(
        &format!("[keys.demo]\nkey_sha256 = \"{DEMO_KEY_SHA256}\"\n"),
        &long,
    );
    assert!(
        demo.contains("server.bind") && demo.contains("demo key"),
        "{demo}"
    );
    let renamed = refused(
        &format!("[keys.trial]\nkey_sha256 = \"{DEMO_KEY_SHA256}\"\n"),
        &long,
    );
    assert!(
        renamed.contains("keys.trial"),
        "by its hash, whatever its name: {renamed}"
    );
    check(
        &format!("[keys.demo]\nkey_sha256 = \"{DEMO_KEY_SHA256}\"\ndisabled = true\n"),
        &long,
    )
    .expect("a disabled demo key is not in effect");

    let previous = |until: &str| {
        format!(
            "[keys.acme]\nkey_sha256 = \"{HASH}\"\nprevious_key_sha256 = \"{DEMO_KEY_SHA256}\"\n\
             previous_key_expires_at = \"{until}\"\n"
        )
    };
    let overlap = refused(&previous("2999-01-01T00:00:00Z"), &long);
    assert!(
        overlap.contains("server.bind") && overlap.contains("keys.acme"),
        "the demo key still accepted as a previous key: {overlap}"
    );
    check(&previous("2001-01-01T00:00:00Z"), &long).expect("an overlap that ended");

    for worker in ["local-worker-secret", "test-worker-secret"] {
        let msg = refused("", worker);
        assert!(
            msg.contains("server.bind") && msg.contains("worker.secret"),
            "{msg}"
        );
    }
    for token in ["local-admin-token", "test-admin-token"] {
        let msg = refused(&format!("[admin]\ntoken = \"{token}\"\n"), &long);
        assert!(
            msg.contains("server.bind") && msg.contains("admin.token"),
            "{msg}"
        );
    }

    let private = refused("[webhooks]\nallow_private_targets = true\n", &long);
    assert!(
        private.contains("webhooks.allow_private_targets") && private.contains("staging.toml"),
        "{private}"
    );
    check(
        "[webhooks]\nallow_private_targets = true\nallow_private_targets_on_public_bind = true\n",
        &long,
    )
    .expect("acknowledged");
    // On loopback neither guard applies.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", &base());
    write(
        dir.path(),
        "staging.toml",
        "[admin]\ntoken = \"local-admin-token\"\n[webhooks]\nallow_private_targets = true\n",
    );
    source(
        dir.path(),
        "staging",
        &[("WORKER_SECRET", "local-worker-secret")],
    )
    .load()
    .expect("loopback");
}

/// Production refuses the demo key's hash as a key's previous secret too.
#[test]
fn production_refuses_the_demo_key_as_a_previous_key() {
    let long = "v".repeat(40);
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        &base().replace("admin-token", &long),
    );
    write(
        dir.path(),
        "production.toml",
        &format!(
            "[keys.acme]\nkey_sha256 = \"{HASH}\"\nprevious_key_sha256 = \"{DEMO_KEY_SHA256}\"\n\
             previous_key_expires_at = \"2001-01-01T00:00:00Z\"\n"
        ),
    );
    let msg = source(dir.path(), "production", &[("WORKER_SECRET", &long)])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("keys.acme.previous_key_sha256") && msg.contains("demo key"),
        "even after its overlap ended: {msg}"
    );
}

/// A hash other than `HASH`, for a second key.
const HASH2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

fn loads(extra: &str) -> api::settings::Settings {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", &base());
    write(dir.path(), "local.toml", extra);
    source(dir.path(), "local", &[("WORKER_SECRET", "s3cret")])
        .load()
        .expect("valid")
}

#[test]
fn accounts_hold_what_their_keys_share_and_keys_what_is_their_own() {
    let s = loads(&format!(
        "[defaults]\ncost_per_video = 7\n\
         [accounts.acme]\nrate_limit_per_min = 25\ninitial_credits = 500\nmax_batch_items = 9\n\
         [keys.prod]\nkey_sha256 = \"{HASH}\"\naccount = \"acme\"\nip_allowlist = [\"10.0.0.0/8\"]\n\
         [keys.ci]\nkey_sha256 = \"{HASH2}\"\naccount = \"acme\"\nrate_limit_per_min = 5\n\
         scopes = [\"batches:read\"]\n"
    ));
    let (prod, ci) = (s.key("prod").unwrap(), s.key("ci").unwrap());
    assert_eq!(prod.account.name, "acme");
    assert!(
        std::sync::Arc::ptr_eq(&prod.account, &ci.account),
        "one account"
    );
    assert_eq!(
        prod.account.limits.cost_per_video, 7,
        "defaults flow into accounts"
    );
    assert_eq!(prod.account.limits.max_batch_items, 9);
    assert_eq!(prod.account.initial_credits, 500);
    assert_eq!((prod.create_limit(), ci.create_limit()), (25, 5));
    assert_eq!(prod.ip_allowlist.len(), 1);
    assert!(ci.ip_allowlist.is_empty());
    assert_eq!(s.accounts.len(), 1, "no key is its own account here");

    // A key without `account` is its own account, named after it, as before accounts.
    let s = loads(&format!(
        "[keys.solo]\nkey_sha256 = \"{HASH}\"\ninitial_credits = 40\nrate_limit_per_min = 3\n"
    ));
    let solo = s.key("solo").unwrap();
    assert!(solo.account.implicit);
    assert_eq!(solo.account.name, "solo");
    assert_eq!(solo.account.initial_credits, 40);
    assert_eq!(solo.create_limit(), 3);
    assert_eq!(
        solo.rate_limit_per_min, None,
        "the account's limit is the key's"
    );
}

#[test]
fn account_mistakes_are_refused_naming_the_field() {
    let msg = refused(
        &format!("[keys.prod]\nkey_sha256 = \"{HASH}\"\naccount = \"acme\"\n"),
        &[],
    );
    assert!(
        msg.contains("keys.prod.account") && msg.contains("[accounts.acme]"),
        "{msg}"
    );
    let msg = refused(
        &format!(
            "[accounts.acme]\n[keys.prod]\nkey_sha256 = \"{HASH}\"\naccount = \"acme\"\n\
             initial_credits = 5\n"
        ),
        &[],
    );
    assert!(
        msg.contains("keys.prod.initial_credits") && msg.contains("belongs to the account"),
        "{msg}"
    );
    let msg = refused(
        &format!(
            "[accounts.acme]\nwebhook_url = \"https://example.com/h\"\n\
             [keys.prod]\nkey_sha256 = \"{HASH}\"\naccount = \"acme\"\n"
        ),
        &[],
    );
    assert!(msg.contains("accounts.acme.webhook_secret"), "{msg}");
    let msg = refused(
        &format!("[accounts.acme]\n[keys.acme]\nkey_sha256 = \"{HASH}\"\n"),
        &[],
    );
    assert!(
        msg.contains("accounts.acme") && msg.contains("account = \"acme\""),
        "{msg}"
    );
    let msg = refused(
        &format!(
            "[keys.solo]\nkey_sha256 = \"{HASH}\"\n\
             [keys.other]\nkey_sha256 = \"{HASH2}\"\naccount = \"solo\"\n"
        ),
        &[],
    );
    assert!(
        msg.contains("keys.other.account") && msg.contains("own account"),
        "{msg}"
    );
    let msg = refused("[accounts.acme]\nip_allowlist = [\"10.0.0.0/8\"]\n", &[]);
    assert!(msg.contains("ip_allowlist"), "{msg}");
    let msg = refused("[accounts.Acme]\n", &[]);
    assert!(msg.contains("accounts.Acme"), "{msg}");
}
