//! The engine's tests: groups, the fast and isolated paths, hits, audits, store failures.
use std::future::Future;

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use super::*;
use crate::domain::usage::UsageRow;
use crate::error::ApiError;

async fn sqlite() -> (tempfile::TempDir, DatabaseConnection) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/p.db?mode=rwc", dir.path().display());
    let db = crate::db::connect_url(&url, 1, None).await.unwrap();
    db.execute_unprepared(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL CHECK (v >= 0))",
    )
    .await
    .unwrap();
    (dir, db)
}

/// Rows of table `t`.
async fn rows(db: &DatabaseConnection) -> i64 {
    rows_of(db, "t").await
}

async fn rows_of(db: &DatabaseConnection, table: &str) -> i64 {
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        format!("SELECT COUNT(*) AS n FROM {table}"),
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "n")
    .unwrap()
}

async fn insert(writes: &Writes, id: i64, v: i64) -> Result<i64, ApiError> {
    writes
        .run(Some(id), move |txn| {
            Box::pin(async move {
                txn.execute_raw(Statement::from_sql_and_values(
                    txn.get_database_backend(),
                    "INSERT INTO t (id, v) VALUES ($1, $2)",
                    [id.into(), v.into()],
                ))
                .await?;
                Ok(id)
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_unit_does_not_fail_its_group() {
    let (_dir, db) = sqlite().await;
    let writes = Writes::start(db.clone(), 1);
    // 200 concurrent units, every tenth breaks a CHECK constraint.
    let calls = (0..200).map(|i| {
        let writes = writes.clone();
        async move { insert(&writes, i, if i % 10 == 0 { -1 } else { i }).await }
    });
    let results = futures::future::join_all(calls).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 20);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i % 10 != 0, "unit {i}");
    }
    let n = rows(&db).await;
    assert_eq!(n, 180, "every other unit is committed");
}

/// When a unit of [`insert_then`] says no: before it writes, after it writes, or never.
#[derive(Clone, Copy)]
enum Refuse {
    Before,
    After,
    Never,
}

/// A unit that inserts row `i` of table `t`, refusing as `refuse` says (a refusal before
/// writing reads the table first).
async fn insert_then(writes: &Writes, i: i64, refuse: Refuse) -> Result<i64, ApiError> {
    writes
        .run(Some(1), move |txn| {
            Box::pin(async move {
                let no = || ApiError::new(crate::error::ErrorCode::Conflict, "no");
                if let Refuse::Before = refuse {
                    txn.query_one_raw(Statement::from_string(
                        txn.get_database_backend(),
                        "SELECT COUNT(*) AS n FROM t",
                    ))
                    .await?;
                    return Err(no());
                }
                txn.execute_raw(Statement::from_sql_and_values(
                    txn.get_database_backend(),
                    "INSERT INTO t (id, v) VALUES ($1, 1)",
                    [i.into()],
                ))
                .await?;
                if let Refuse::After = refuse {
                    return Err(no());
                }
                Ok(i)
            })
        })
        .await
}

/// A unit that reads and refuses (a create without the credits, a report of an unknown
/// item) changed nothing: its group stays on the fast path, without a savepoint, and the
/// refusal is answered with the others once the group is committed.
#[tokio::test(flavor = "current_thread")]
async fn a_unit_refused_before_writing_keeps_its_group_on_the_fast_path() {
    let (_dir, db) = sqlite().await;
    let writes = Writes::start(db.clone(), 1);
    let tasks = spawn_each(&writes, 100, |writes, i| async move {
        let refuse = if i % 5 == 0 {
            Refuse::Before
        } else {
            Refuse::Never
        };
        insert_then(&writes, i as i64, refuse).await
    });
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.is_err(), i % 5 == 0, "unit {i}: {r:?}");
    }
    assert_eq!(rows(&db).await, 80);
    assert_eq!(writes.isolated_groups(), 0, "no group needed savepoints");
    assert!(writes.commits() < 50, "{} commits", writes.commits());
}

