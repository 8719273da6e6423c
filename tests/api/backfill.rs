//! Upgrading a store that already holds batches and usage: the migrations that add the open
//! counts, the usage rollup and the failure codes fill them from the rows already there.
use chrono::{DateTime, TimeZone, Utc};
use migration::MigratorTrait;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, Value};
use uuid::Uuid;

use crate::both_backends;
use crate::helpers::{Backend, PgDatabase};

both_backends!(the_upgrade_backfills_open_counts_the_usage_rollup_and_failure_codes);

/// Migrations applied before the ones under test.
const BEFORE: u32 = 6;

async fn exec(db: &DatabaseConnection, sql: &str, values: Vec<Value>) {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn one(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> Vec<i64> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get::<i64>("", "v").unwrap())
        .collect()
}

/// An audit row: key, status, error code, batch, items, count (calls it stands for), day.
type AuditRow = (
    Option<i64>,
    i32,
    Option<&'static str>,
    Option<Uuid>,
    i32,
    i64,
    u32,
);

/// The store as the previous release left it: a key, an open batch of five items (two queued,
/// one running, two succeeded), a completed one, audit rows on two days and three charges.
async fn previous_release_rows(db: &DatabaseConnection) -> (Uuid, Uuid) {
    let t =
        |d: u32, h: u32| -> DateTime<Utc> { Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap() };
    exec(
        db,
        "INSERT INTO api_key (id, name, key_sha256, created_at, updated_at) \
         VALUES (1, 'k', 'h', $1, $1)",
        vec![t(1, 0).into()],
    )
    .await;
    let (open, done) = (Uuid::now_v7(), Uuid::now_v7());
    for (id, rid, status, total, succeeded) in [
        (open, "open", "processing", 5, 2),
        (done, "done", "completed", 1, 1),
    ] {
        exec(
            db,
            "INSERT INTO batch_job (id, api_key_id, request_id, fingerprint, status, total_count, \
             succeeded_count, failed_count, cancelled_count, expired_count, cost_per_video, \
             required_credits, response, created_at, updated_at) \
             VALUES ($1, 1, $2, 'f', $3, $4, $5, 0, 0, 0, 10, 50, '{}', $6, $6)",
            vec![
                id.into(),
                rid.into(),
                status.into(),
                total.into(),
                succeeded.into(),
                t(2, 1).into(),
            ],
        )
        .await;
    }
    let items = [
        (open, "queued"),
        (open, "queued"),
        (open, "running"),
        (open, "succeeded"),
        (open, "succeeded"),
        (done, "succeeded"),
    ];
    for (i, (batch, status)) in items.into_iter().enumerate() {
        exec(
            db,
            "INSERT INTO batch_item (id, batch_id, api_key_id, idx, prompt, status, attempts, \
             fair_pos, created_at, updated_at) VALUES ($1, $2, 1, $3, 'p', $4, 1, $3, $5, $5)",
            vec![
                Uuid::now_v7().into(),
                batch.into(),
                (i as i32).into(),
                status.into(),
                t(2, 1).into(),
            ],
        )
        .await;
    }
    // Day 2: a create (201, 5 items), a refused create (429, an aggregated row of 3 calls), a
    // read; day 3: a not-found read. A stranger's call (no key) is nobody's usage.
    let audits: [AuditRow; 5] = [
        (Some(1), 201, None, Some(open), 5, 1, 2),
        (Some(1), 429, Some("RATE_LIMIT_EXCEEDED"), None, 0, 3, 2),
        (Some(1), 200, None, None, 0, 1, 2),
        (Some(1), 404, Some("NOT_FOUND"), None, 0, 1, 3),
        (None, 401, Some("UNAUTHORIZED"), None, 0, 7, 3),
    ];
    for (key, status, code, batch, items, count, day) in audits {
        exec(
            db,
            "INSERT INTO usage_event (api_key_id, method, path, status, error_code, \
             minute_bucket, latency_us, batch_id, items, credits, count, created_at) \
             VALUES ($1, 'GET', '/x', $2, $3, $4, 1, $5, $6, 0, $7, $4)",
            vec![
                key.into(),
                status.into(),
                code.into(),
                t(day, 10).into(),
                batch.into(),
                items.into(),
                count.into(),
            ],
        )
        .await;
    }
    for (amount, day) in [(10i64, 2), (10, 3), (10, 3)] {
        exec(
            db,
            "INSERT INTO credit_ledger (api_key_id, kind, amount, created_at) \
             VALUES (1, 'charge', $1, $2)",
            vec![amount.into(), t(day, 12).into()],
        )
        .await;
    }
    (open, done)
}

