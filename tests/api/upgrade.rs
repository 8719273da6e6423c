//! Upgrading a store made by the previous release (before accounts), with its configuration as
//! it was: every answer it gave is given again. The fixture in `tests/fixtures/upgrade` was
//! made by `scripts/dev/make_upgrade_fixture.py` with a build of that release: the store after
//! a session (batches completed, failed, cancelled and queued, a grant), and the answers that
//! release gave to a list of calls afterwards.
use std::path::PathBuf;

use serde_json::Value;

use crate::both_backends;
use crate::helpers::{ADMIN_TOKEN, Backend, PgDatabase, TestApp, key_plaintext};

both_backends!(a_store_of_the_previous_release_gives_every_answer_again);

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// True when `new` holds everything `old` holds: equal scalars, the same array lengths with
/// each element held, and every field of an object (a new release may add fields).
fn holds(old: &Value, new: &Value) -> bool {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => o
            .iter()
            .all(|(k, v)| n.get(k).is_some_and(|nv| holds(v, nv))),
        (Value::Array(o), Value::Array(n)) => {
            o.len() == n.len() && o.iter().zip(n).all(|(a, b)| holds(a, b))
        }
        _ => old == new,
    }
}

/// The answer bodies compared as JSON, or as JSON Lines (the exports), line by line.
fn same_body(old: &str, new: &str) -> bool {
    if let (Ok(o), Ok(n)) = (
        serde_json::from_str::<Value>(old),
        serde_json::from_str::<Value>(new),
    ) {
        return holds(&o, &n);
    }
    let (o, n): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    o.len() == n.len() && o.iter().zip(&n).all(|(a, b)| same_body(a, b))
}

async fn a_store_of_the_previous_release_gives_every_answer_again(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let name = if backend.is_postgres() {
        "pg"
    } else {
        "sqlite"
    };
    let recorded: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join(format!("answers.{name}.json"))).unwrap(),
    )
    .unwrap();
    // The configuration of the fixture's config.toml, as the test harness writes one.
    let builder = TestApp::builder(backend.clone())
        .key("acme", "initial_credits = 1000")
        .key("beta", "initial_credits = 500\nrate_limit_per_min = 30")
        .config("[defaults]\ncompletion_window = \"0\"\n");
    let mut pg = None;
    let builder = match &backend {
        Backend::Sqlite => {
            std::fs::copy(fixture().join("store.sqlite"), dir.path().join("test.db")).unwrap();
            builder.sqlite_in(dir.path())
        }
        Backend::Postgres(url) => {
            let db = PgDatabase::create(url, "vb_upgrade").await;
            let out = std::process::Command::new("psql")
                .args([&db.url, "-q", "-v", "ON_ERROR_STOP=1", "-f"])
                .arg(fixture().join("store.pg.sql"))
                .output()
                .expect("psql (the PostgreSQL client) loads the fixture");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let builder = builder.postgres_at(&db.url);
            pg = Some(db);
            builder
        }
    };
    let app = builder.build().await;
    // The answers were given on the day they were recorded: usage reports count that day.
    let at = chrono::DateTime::parse_from_rfc3339(recorded["recorded_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    app.freeze_clock_at(at);

    let calls = recorded["calls"].as_array().unwrap();
    let answers = recorded["answers"].as_array().unwrap();
    assert!(calls.len() > 20);
    for (call, answer) in calls.iter().zip(answers) {
        let (method, path) = (
            call["method"].as_str().unwrap(),
            call["path"].as_str().unwrap(),
        );
        let mut r = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.base))
            .header("x-request-id", call["request_id"].as_str().unwrap());
        r = match call["auth"].as_str().unwrap() {
            "admin" => r.bearer_auth(ADMIN_TOKEN),
            key => r.header("x-api-key", key_plaintext(key)),
        };
        if let Some(body) = call.get("body") {
            r = r.json(body);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        let (want_status, want) = (
            answer["status"].as_u64().unwrap(),
            answer["body"].as_str().unwrap(),
        );
        assert_eq!(u64::from(status), want_status, "{method} {path}: {body}");
        assert!(
            same_body(want, &body),
            "{method} {path}:\nthe previous release answered {want}\nthis one answers {body}"
        );
    }
    // Each key is its own account, with the key's id: nothing was moved.
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key WHERE account_id <> id")
            .await,
        0
    );
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) AS v FROM account a JOIN api_key k ON k.id = a.id AND k.name = a.name"
        )
        .await,
        2
    );
    app.assert_ledger_invariant().await;
    drop(app);
    if let Some(db) = pg {
        db.drop_now().await;
    }
}
