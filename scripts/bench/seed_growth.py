#!/usr/bin/env python3
"""Seeds a SQLite store, migrated by the server and with its keys synced from config, with the
history of a customer who has used the service for a year (the cost-growth phase of
scripts/bench.sh). Written with Python's stock sqlite3 in one transaction, in the formats the
server writes (UUIDs as 16-byte blobs, RFC 3339 text timestamps).

    seed_growth.py DB_FILE HISTORY_ITEMS USAGE_ROWS QUEUED_ITEMS  ->  prints a JSON summary

Key `bench`: HISTORY_ITEMS finished items in batches of 100 over the past 365 days (a charge
ledger row per item; 1 in 50 failed with a code), QUEUED_ITEMS queued items in batches of 100 (for
the claim), USAGE_ROWS raw usage rows over the past 365 days with their daily rollup rows.
Key `wide`: 20 finished batches of 1,000 items (the newest it has) and one of 50,000 items.
Key `narrow`: 20 finished batches of 2 items. Ids are time-ordered like the server's UUIDv7, all
older than anything the server makes later."""
import json
import os
import sqlite3
import sys
import time
from datetime import datetime, timedelta, timezone

NOW = datetime.now(timezone.utc)
START = NOW - timedelta(days=365)


def ts(t: datetime) -> str:
    return t.isoformat(timespec="microseconds")


def v7(t: datetime) -> bytes:
    """A UUIDv7 of time t: 48 bits of milliseconds, version 7, then random bits."""
    ms = int(t.timestamp() * 1000)
    rand = bytearray(os.urandom(10))
    rand[0] = 0x70 | (rand[0] & 0x0F)
    rand[2] = 0x80 | (rand[2] & 0x3F)
    return ms.to_bytes(6, "big") + bytes(rand)


def main() -> None:
    path = sys.argv[1]
    history, usage_rows, queued = (int(a) for a in sys.argv[2:5])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    # The owner columns hold account ids (each bench key is its own account); audit rows name
    # the key and its account.
    accounts = dict(db.execute("SELECT name, account_id FROM api_key").fetchall())
    key_ids = dict(db.execute("SELECT name, id FROM api_key").fetchall())
    started = time.perf_counter()
    db.execute("BEGIN")
    counts = {"batches": 0, "items": 0, "ledger": 0, "usage": 0}

    def batch(key: int, at: datetime, n: int, status: str, failed_every: int = 0) -> None:
        bid = v7(at)
        t = ts(at)
        items = []
        failed = 0
        for i in range(n):
            if status == "queued":
                st, code = "queued", None
            elif failed_every and i % failed_every == failed_every - 1:
                st, code = "failed", "model_error"
                failed += 1
            else:
                st, code = "succeeded", None
            items.append((
                v7(at), bid, key, i, f"prompt {i} of a batch", '{"duration_s":5}', st,
                0 if st == "queued" else 1, counts["items"] + i,
                f"https://cdn.example.com/{counts['items'] + i}.mp4" if st == "succeeded" else None,
                "render failed" if code else None, t, t, code,
            ))
        ok = n - failed if status != "queued" else 0
        response = json.dumps({"ok": True, "request_id": f"seed-{bid.hex()}", "batch_id": bid.hex(),
                               "idempotent_replay": False, "status": "queued", "total_count": n})
        db.execute(
            "INSERT INTO batch_job (id, api_key_id, request_id, fingerprint, status, total_count, "
            "succeeded_count, failed_count, cancelled_count, cost_per_video, required_credits, "
            "metadata, response, created_at, updated_at, completed_at, expires_at, expired_count, "
            "queued_count, running_count, error_counts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 10, ?, '{}', ?, ?, ?, ?, NULL, 0, ?, 0, ?)",
            (bid, key, f"seed-{bid.hex()}", "f" * 64, "queued" if status == "queued" else "completed",
             n, ok, failed, 10 * n, response, t, t, None if status == "queued" else t,
             n if status == "queued" else 0,
             json.dumps({"model_error": failed}) if failed else None),
        )
        db.executemany(
            "INSERT INTO batch_item (id, batch_id, api_key_id, idx, prompt, params, status, attempts, "
            "fair_pos, result_url, error, created_at, updated_at, error_code) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            items,
        )
        if status != "queued":
            db.executemany(
                "INSERT INTO credit_ledger (api_key_id, kind, amount, batch_id, item_id, created_at) "
                "VALUES (?, 'charge', 10, ?, ?, ?)",
                [(key, bid, it[0], t) for it in items if it[6] == "succeeded"],
            )
            counts["ledger"] += ok
            day = at.date().isoformat()
            db.execute(
                "INSERT INTO charge_rollup (api_key_id, day, credits) VALUES (?, ?, ?) "
                "ON CONFLICT (api_key_id, day) DO UPDATE SET credits = credits + excluded.credits",
                (key, day, 10 * ok),
            )
        counts["batches"] += 1
        counts["items"] += n

    bench, wide, narrow = accounts["bench"], accounts["wide"], accounts["narrow"]
    bench_key = key_ids["bench"]
    span = (NOW - START - timedelta(days=2)).total_seconds()
    nb = max(1, history // 100)
    for b in range(nb):
        batch(bench, START + timedelta(seconds=span * b / nb), 100, "done", failed_every=50)
    for b in range(max(1, queued // 100)):
        batch(bench, NOW - timedelta(days=1, seconds=3600 - b), 100, "queued")
    batch(wide, NOW - timedelta(days=1, hours=2), 50_000, "done")
    for b in range(20):
        batch(wide, NOW - timedelta(days=1, minutes=60 - b), 1000, "done")
        batch(narrow, NOW - timedelta(days=1, minutes=60 - b), 2, "done")

    # Usage: raw rows over the year (the audit trail) and their daily rollup.
    per_day: dict[str, int] = {}
    rows = []
    for u in range(usage_rows):
        at = START + timedelta(seconds=span * u / max(1, usage_rows))
        minute = at.replace(second=0, microsecond=0)
        rows.append((bench_key, bench, f"seed-usage-{u}", "GET", "/api/enterprise/video-batch", 200,
                     "127.0.0.1", "seed", ts(minute), 900, ts(at)))
        day = at.date().isoformat()
        per_day[day] = per_day.get(day, 0) + 1
        if len(rows) == 50_000:
            db.executemany(
                "INSERT INTO usage_event (api_key_id, account_id, request_id, method, path, status, "
                "client_ip, user_agent, minute_bucket, latency_us, created_at, count, key_version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 'current')",
                rows,
            )
            rows.clear()
    if rows:
        db.executemany(
            "INSERT INTO usage_event (api_key_id, account_id, request_id, method, path, status, "
            "client_ip, user_agent, minute_bucket, latency_us, created_at, count, key_version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 'current')",
            rows,
        )
    db.executemany(
        "INSERT INTO usage_rollup (account_id, api_key_id, day, status_class, error_code, calls) "
        "VALUES (?, ?, ?, 2, '', ?) "
        "ON CONFLICT (account_id, day, api_key_id, status_class, error_code) "
        "DO UPDATE SET calls = calls + excluded.calls",
        [(bench, bench_key, d, c) for d, c in per_day.items()],
    )
    counts["usage"] = usage_rows
    # Every key can pay for what the benchmark sends; the queued items are held.
    db.execute("UPDATE credit_wallet SET balance = 1000000000000000, held = ? WHERE api_key_id = ?",
               (10 * max(1, queued // 100) * 100, bench))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    counts["seconds"] = round(time.perf_counter() - started, 1)
    counts["file_mib"] = round(os.path.getsize(path) / 2**20, 1)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