/// A unit that fails after changing rows (without a statement error: its own rule says
/// no) takes its group to the isolated path: what it wrote is rolled back, every other unit
/// of the group is committed, each answered once.
#[tokio::test(flavor = "current_thread")]
async fn a_unit_that_fails_after_writing_is_rolled_back_alone() {
    let (_dir, db) = sqlite().await;
    let writes = Writes::start(db.clone(), 1);
    let tasks = spawn_each(&writes, 100, |writes, i| async move {
        let refuse = if i % 7 == 0 {
            Refuse::After
        } else {
            Refuse::Never
        };
        insert_then(&writes, i as i64, refuse).await
    });
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.is_err(), i % 7 == 0, "unit {i}: {r:?}");
    }
    assert_eq!(
        rows(&db).await,
        100 - 15,
        "the 15 failing units wrote nothing"
    );
    let kept: i64 = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM t WHERE id % 7 = 0",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "n")
        .unwrap();
    assert_eq!(kept, 0);
    assert!(writes.isolated_groups() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_units_share_commits() {
    let (_dir, db) = sqlite().await;
    let writes = Writes::start(db.clone(), 1);
    let calls = (1000..1400).map(|i| {
        let writes = writes.clone();
        async move { insert(&writes, i, 1).await }
    });
    assert!(
        futures::future::join_all(calls)
            .await
            .iter()
            .all(Result::is_ok)
    );
    assert!(
        writes.commits() < 100,
        "400 concurrent units took {} commits",
        writes.commits()
    );
    let n = rows(&db).await;
    assert_eq!(n, 400);
}

/// A SQLite writer (one connection, `synchronous=FULL`) whose store is "full" at the page
/// limit the returned handle sets, and table `big` whose rows each need about half a page.
async fn limited_writer() -> (
    tempfile::TempDir,
    String,
    DatabaseConnection,
    crate::db::PageLimit,
) {
    let (dir, db) = sqlite().await;
    db.execute_unprepared("CREATE TABLE big (id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
        .await
        .unwrap();
    let url = format!("sqlite://{}/p.db?mode=rwc", dir.path().display());
    let limit = crate::db::PageLimit::default();
    let writer = crate::db::PoolSpec::new(&url, 1)
        .synchronous(crate::settings::SqliteSynchronous::Full)
        .page_limit(&limit)
        .open()
        .await
        .unwrap();
    (dir, url, writer, limit)
}

async fn insert_big(writes: &Writes, id: i64) -> Result<i64, ApiError> {
    writes
        .run(Some(1), move |txn| {
            Box::pin(async move {
                txn.execute_raw(Statement::from_sql_and_values(
                    txn.get_database_backend(),
                    "INSERT INTO big (id, b) VALUES ($1, randomblob(2000))",
                    [id.into()],
                ))
                .await?;
                Ok(id)
            })
        })
        .await
}

/// The ids in table `big`, read through a connection of its own (never the writer's).
async fn committed_ids(url: &str) -> Vec<i64> {
    let fresh = crate::db::connect_url(url, 1, None).await.unwrap();
    let rows = fresh
        .query_all_raw(Statement::from_string(
            fresh.get_database_backend(),
            "SELECT id FROM big ORDER BY id",
        ))
        .await
        .unwrap();
    let ids = rows
        .iter()
        .map(|r| r.try_get::<i64>("", "id").unwrap())
        .collect();
    fresh.close().await.unwrap();
    ids
}

/// A full store (SQLite `FULL`, which may roll the whole transaction back by itself) fails
/// the groups it hits as a whole: every unit answered success is committed (seen through a
/// fresh connection), every unit answered with the failure is not, none is answered 500;
/// once there is room again, writes succeed on the same pipeline without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_answers_only_what_committed_and_recovers() {
    let (_dir, url, writer, limit) = limited_writer().await;
    let writes = Writes::start(writer.clone(), 1);
    let pages: u64 = writer
        .query_one_raw(Statement::from_string(
            writer.get_database_backend(),
            "PRAGMA page_count",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap() as u64;
    limit.set(&writer, pages + 20).await.unwrap();
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for wave in 0..6i64 {
        let calls = (0..40).map(|i| {
            let writes = writes.clone();
            async move { insert_big(&writes, wave * 1000 + i).await }
        });
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(id) => acknowledged.push(id),
                Err(e) => {
                    assert_eq!(e.status.as_u16(), 503, "{e}");
                    assert_eq!(e.code, crate::error::ErrorCode::StoreUnavailable);
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0, "the store never filled up");
    assert!(!acknowledged.is_empty());
    assert!(writes.failing(), "the last groups failed");
    // The writer's connection is outside any transaction, as SQLite and sqlx both see it:
    // one that failed inside a group was closed, never handed out again.
    let mut conn = writer.get_sqlite_connection_pool().acquire().await.unwrap();
    {
        use sea_orm::sqlx::Connection;
        assert!(!conn.is_in_transaction(), "sqlx counts a transaction open");
    }
    let mut handle = conn.lock_handle().await.unwrap();
    // SAFETY: the handle is locked out of the connection's worker; the call only reads.
    let autocommit =
        unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) };
    assert_ne!(autocommit, 0, "SQLite has a transaction open");
    drop(handle);
    drop(conn);
    acknowledged.sort();
    assert_eq!(
        committed_ids(&url).await,
        acknowledged,
        "exactly the acknowledged rows are committed"
    );

    // Room again: the same pipeline commits, no restart.
    limit.set(&writer, 0).await.unwrap();
    for i in 0..20 {
        acknowledged.push(insert_big(&writes, 100_000 + i).await.unwrap());
    }
    acknowledged.sort();
    assert_eq!(committed_ids(&url).await, acknowledged);
}

/// A migrated SQLite database with one key (id 1) and a one-lane pipeline on it.
async fn migrated() -> (tempfile::TempDir, DatabaseConnection, Writes) {
    let (dir, db) = sqlite().await;
    crate::db::migrate(&db).await.unwrap();
    db.execute_unprepared(
        "INSERT INTO account (id, name, disabled, created_at, updated_at) \
         VALUES (1, 'k', FALSE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'); \
         INSERT INTO api_key (id, name, key_sha256, account_id, created_at, updated_at) \
         VALUES (1, 'k', 'h', 1, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
    )
    .await
    .unwrap();
    let writes = Writes::start(db.clone(), 1);
    (dir, db, writes)
}

/// `n` tasks running `f(i)`, spawned in index order. On one thread, tasks first run in
/// the order they were spawned, so their writes reach a lane in index order.
fn spawn_each<T, F, Fut>(writes: &Writes, n: usize, f: F) -> Vec<tokio::task::JoinHandle<T>>
where
    T: Send + 'static,
    F: Fn(Writes, usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    (0..n).map(|i| tokio::spawn(f(writes.clone(), i))).collect()
}

/// A counted unit runs in the group that counts its call, and only within the limit: of
/// 50 calls against a limit of 20 exactly the first 20 run (one of which fails alone,
/// having used its place), the other 30 write nothing; far fewer commits than calls.
#[tokio::test(flavor = "current_thread")]
async fn counted_units_run_only_within_the_limit() {
    let (_dir, db, writes) = migrated().await;
    let tasks = spawn_each(&writes, 50, |writes, i| async move {
        let v: i64 = if i == 5 { -1 } else { 1 };
        writes
            .run_counted(1, "batch", 60, 20, move |txn| {
                Box::pin(async move {
                    txn.execute_raw(Statement::from_sql_and_values(
                        txn.get_database_backend(),
                        "INSERT INTO t (id, v) VALUES ($1, $2)",
                        [(i as i64).into(), v.into()],
                    ))
                    .await?;
                    Ok(i)
                })
            })
            .await
    });
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok((count, ran)) => {
                assert_eq!(count, i as i64 + 1, "call {i} counted in arrival order");
                assert_eq!(ran, (i < 20).then_some(i), "call {i}");
            }
            Err(_) => assert_eq!(i, 5, "only the broken unit fails"),
        }
    }
    assert_eq!(rows(&db).await, 19, "the 19 admitted units that hold");
    assert!(writes.commits() < 50, "{} commits", writes.commits());
}