/// A finished batch of the previous release with two failed items: one whose lease ran out
/// (the reaper's message) and one a worker reported.
async fn previous_release_failures(db: &DatabaseConnection) -> Uuid {
    let at = Utc.with_ymd_and_hms(2026, 11, 2, 1, 0, 0).unwrap();
    let failed = Uuid::now_v7();
    exec(
        db,
        "INSERT INTO batch_job (id, api_key_id, request_id, fingerprint, status, total_count, \
         succeeded_count, failed_count, cancelled_count, expired_count, cost_per_video, \
         required_credits, response, created_at, updated_at) \
         VALUES ($1, 1, 'failed', 'f', 'completed', 3, 0, 3, 0, 0, 10, 30, '{}', $2, $2)",
        vec![failed.into(), at.into()],
    )
    .await;
    for (i, error) in ["lease expired", "renderer crashed", "renderer crashed"]
        .into_iter()
        .enumerate()
    {
        exec(
            db,
            "INSERT INTO batch_item (id, batch_id, api_key_id, idx, prompt, status, attempts, \
             fair_pos, error, created_at, updated_at) \
             VALUES ($1, $2, 1, $3, 'p', 'failed', 3, $3, $4, $5, $5)",
            vec![
                Uuid::now_v7().into(),
                failed.into(),
                (i as i32).into(),
                error.into(),
                at.into(),
            ],
        )
        .await;
    }
    failed
}

async fn the_upgrade_backfills_open_counts_the_usage_rollup_and_failure_codes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let pg = match &backend {
        Backend::Postgres(url) => Some(PgDatabase::create(url, "backfill").await),
        Backend::Sqlite => None,
    };
    let url = match &pg {
        Some(pg) => pg.url.clone(),
        None => format!("sqlite://{}/b.db?mode=rwc", dir.path().display()),
    };
    let db = api::db::connect_url(&url, 1, None).await.unwrap();
    migration::Migrator::up(&db, Some(BEFORE)).await.unwrap();
    let (open, done) = previous_release_rows(&db).await;
    let failed = previous_release_failures(&db).await;

    migration::Migrator::up(&db, None).await.unwrap();
    db.close().await.unwrap();
    // Read back through a connection of its own.
    let db = api::db::connect_url(&url, 1, None).await.unwrap();

    let counts = "SELECT CAST(queued_count AS BIGINT) AS v FROM batch_job WHERE id = $1 \
                  UNION ALL SELECT CAST(running_count AS BIGINT) FROM batch_job WHERE id = $1";
    assert_eq!(one(&db, counts, vec![open.into()]).await, [2, 1]);
    assert_eq!(one(&db, counts, vec![done.into()]).await, [0, 0]);
    let from = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let to = Utc.with_ymd_and_hms(2026, 11, 5, 0, 0, 0).unwrap();
    let rolled = api::store::usage::daily(&db, api::domain::ids::AccountId(1), from, to)
        .await
        .unwrap();
    let raw = api::store::usage::daily_from_raw_rows(&db, api::domain::ids::AccountId(1), from, to)
        .await
        .unwrap();
    assert_eq!(rolled, raw);
    assert_eq!(rolled.len(), 2);
    let d2 = &rolled[0];
    assert_eq!(
        (
            d2.counts.calls,
            d2.counts.calls_2xx,
            d2.counts.calls_4xx,
            d2.counts.rate_limited
        ),
        (5, 2, 3, 3)
    );
    assert_eq!(
        (d2.counts.batches, d2.counts.items, d2.credits_charged),
        (1, 5, 10)
    );
    assert_eq!((rolled[1].counts.calls, rolled[1].credits_charged), (1, 20));
    // Failures of the previous release have codes: a lease that ran out is `worker_lost`,
    // anything else `internal`; the batch counts them per code.
    let codes = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT error_code FROM batch_item WHERE batch_id = $1 ORDER BY idx",
            [failed.into()],
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<Option<String>>("", "error_code").unwrap())
        .collect::<Vec<_>>();
    assert_eq!(
        codes,
        [
            Some("worker_lost".to_string()),
            Some("internal".to_string()),
            Some("internal".to_string())
        ]
    );
    let job = api::store::jobs::owned(&db, api::domain::ids::AccountId(1), failed)
        .await
        .unwrap()
        .unwrap();
    let counts = api::store::jobs::error_counts(job.error_counts.as_deref());
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("internal".to_string(), 2), ("worker_lost".to_string(), 1)]
    );
    let untouched = api::store::jobs::owned(&db, api::domain::ids::AccountId(1), done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untouched.error_counts, None);
    db.close().await.unwrap();
    if let Some(pg) = pg {
        pg.drop_now().await;
    }
}
