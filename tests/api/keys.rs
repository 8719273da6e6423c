//! Key sync from config: add, change, remove (disabled), initial credits granted once.
use crate::both_backends;
use crate::helpers::{Backend, TestApp, key_plaintext, sha256};

both_backends!(
    key_sync_adds_changes_and_disables,
    initial_credits_are_granted_once
);

async fn key_sync_adds_changes_and_disables(backend: Backend) {
    let mut app = TestApp::builder(backend)
        .key("acme", "initial_credits = 50")
        .key("beta", "")
        .build()
        .await;
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key WHERE disabled = false")
            .await,
        2
    );
    let sql = format!(
        "SELECT COUNT(*) AS v FROM api_key WHERE key_sha256 = '{}'",
        sha256(&key_plaintext("acme"))
    );
    assert_eq!(app.scalar(&sql).await, 1, "only the hash is stored");
    let acme_id = app
        .scalar("SELECT id AS v FROM api_key WHERE name = 'acme'")
        .await;
    let key = key_plaintext("acme");
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("two"), 2))
            .await
            .status(),
        201
    );

    // acme changed (at most one item per batch), gamma added, beta unchanged.
    app.write_config(
        &[
            (
                "acme".into(),
                "initial_credits = 50\nmax_batch_items = 1".into(),
            ),
            ("beta".into(), "".into()),
            ("gamma".into(), "initial_credits = 20".into()),
        ],
        "",
    );
    app.restart().await;
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("two-again"), 2))
            .await
            .status(),
        422,
        "acme's new cap applies"
    );
    assert_eq!(
        app.create_batch(&key, &TestApp::batch_body(Some("one"), 1))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.scalar("SELECT id AS v FROM api_key WHERE name = 'acme'")
            .await,
        acme_id,
        "a changed key keeps its row"
    );
    assert_eq!(
        app.wallet(&key).await.balance,
        50,
        "initial credits not granted again"
    );
    assert_eq!(
        app.wallet(&key_plaintext("gamma")).await.balance,
        20,
        "gamma added"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key WHERE disabled = false")
            .await,
        3
    );

    // beta and gamma removed, acme disabled: all stay in the table, disabled.
    app.write_config(&[("acme".into(), "disabled = true".into())], "");
    app.restart().await;
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key").await,
        3,
        "nothing deleted"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM api_key WHERE disabled = true")
            .await,
        3
    );
    let r = app.credits(&key_plaintext("acme")).await;
    assert_eq!(r["error"], "UNAUTHORIZED");
    let r = app.credits(&key_plaintext("beta")).await;
    assert_eq!(r["error"], "UNAUTHORIZED");
    let r = app.credits(&key_plaintext("gamma")).await;
    assert_eq!(r["error"], "UNAUTHORIZED");
}

async fn initial_credits_are_granted_once(backend: Backend) {
    let mut app = TestApp::builder(backend)
        .key("acme", "initial_credits = 70")
        .build()
        .await;
    for _ in 0..2 {
        app.restart().await;
    }
    // A second node starting on the same database grants nothing either.
    let _peer = app.peer().await;
    let v = app.credits(&key_plaintext("acme")).await;
    assert_eq!(v["balance"], 70, "{v}");
    assert_eq!(
        app.scalar("SELECT COUNT(*) AS v FROM credit_ledger WHERE kind = 'grant'")
            .await,
        1
    );
}

/// Several nodes migrating one PostgreSQL database at once all come up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_on_postgres_all_succeed() {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return;
    };
    use sea_orm::ConnectionTrait;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(url.clone()).await.unwrap();
    admin
        .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, schema) = (url.clone(), schema.clone());
        tasks.push(tokio::spawn(async move {
            let db = api::db::connect_url(&url, 2, Some(&schema)).await.unwrap();
            api::db::migrate(&db).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every node migrates");
    }
    let db = api::db::connect_url(&url, 2, Some(&schema)).await.unwrap();
    assert!(api::db::migrations_applied(&db).await.unwrap());
    admin
        .execute_unprepared(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