/// Ledger rows a unit appends are written by its group in the group's transaction, and
/// only for units that hold: a unit that fails after appending leaves no row, on the fast
/// path (every unit holds) as on the isolated one.
#[tokio::test(flavor = "current_thread")]
async fn appended_rows_are_written_with_their_group_and_dropped_with_a_failing_unit() {
    use crate::domain::money::LedgerKind;
    use crate::store::ledger::NewEntry;
    let (_dir, db, writes) = migrated().await;
    let tasks = spawn_each(&writes, 60, |writes, i| async move {
        writes
            .run(Some(1), move |txn| {
                Box::pin(async move {
                    txn.append_ledger(
                        NewEntry::new(1, LedgerKind::Grant, i as i64 + 1).row(Utc::now()),
                    );
                    if i % 6 == 5 {
                        return Err(ApiError::new(crate::error::ErrorCode::Conflict, "no"));
                    }
                    Ok(i)
                })
            })
            .await
    });
    let mut held = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.is_err(), i % 6 == 5, "unit {i}: {r:?}");
        if r.is_ok() {
            held += i as i64 + 1;
        }
    }
    let sum: i64 = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n, SUM(amount) AS s FROM credit_ledger",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "s")
        .unwrap();
    assert_eq!(rows_of(&db, "credit_ledger").await, 50);
    assert_eq!(sum, held, "exactly the rows of the units that held");
    assert!(writes.commits() < 60, "{} commits", writes.commits());
}

