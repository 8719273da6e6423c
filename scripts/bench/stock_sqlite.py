#!/usr/bin/env python3
"""L_stock for SQLite: the create's writes as one transaction per create, with Python's stock
sqlite3 module (WAL, synchronous=NORMAL), on a database migrated by the server.

    stock_sqlite.py DB_FILE SECONDS   ->  prints {"ops_per_s": N, "ops": N, "seconds": S}

Per create: the rate-limit upsert, the batch row, 2 item rows, the hold ledger row, the usage
row and the conditional wallet update - the statements the service runs, written here by hand
with the stock driver, one commit each (no batching of commits)."""
import json
import sqlite3
import sys
import time
import uuid

from stock_account import stock_account
from datetime import datetime, timezone


def main() -> None:
    path, seconds = sys.argv[1], float(sys.argv[2])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    now = datetime.now(timezone.utc).isoformat(sep=" ")
    # The account owns the wallet, batches and windows (key_id is the account's id).
    key_id = stock_account(db, now)
    db.execute(
        "INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) VALUES (?, ?, 0, ?)",
        (key_id, 10**15, now),
    )
    ops = 0
    start = time.perf_counter()
    pos = 0
    while time.perf_counter() - start < seconds:
        now_dt = datetime.now(timezone.utc)
        now = now_dt.isoformat(sep=" ")
        window = int(now_dt.timestamp()) // 60 * 60
        minute = now_dt.replace(second=0, microsecond=0).isoformat(sep=" ")
        bid = uuid.uuid4().bytes
        rid = "req_" + uuid.uuid4().hex
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO rate_limit_window (api_key_id, scope, window_start, count) VALUES (?, 'batch', ?, 1) "
            "ON CONFLICT (api_key_id, scope, window_start) DO UPDATE SET count = rate_limit_window.count + 1 "
            "RETURNING count",
            (key_id, window),
        ).fetchone()
        db.execute(
            "INSERT INTO batch_job (id, api_key_id, request_id, fingerprint, status, total_count, succeeded_count, "
            "failed_count, cancelled_count, cost_per_video, required_credits, webhook_url, metadata, response, "
            "created_at, updated_at, cancel_requested_at, completed_at) "
            "VALUES (?, ?, ?, ?, 'queued', 2, 0, 0, 0, 10, 20, NULL, ?, ?, ?, ?, NULL, NULL) "
            "ON CONFLICT (api_key_id, request_id) DO NOTHING",
            (bid, key_id, rid, "f" * 64, '{"campaign":"bench"}', '{"ok":true}', now, now),
        )
        db.execute(
            "INSERT INTO batch_item (id, batch_id, api_key_id, idx, prompt, params, status, attempts, fair_pos, "
            "lease_token, worker_id, lease_expires_at, result_url, result, error, created_at, updated_at) VALUES "
            "(?, ?, ?, 0, 'a red fox at dawn', '{\"duration_s\":5}', 'queued', 0, ?, NULL, NULL, NULL, NULL, NULL, NULL, ?, ?), "
            "(?, ?, ?, 1, 'a city at night in the rain', NULL, 'queued', 0, ?, NULL, NULL, NULL, NULL, NULL, NULL, ?, ?)",
            (uuid.uuid4().bytes, bid, key_id, pos, now, now, uuid.uuid4().bytes, bid, key_id, pos + 1, now, now),
        )
        pos += 2
        db.execute(
            "INSERT INTO credit_ledger (api_key_id, kind, amount, batch_id, item_id, note, idempotency_key, created_at) "
            "VALUES (?, 'hold', 20, ?, NULL, NULL, NULL, ?)",
            (key_id, bid, now),
        )
        db.execute(
            "INSERT INTO usage_event (api_key_id, request_id, method, path, status, error_code, client_ip, user_agent, "
            "minute_bucket, latency_us, batch_id, items, credits, count, created_at) "
            "VALUES (?, ?, 'POST', '/api/enterprise/video-batch', 201, NULL, '127.0.0.1', 'oha', ?, 250, ?, 2, 20, 1, ?)",
            (key_id, rid, minute, bid, now),
        )
        db.execute(
            "UPDATE credit_wallet SET held = held + 20, updated_at = ? WHERE api_key_id = ? AND balance - held >= 20 "
            "RETURNING balance, held",
            (now, key_id),
        ).fetchone()
        db.execute("COMMIT")
        ops += 1
    took = time.perf_counter() - start
    print(json.dumps({"ops_per_s": ops / took, "ops": ops, "seconds": took}))


if __name__ == "__main__":
    main()
