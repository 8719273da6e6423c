//! The group-commit pipeline on PostgreSQL, where groups of several nodes take row locks side
//! by side.
use api::store::commit::Writes;
use futures::future::join_all;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::helpers::{Backend, PgDatabase};

/// A unit of key 1 that adds one to row `id`, after sleeping `pause` seconds in the database.
async fn bump(writes: &Writes, id: i64, pause: f64) -> Result<(), api::error::ApiError> {
    writes.run(Some(1), move |txn| add(txn, id, pause)).await
}

/// A rate-limit hit of key 1 in the current window of scope `batch`.
async fn hit(writes: &Writes) -> Result<i64, api::error::ApiError> {
    writes.hit(1, "batch", 0).await
}

fn add<'a>(
    txn: &'a api::store::unit::Txn<'a>,
    id: i64,
    pause: f64,
) -> api::store::commit::UnitFuture<'a, ()> {
    Box::pin(async move {
        if pause > 0.0 {
            txn.execute_unprepared(&format!("SELECT pg_sleep({pause})"))
                .await?;
        }
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "UPDATE t SET v = v + 1 WHERE id = $1",
            [id.into()],
        ))
        .await?;
        Ok(())
    })
}

/// A fresh PostgreSQL database with rows 1 and 2 of table `t` at zero, and two pipelines of
/// one lane each on it (two nodes' groups). `None` without `TEST_DATABASE_URL`.
async fn two_pipelines() -> Option<(PgDatabase, DatabaseConnection, Writes, Writes)> {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return None;
    };
    let pg = PgDatabase::create(&url, "vb_pipe").await;
    let db = api::db::connect_url(&pg.url, 4, None).await.unwrap();
    db.execute_unprepared(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, v BIGINT NOT NULL); INSERT INTO t VALUES (1, 0), (2, 0); \
         CREATE TABLE rate_limit_window (api_key_id BIGINT, scope VARCHAR(16), window_start BIGINT, \
         count BIGINT NOT NULL, PRIMARY KEY (api_key_id, scope, window_start))",
    )
    .await
    .unwrap();
    let a = Writes::start(db.clone(), 1);
    let b = Writes::start(db.clone(), 1);
    Some((pg, db, a, b))
}

async fn value(db: &DatabaseConnection, id: i64) -> i64 {
    db.query_one_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT v FROM t WHERE id = $1",
        [id.into()],
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "v")
    .unwrap()
}

/// Two groups on two pipelines lock rows 1 and 2 in opposite orders: the first unit of each
/// takes one row, the second waits for the other's, and every later unit needs the row the
/// other group holds. The deadlock is met once: its victim's group does not start the units
/// after it (each would wait for its own deadlock detection), commits what it has, and runs
/// the rest again. Every unit is applied exactly once.
#[tokio::test(flavor = "current_thread")]
async fn on_postgres_a_deadlock_between_groups_costs_one_conflict_and_loses_no_unit() {
    let Some((pg, db, a, b)) = two_pipelines().await else {
        return;
    };
    // On one thread every unit below is queued before either lane runs, so each pipeline
    // gathers its six units into one group, in this order.
    let mut calls = Vec::new();
    for (writes, first, other) in [(&a, 1, 2), (&b, 2, 1)] {
        calls.push(bump(writes, first, 0.0));
        calls.push(bump(writes, other, 0.5));
        for _ in 0..4 {
            calls.push(bump(writes, other, 0.0));
        }
    }
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(value(&db, 1).await, 6, "every unit on row 1 applied once");
    assert_eq!(value(&db, 2).await, 6, "every unit on row 2 applied once");
    assert_eq!(
        a.conflicts() + b.conflicts(),
        1,
        "the deadlock was met once, not once per unit after it"
    );
    drop(db);
    pg.drop_now().await;
}

/// Rate-limit hits run before every other write of a group, whatever their arrival order:
/// two groups that received a wallet-like write and a hit in opposite orders lock the quota
/// row and the other row in the same order and never deadlock. (In arrival order, group a
/// would hold row 1 and wait for the quota row while group b held the quota row and waited
/// for row 1.)
#[tokio::test(flavor = "current_thread")]
async fn on_postgres_rate_limit_hits_lock_before_the_groups_other_writes() {
    let Some((pg, db, a, b)) = two_pipelines().await else {
        return;
    };
    let (wallet_a, hit_a, hit_b, wallet_b) =
        tokio::join!(bump(&a, 1, 0.5), hit(&a), hit(&b), bump(&b, 1, 1.0));
    wallet_a.unwrap();
    wallet_b.unwrap();
    let mut counts = [hit_a.unwrap(), hit_b.unwrap()];
    counts.sort();
    assert_eq!(counts, [1, 2], "each hit counted once, in turn");
    assert_eq!(value(&db, 1).await, 2);
    assert_eq!(a.conflicts() + b.conflicts(), 0, "no deadlock");
    drop(db);
    pg.drop_now().await;
}

/// The hits of one group are one statement: a burst of hits on two nodes admits each count
/// exactly once, in arrival order within a node.
#[tokio::test(flavor = "current_thread")]
async fn on_postgres_hits_of_two_nodes_count_each_call_once() {
    let Some((pg, db, a, b)) = two_pipelines().await else {
        return;
    };
    // On one thread, spawned tasks first run in spawn order: the hits reach each node's lane
    // in index order.
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let writes = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { hit(&writes).await.unwrap() })
        })
        .collect();
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.unwrap());
    }
    // Within one node, arrival order is admission order.
    let node_a: Vec<i64> = counts.iter().step_by(2).copied().collect();
    assert!(node_a.windows(2).all(|w| w[0] < w[1]), "{node_a:?}");
    counts.sort();
    assert_eq!(counts, (1..=100).collect::<Vec<_>>(), "every count once");
    assert!(a.commits() + b.commits() < 20, "hits shared commits");
    drop(db);
    pg.drop_now().await;
}