/// Charges of one key in a group move its wallet together (on SQLite, one update for the
/// group) and each leaves its ledger row; a charge the wallet cannot take (more than is
/// held) fails alone, and the wallet ends exact.
#[tokio::test(flavor = "current_thread")]
async fn charges_of_a_group_move_the_wallet_exactly_once_each() {
    use crate::domain::money::LedgerKind;
    use crate::store::ledger::{NewEntry, apply_in};
    let (_dir, db, writes) = migrated().await;
    db.execute_unprepared(
        "INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) \
         VALUES (1, 1000, 100, '2026-01-01T00:00:00Z')",
    )
    .await
    .unwrap();
    // Eleven charges of 10 against 100 held: ten fit, whichever order, one cannot.
    let tasks = spawn_each(&writes, 11, |writes, _| async move {
        writes
            .run(Some(1), move |txn| {
                Box::pin(async move {
                    if apply_in(txn, NewEntry::new(1, LedgerKind::Charge, 10)).await? {
                        Ok(())
                    } else {
                        Err(ApiError::new(
                            crate::error::ErrorCode::Conflict,
                            "held too small",
                        ))
                    }
                })
            })
            .await
    });
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap().is_ok());
    }
    assert_eq!(ok, 10);
    let w = crate::store::wallets::read(&db, crate::domain::ids::AccountId(1))
        .await
        .unwrap();
    assert_eq!((w.balance, w.held), (900, 0));
    assert_eq!(rows_of(&db, "credit_ledger").await, 10);
}

/// The hits below reach the lane in index order.
#[tokio::test(flavor = "current_thread")]
async fn hits_are_counted_once_each_in_arrival_order_per_key() {
    let (_dir, _db, writes) = migrated().await;
    // Three windows of one key, interleaved; most hits are queued before the lane runs,
    // so groups hold hits of several windows.
    let tasks = spawn_each(&writes, 300, |writes, i| async move {
        let (scope, start) = [("batch", 60), ("read", 60), ("batch", 120)][i % 3];
        (i % 3, writes.hit(1, scope, start).await.unwrap())
    });
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for w in 0..3 {
        let seen: Vec<i64> = results
            .iter()
            .filter(|(k, _)| *k == w)
            .map(|(_, c)| *c)
            .collect();
        assert_eq!(seen, (1..=100).collect::<Vec<_>>(), "window {w}");
    }
    assert!(writes.commits() < 100, "{} commits", writes.commits());
}

fn audit_row(status: u16) -> UsageRow {
    UsageRow {
        api_key_id: Some(1),
        method: "GET".into(),
        path: "/api/enterprise/video-batch".into(),
        status,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_row_that_cannot_be_written_fails_alone() {
    let (_dir, db, writes) = migrated().await;
    // A key id that does not exist breaks the foreign key: that row alone fails.
    let calls = (0..50).map(|i| {
        let writes = writes.clone();
        async move {
            let mut row = audit_row(200);
            if i == 25 {
                row.api_key_id = Some(999);
            }
            writes.audit(row, chrono::Utc::now()).await
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i != 25, "row {i}: {r:?}");
    }
    assert_eq!(rows_of(&db, "usage_event").await, 49);
}

#[tokio::test(flavor = "current_thread")]
async fn a_hit_that_cannot_be_counted_fails_alone() {
    let (_dir, db, writes) = migrated().await;
    // The store refuses the window of key 999, which fails the group's one statement; every
    // other hit and the unit of the group still commit.
    db.execute_unprepared(
        "CREATE TRIGGER refuse_999 BEFORE INSERT ON rate_limit_window \
         WHEN NEW.api_key_id = 999 BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .await
    .unwrap();
    let tasks = spawn_each(&writes, 30, |writes, i| async move {
        let key = if i == 10 { 999 } else { 1 };
        writes.hit(key, "read", 60).await
    });
    let unit = tokio::spawn({
        let writes = writes.clone();
        async move { insert(&writes, 5, 5).await }
    });
    let mut counts = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.is_ok(), i != 10, "hit {i}: {r:?}");
        counts.extend(r.ok());
    }
    assert_eq!(unit.await.unwrap().unwrap(), 5);
    counts.sort();
    assert_eq!(counts, (1..=29).collect::<Vec<_>>());
    assert_eq!(rows(&db).await, 1);
}
