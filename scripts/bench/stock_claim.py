#!/usr/bin/env python3
"""L_stock_claim for SQLite: a worker's claim of 10 items and its 10 success reports as one
transaction each, with Python's stock sqlite3 module (WAL, synchronous=NORMAL), on a database
migrated by the server.

    stock_claim.py DB_FILE SECONDS [PRELOAD]  ->  prints {"units_per_s": N, "items": N, "seconds": S}

Preloads PRELOAD queued items (default 50,000, in 100-item batches; not timed). Then, one
connection in a loop: the claim (one UPDATE .. RETURNING of the 10 items at the head of the
fair queue), then per item the report (lock the batch row, mark the item succeeded under its
lease token, count it on the batch, charge the wallet, append the ledger row), one commit per
claim and per report (no batching of commits)."""
import json
import sqlite3
import sys
import time
import uuid

from stock_account import stock_account
from datetime import datetime, timedelta, timezone


def ts(t: datetime) -> str:
    return t.isoformat(sep=" ")


def main() -> None:
    path, seconds = sys.argv[1], float(sys.argv[2])
    preload = int(sys.argv[3]) if len(sys.argv) > 3 else 50_000
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    now = ts(datetime.now(timezone.utc))
    # The account owns the wallet, batches and windows (key_id is the account's id).
    key_id = stock_account(db, now)
    db.execute(
        "INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) VALUES (?, ?, ?, ?)",
        (key_id, 10**15, preload * 10, now),
    )
    db.execute("BEGIN")
    for b in range(0, preload, 100):
        bid = uuid.uuid4().bytes
        db.execute(
            "INSERT INTO batch_job (id, api_key_id, request_id, fingerprint, status, total_count, succeeded_count, "
            "failed_count, cancelled_count, cost_per_video, required_credits, webhook_url, metadata, response, "
            "created_at, updated_at, cancel_requested_at, completed_at) "
            "VALUES (?, ?, ?, ?, 'queued', 100, 0, 0, 0, 10, 1000, NULL, NULL, '{}', ?, ?, NULL, NULL)",
            (bid, key_id, "req_" + uuid.uuid4().hex, "f" * 64, now, now),
        )
        db.executemany(
            "INSERT INTO batch_item (id, batch_id, api_key_id, idx, prompt, params, status, attempts, fair_pos, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, 'a red fox at dawn', NULL, 'queued', 0, ?, ?, ?)",
            [(uuid.uuid4().bytes, bid, key_id, i, b + i, now, now) for i in range(100)],
        )
    db.execute("COMMIT")
    items = 0
    worker = "stock-1"
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        now_dt = datetime.now(timezone.utc)
        now, expires = ts(now_dt), ts(now_dt + timedelta(seconds=300))
        token = uuid.uuid4().bytes
        db.execute("BEGIN IMMEDIATE")
        claimed = db.execute(
            "UPDATE batch_item SET status = 'running', attempts = attempts + 1, lease_token = ?, worker_id = ?, "
            "lease_expires_at = ?, updated_at = ? WHERE id IN (SELECT id FROM batch_item WHERE status = 'queued' "
            "ORDER BY fair_pos, created_at LIMIT 10) RETURNING id, batch_id, prompt, params, attempts, fair_pos",
            (token, worker, expires, now),
        ).fetchall()
        if not claimed:
            db.execute("COMMIT")
            break
        batches = sorted({r[1] for r in claimed})
        db.execute(
            "UPDATE batch_job SET status = 'processing', updated_at = ? WHERE id IN (%s) AND status = 'queued'"
            % ", ".join("?" * len(batches)),
            (now, *batches),
        )
        db.execute("COMMIT")
        for item_id, batch_id, *_ in claimed:
            now = ts(datetime.now(timezone.utc))
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "UPDATE batch_job SET updated_at = ? WHERE id = (SELECT batch_id FROM batch_item WHERE id = ?) "
                "RETURNING id, api_key_id, cost_per_video, cancel_requested_at, status, "
                "total_count - succeeded_count - failed_count - cancelled_count",
                (now, item_id),
            ).fetchone()
            db.execute(
                "UPDATE batch_item SET status = 'succeeded', result_url = ?, result = NULL, error = NULL, "
                "lease_token = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ? AND lease_token = ? "
                "AND status = 'running' AND lease_expires_at >= ? RETURNING attempts",
                ("https://cdn.example/v.mp4", now, item_id, token, now),
            ).fetchone()
            db.execute("UPDATE batch_job SET succeeded_count = succeeded_count + 1 WHERE id = ?", (batch_id,))
            db.execute(
                "UPDATE credit_wallet SET balance = balance - 10, held = held - 10, updated_at = ? "
                "WHERE api_key_id = ? AND held >= 10",
                (now, key_id),
            )
            db.execute(
                "INSERT INTO credit_ledger (api_key_id, kind, amount, batch_id, item_id, note, idempotency_key, "
                "created_at) VALUES (?, 'charge', 10, ?, ?, NULL, NULL, ?)",
                (key_id, batch_id, item_id, now),
            )
            db.execute("COMMIT")
            items += 1
    took = time.perf_counter() - start
    print(json.dumps({"units_per_s": items / took, "items": items, "seconds": took}))


if __name__ == "__main__":
    main()
