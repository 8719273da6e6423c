//! Accounts: several keys share one wallet, one set of limits and one history, exactly, with
//! concurrent calls through several keys on two nodes; a key's own tighter limit holds inside
//! its account's; a read-only key reads the account's history and writes nothing; a reload on
//! one node moves a key to another account on every node.
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp, count_window};

both_backends!(
    two_keys_on_two_nodes_share_the_account_limit_and_wallet_exactly,
    one_request_id_through_two_keys_at_once_makes_one_batch,
    a_keys_own_limit_holds_inside_its_accounts,
    a_read_only_key_reads_the_account_and_writes_nothing,
    a_reload_on_one_node_moves_a_key_to_another_account_on_every_node,
    the_admin_api_addresses_accounts_and_the_key_paths_their_keys_accounts,
    the_running_cap_is_the_accounts_across_its_keys_and_nodes,
);

/// Answers of `n` creates of one item each, sent at once, alternating keys and nodes.
async fn creates_at_once(
    nodes: &[&TestApp],
    keys: &[&str],
    prefix: &str,
    n: usize,
) -> Vec<(u16, Value)> {
    join_all((0..n).map(|i| {
        let node = nodes[i % nodes.len()];
        let key = node.key(keys[(i / nodes.len()) % keys.len()]).to_string();
        let body = TestApp::batch_body(Some(&format!("{prefix}-{i}")), 1);
        async move {
            let r = node.create_batch(&key, &body).await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    }))
    .await
}

fn count(answers: &[(u16, Value)], status: u16) -> usize {
    answers.iter().filter(|(s, _)| *s == status).count()
}

/// 60 creates through two keys of one account on two nodes, at once, against the account's
/// limit of 25: exactly 25 are admitted and held. Then 30 through both keys against a wallet
/// that holds exactly 10 batches: exactly 10 are admitted and the wallet is empty.
async fn two_keys_on_two_nodes_share_the_account_limit_and_wallet_exactly(backend: Backend) {
    let app = TestApp::builder(backend)
        .config(
            "[accounts.acme]\ninitial_credits = 100000\nrate_limit_per_min = 25\n\n\
             [accounts.lean]\ninitial_credits = 100\nrate_limit_per_min = 1000\n",
        )
        .key("acme-prod", "account = \"acme\"")
        .key("acme-ci", "account = \"acme\"")
        .key("lean-a", "account = \"lean\"")
        .key("lean-b", "account = \"lean\"")
        .build()
        .await;
    let peer = app.peer().await;
    // One minute window on both nodes, whenever the test runs.
    let at = app.freeze_clock();
    peer.freeze_clock_at(at);

    let answers = creates_at_once(&[&app, &peer], &["acme-prod", "acme-ci"], "rl", 60).await;
    assert_eq!(
        count(&answers, 201),
        25,
        "the account's limit across keys and nodes"
    );
    assert_eq!(count(&answers, 429), 35);
    for (status, body) in &answers {
        if *status == 429 {
            assert_eq!(body["error"], "RATE_LIMIT_EXCEEDED", "{body}");
            assert_eq!(body["details"]["applies_to"], "account", "{body}");
        }
    }
    for key in ["acme-prod", "acme-ci"] {
        let w = app.wallet(app.key(key)).await;
        assert_eq!(
            (w.balance, w.held),
            (100_000, 25 * 10),
            "{key} sees the account's one wallet"
        );
    }
    assert_eq!(
        count_window(&app, "batch").await,
        60,
        "one window for both keys"
    );

    let answers = creates_at_once(&[&app, &peer], &["lean-a", "lean-b"], "w", 30).await;
    assert_eq!(count(&answers, 201), 10, "what fits the shared wallet");
    assert_eq!(count(&answers, 402), 20);
    for key in ["lean-a", "lean-b"] {
        let w = peer.wallet(peer.key(key)).await;
        assert_eq!((w.balance, w.held, w.available), (100, 100, 0), "{key}");
    }
    app.assert_ledger_invariant().await;
}

/// The same `request_id` sent through two keys of one account on two nodes at once, ten
/// times: each id makes one batch, and every answer names it.
async fn one_request_id_through_two_keys_at_once_makes_one_batch(backend: Backend) {
    let app = TestApp::builder(backend)
        .config("[accounts.acme]\ninitial_credits = 100000\nrate_limit_per_min = 1000\n")
        .key("acme-prod", "account = \"acme\"")
        .key("acme-ci", "account = \"acme\"")
        .build()
        .await;
    let peer = app.peer().await;
    for round in 0..10 {
        let rid = format!("same-{round}");
        let body = TestApp::batch_body(Some(&rid), 2);
        let sends = [
            (&app, "acme-prod"),
            (&peer, "acme-ci"),
            (&app, "acme-ci"),
            (&peer, "acme-prod"),
        ]
        .map(|(node, key)| {
            let body = body.clone();
            async move {
                let r = node.create_batch(node.key(key), &body).await;
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            }
        });
        let answers = join_all(sends).await;
        let ids: Vec<&Value> = answers.iter().map(|(_, b)| &b["batch_id"]).collect();
        assert!(
            answers.iter().all(|(s, _)| *s == 201 || *s == 200),
            "{answers:?}"
        );
        assert_eq!(count(&answers, 201), 1, "{answers:?}");
        assert!(ids.iter().all(|id| *id == ids[0]), "{answers:?}");
    }
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 10);
    let w = app.wallet(app.key("acme-ci")).await;
    assert_eq!(w.held, 10 * 2 * 10, "each batch held once");

    // Any key of the account pages and cancels the account's batches.
    let page: Value = peer
        .list_batches(peer.key("acme-ci"), "limit=4")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 4, "{page}");
    let cursor = page["next_cursor"].as_str().expect("more pages");
    let rest: Value = app
        .list_batches(app.key("acme-prod"), &format!("limit=10&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["data"].as_array().unwrap().len(), 6, "{rest}");
    let id = page["data"][0]["batch_id"].as_str().unwrap();
    let r = peer.cancel_batch(peer.key("acme-prod"), id).await;
    assert_eq!(r.status(), 200);
    let w = app.wallet(app.key("acme-ci")).await;
    assert_eq!(w.held, 9 * 2 * 10, "the cancel released its hold");
    app.assert_ledger_invariant().await;
}

/// An account of 25 creates a minute with a CI key capped at 5: 20 creates through the CI key
/// at once admit exactly 5 (refused as the key's own limit), and the other key still has the
/// account's remaining 20 of 30 sent at once.
async fn a_keys_own_limit_holds_inside_its_accounts(backend: Backend) {
    let app = TestApp::builder(backend)
        .config("[accounts.acme]\ninitial_credits = 100000\nrate_limit_per_min = 25\n")
        .key("acme-prod", "account = \"acme\"")
        .key("acme-ci", "account = \"acme\"\nrate_limit_per_min = 5")
        .build()
        .await;
    let peer = app.peer().await;
    let at = app.freeze_clock();
    peer.freeze_clock_at(at);

    let answers = creates_at_once(&[&app, &peer], &["acme-ci"], "ci", 20).await;
    assert_eq!(count(&answers, 201), 5, "the key's own limit");
    for (status, body) in &answers {
        if *status == 429 {
            assert_eq!(body["details"]["applies_to"], "key", "{body}");
            assert_eq!(body["details"]["limit"], 5, "{body}");
        }
    }
    assert_eq!(
        count_window(&app, "batch").await,
        5,
        "refused by the key: no account quota"
    );

    let answers = creates_at_once(&[&app, &peer], &["acme-prod"], "prod", 30).await;
    assert_eq!(count(&answers, 201), 20, "what the account has left");
    let r = app
        .create_batch(app.key("acme-ci"), &TestApp::batch_body(Some("late"), 1))
        .await;
    assert_eq!(r.status(), 429);
    let w = app.wallet(app.key("acme-ci")).await;
    assert_eq!(w.held, 25 * 10);
}

/// A dashboard key with read scopes only: its creates are 403 FORBIDDEN_SCOPE, audited, using
/// no quota; it reads, pages and exports the batches other keys of its account created, reads
/// the account's wallet and its usage with a per-key breakdown. A key of another account sees
/// none of them.
async fn a_read_only_key_reads_the_account_and_writes_nothing(backend: Backend) {
    let app = TestApp::builder(backend)
        .config("[accounts.acme]\ninitial_credits = 1000\n")
        .key("acme-prod", "account = \"acme\"")
        .key(
            "acme-dash",
            "account = \"acme\"\nscopes = [\"batches:read\", \"credits:read\", \"usage:read\"]",
        )
        .key("other", "initial_credits = 1000")
        .build()
        .await;
    let (prod, dash, other) = (app.key("acme-prod"), app.key("acme-dash"), app.key("other"));
    let id = app.created_batch_id(prod, "by-prod", 3).await;
    let windows = count_window(&app, "batch").await;

    for i in 0..3 {
        let r = app
            .create_batch(dash, &TestApp::batch_body(Some(&format!("dash-{i}")), 1))
            .await;
        assert_eq!(r.status(), 403);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "FORBIDDEN_SCOPE", "{v}");
        let r = app
            .client
            .post(format!(
                "{}/api/enterprise/video-batch/{id}/cancel",
                app.base
            ))
            .header("x-api-key", dash)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "a cancel is a write");
    }
    assert_eq!(count_window(&app, "batch").await, windows, "no quota used");
    assert_eq!(app.scalar("SELECT COUNT(*) AS v FROM batch_job").await, 1);

    assert_eq!(app.get_batch(dash, &id).await.status(), 200);
    let list: Value = app.list_batches(dash, "").await.json().await.unwrap();
    assert_eq!(list["data"][0]["batch_id"], id.as_str(), "{list}");
    let (status, _) = app
        .customer_get(dash, &format!("/video-batch/{id}/results"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(app.wallet(dash).await.held, 30, "the account's wallet");
    for path in [
        format!("/video-batch/{id}"),
        format!("/video-batch/{id}/results"),
    ] {
        assert_eq!(app.customer_get(other, &path).await.0, 404, "{path}");
    }
    let list: Value = app.list_batches(other, "").await.json().await.unwrap();
    assert_eq!(list["data"], json!([]), "{list}");

    let (status, usage) = app.customer_get(dash, "/usage").await;
    assert_eq!(status, 200, "{usage}");
    let usage: Value = serde_json::from_str(&usage).unwrap();
    let keys = usage["keys"].as_array().expect("per-key breakdown");
    let of = |name: &str| {
        keys.iter()
            .find(|k| k["key"] == name)
            .unwrap_or_else(|| panic!("{name} in {usage}"))
            .clone()
    };
    assert_eq!(of("acme-prod")["batches"], 1, "{usage}");
    assert_eq!(of("acme-prod")["items"], 3, "{usage}");
    assert_eq!(
        of("acme-dash")["calls_4xx"],
        6,
        "the refused writes: {usage}"
    );
    assert!(keys.iter().all(|k| k["key"] != "other"), "{usage}");
    let total: i64 = usage["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["calls"].as_i64().unwrap())
        .sum();
    let by_key: i64 = keys.iter().map(|k| k["calls"].as_i64().unwrap()).sum();
    assert_eq!(total, by_key, "the days add up the keys: {usage}");

    // The audit rows name the key and the account.
    let dash_rows = app
        .scalar(
            "SELECT COUNT(*) AS v FROM usage_event u JOIN api_key k ON k.id = u.api_key_id \
             JOIN account a ON a.id = u.account_id \
             WHERE k.name = 'acme-dash' AND a.name = 'acme' AND u.status = 403",
        )
        .await;
    assert_eq!(dash_rows, 6);
}

/// Two nodes on the same files; `mover` belongs to account `a`. The files move it to `b` and
/// only the first node is reloaded: within five seconds the other node bills `b` for a create
/// through `mover`, whose earlier batch stays `a`'s.
async fn a_reload_on_one_node_moves_a_key_to_another_account_on_every_node(backend: Backend) {
    let accounts = "[accounts.a]\ninitial_credits = 1000\n\n[accounts.b]\ninitial_credits = 1000\n";
    let keys = |account: &str| {
        vec![
            ("mover".to_string(), format!("account = \"{account}\"")),
            ("a-main".to_string(), "account = \"a\"".to_string()),
            ("b-main".to_string(), "account = \"b\"".to_string()),
        ]
    };
    let mut builder = TestApp::builder(backend).config(accounts);
    for (name, lines) in keys("a") {
        builder = builder.key(&name, &lines);
    }
    let app = builder.build().await;
    let peer = app.peer().await;
    let first = peer.created_batch_id(peer.key("mover"), "before", 1).await;
    assert_eq!(peer.wallet(peer.key("a-main")).await.held, 10);

    app.write_config(&keys("b"), accounts);
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 200);

    let started = Instant::now();
    loop {
        let w = peer.wallet(peer.key("mover")).await;
        if w.balance == 1000 && w.held == 0 {
            // The peer now answers for `b`, whose wallet is untouched.
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the peer still bills the old account"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = peer.created_batch_id(peer.key("mover"), "after", 1).await;
    assert_eq!(
        peer.wallet(peer.key("b-main")).await.held,
        10,
        "billed to b"
    );
    assert_eq!(
        peer.wallet(peer.key("a-main")).await.held,
        10,
        "a keeps its hold"
    );
    assert_eq!(
        peer.get_batch(peer.key("mover"), &first).await.status(),
        404,
        "the earlier batch stays with a"
    );
    assert_eq!(
        peer.get_batch(peer.key("a-main"), &first).await.status(),
        200
    );
    assert_eq!(
        peer.get_batch(peer.key("b-main"), &second).await.status(),
        200
    );
    assert_eq!(app.get_batch(app.key("mover"), &second).await.status(), 200);

    // Disabling the account refuses every key of it on every node.
    app.write_config(
        &keys("b"),
        &accounts.replace("[accounts.b]\n", "[accounts.b]\ndisabled = true\n"),
    );
    let r = app.admin_post("/config/reload", &json!({}), None).await;
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    for key in ["mover", "b-main"] {
        while peer.customer_get(peer.key(key), "/credits").await.0 != 401 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{key} still works on the peer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(app.customer_get(app.key(key), "/credits").await.0, 401);
    }
    assert_eq!(
        peer.customer_get(peer.key("a-main"), "/credits").await.0,
        200
    );
}

/// The admin API lists accounts with their keys, policy and wallet; grants and adjusts address
/// the account (once per Idempotency-Key), and the key paths address the key's account.
async fn the_admin_api_addresses_accounts_and_the_key_paths_their_keys_accounts(backend: Backend) {
    let app = TestApp::builder(backend)
        .config("[accounts.acme]\ninitial_credits = 100\nrate_limit_per_min = 25\n")
        .key("acme-prod", "account = \"acme\"")
        .key("acme-ci", "account = \"acme\"\nrate_limit_per_min = 5")
        .key("solo", "initial_credits = 7")
        .build()
        .await;
    let accounts = app.admin_get("/accounts").await;
    let list = accounts.as_array().expect("a list");
    let acme = list.iter().find(|a| a["name"] == "acme").expect("acme");
    assert_eq!(acme["keys"], json!(["acme-ci", "acme-prod"]), "{accounts}");
    assert_eq!(acme["own_account_of_key"], false);
    assert_eq!(acme["rate_limit_per_min"], 25);
    assert_eq!(acme["balance"], 100);
    let solo = list.iter().find(|a| a["name"] == "solo").expect("solo");
    assert_eq!(solo["own_account_of_key"], true, "{accounts}");
    assert_eq!(solo["keys"], json!(["solo"]));
    assert_eq!(solo["balance"], 7);

    let one = app.admin_get("/accounts/acme").await;
    assert_eq!(&one, acme, "one account as the list shows it");
    let keys = app.admin_get("/keys").await;
    let ci = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "acme-ci")
        .expect("acme-ci");
    assert_eq!(ci["account"], "acme", "{keys}");
    assert_eq!(ci["rate_limit_per_min"], 5, "the key's own, tighter limit");

    for _ in 0..3 {
        let r = app
            .admin_post(
                "/accounts/acme/credits/grant",
                &json!({ "amount": 50, "note": "po 9" }),
                Some("po-9"),
            )
            .await;
        assert_eq!(r.status(), 200);
        let w: Value = r.json().await.unwrap();
        assert_eq!(
            (w["account"].clone(), w["balance"].clone()),
            (json!("acme"), json!(150))
        );
    }
    let r = app
        .admin_post(
            "/keys/acme-ci/credits/adjust",
            &json!({ "amount": -20 }),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let w: Value = r.json().await.unwrap();
    assert_eq!(w["account"], "acme", "{w}");
    assert_eq!(w["key"], "acme-ci", "{w}");
    assert_eq!(w["balance"], 130, "the key path moves its account's wallet");
    assert_eq!(app.wallet(app.key("acme-prod")).await.balance, 130);
    let w = app.admin_get("/accounts/acme/credits?limit=2").await;
    assert_eq!(w["ledger"].as_array().unwrap().len(), 2, "{w}");
    assert!(w.get("key").is_none(), "{w}");

    app.create_batch(app.key("acme-ci"), &TestApp::batch_body(Some("a"), 2))
        .await;
    let usage = app.admin_get("/accounts/acme/usage").await;
    assert_eq!(usage["keys"][0]["key"], "acme-ci", "{usage}");
    assert_eq!(usage["keys"][0]["batches"], 1, "{usage}");
    assert_eq!(
        app.admin_get("/keys/acme-prod/usage").await["keys"],
        usage["keys"]
    );
    for path in [
        "/accounts/nobody",
        "/accounts/nobody/credits",
        "/accounts/nobody/usage",
    ] {
        let r = app
            .client
            .get(format!("{}/api/admin{path}", app.base))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    app.assert_ledger_invariant().await;
}

/// An account capped at 3 running items with a batch of 4 through each of its two keys:
/// claims on two nodes at once lease exactly 3 of its 8 items and fill the rest from another
/// account's queue; a finished item makes room for exactly one more.
async fn the_running_cap_is_the_accounts_across_its_keys_and_nodes(backend: Backend) {
    let app = TestApp::builder(backend)
        .config("[accounts.acme]\ninitial_credits = 10000\nmax_running_items = 3\n")
        .key("acme-prod", "account = \"acme\"")
        .key("acme-ci", "account = \"acme\"")
        .key("other", "initial_credits = 10000")
        .build()
        .await;
    let peer = app.peer().await;
    let mut acme = Vec::new();
    for (key, rid) in [("acme-prod", "p"), ("acme-ci", "c")] {
        acme.push(app.created_batch_id(app.key(key), rid, 4).await);
    }
    app.created_batch_id(app.key("other"), "o", 4).await;
    let is_acme = |item: &Value| acme.iter().any(|id| item["batch_id"] == id.as_str());

    let (a, b) = futures::join!(app.claim_retrying("w1", 4), peer.claim_retrying("w2", 4));
    let claimed: Vec<Value> = a.into_iter().chain(b).collect();
    let of_acme: Vec<&Value> = claimed.iter().filter(|i| is_acme(i)).collect();
    assert_eq!(
        of_acme.len(),
        3,
        "the account's cap across both keys and nodes"
    );
    assert_eq!(claimed.len(), 7, "the rest filled from the other account");

    assert_eq!(app.complete_retrying(of_acme[0]).await, 200);
    let more = peer.claim_retrying("w3", 8).await;
    assert_eq!(more.len(), 1, "room for exactly one more");
    assert!(is_acme(&more[0]));
}
