#!/usr/bin/env python3
"""Makes the upgrade fixture of tests/api/upgrade.rs with a build of a previous release.

    scripts/dev/make_upgrade_fixture.py --bin PREVIOUS/video-batch-api --out DIR [--pg URL]

Runs the previous release's server on a fresh store (SQLite, and PostgreSQL with --pg: a
database created and dropped here), drives a session through its API (creates, a worker that
completes and fails items, a cancel, an admin grant), stops it and keeps the store as it is
(`store.sqlite`, `store.pg.sql` from pg_dump). Then it starts the same release again on a
copy of that store, sends the calls of `calls.json` (reads of every kind, a replayed create, admin
reads) and records the answers (`answers.sqlite.json`, `answers.pg.json`). The test starts the
current release on the kept store, sends the same calls with its clock at `recorded_at`, and
requires every recorded answer again.
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

PORT = 18391
WORKER_SECRET = "test-worker-secret"
ADMIN_TOKEN = "test-admin-token"
KEYS = {"acme": 'initial_credits = 1000', "beta": 'initial_credits = 500\nrate_limit_per_min = 30'}


def key_plaintext(name: str) -> str:
    return f"vb_test_{name}_secret_value"


def config(url: str) -> str:
    toml = (
        f'[server]\nbind = "127.0.0.1:{PORT}"\nops_bind = "127.0.0.1:{PORT + 1}"\n'
        f'[database]\nurl = "{url}"\nmax_connections = 16\n\n'
        f'[worker]\nsecret = "{WORKER_SECRET}"\n[admin]\ntoken = "{ADMIN_TOKEN}"\n\n'
        '[webhooks]\nallow_private_targets = true\nretry_schedule = ["1s", "1s"]\n\n'
    )
    for name, lines in KEYS.items():
        digest = hashlib.sha256(key_plaintext(name).encode()).hexdigest()
        toml += f'[keys.{name}]\nkey_sha256 = "{digest}"\n{lines}\n\n'
    # No batch of the fixture ever expires, whenever the test runs.
    toml += '[defaults]\ncompletion_window = "0"\n'
    return toml


def call(method, path, auth=None, body=None, request_id=None):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method)
    if request_id:
        req.add_header("x-request-id", request_id)
    if auth == "admin":
        req.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    elif auth == "worker":
        req.add_header("Authorization", f"Bearer {WORKER_SECRET}")
    elif auth:
        req.add_header("x-api-key", key_plaintext(auth))
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def serve(binary, conf_dir):
    env = dict(os.environ, APP_CONFIG_DIR=conf_dir, APP_ENVIRONMENT="test", RUST_LOG="warn")
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT + 1}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except Exception:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("the previous release did not become ready")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def ok(status, text, want):
    if status != want:
        sys.exit(f"expected {want}, got {status}: {text}")
    return json.loads(text) if text else None


def session():
    """What the store holds: batches in every state, failures, a cancel, a grant."""
    items = lambda n, tag: [{"prompt": f"{tag} prompt {i}", "params": {"duration_s": 5}} for i in range(n)]
    b1 = ok(*call("POST", "/api/enterprise/video-batch", "acme",
                  {"request_id": "up-1", "items": items(3, "one"), "metadata": {"team": "video"}}), 201)
    b2 = ok(*call("POST", "/api/enterprise/video-batch", "acme",
                  {"request_id": "up-2", "items": items(2, "two")}), 201)
    b3 = ok(*call("POST", "/api/enterprise/video-batch", "beta",
                  {"request_id": "up-3", "items": items(1, "three")}), 201)
    ok(*call("POST", f"/api/enterprise/video-batch/{b2['batch_id']}/cancel", "acme"), 200)
    claimed = ok(*call("POST", "/api/internal/worker/claim", "worker",
                       {"worker_id": "fixture", "max_items": 10}), 200)["items"]
    if len(claimed) != 4:
        sys.exit(f"claimed {len(claimed)} items, expected 4")
    failed = False
    for it in claimed:
        if it["batch_id"] == b1["batch_id"] and not failed:
            failed = True
            ok(*call("POST", f"/api/internal/worker/items/{it['item_id']}/fail", "worker",
                     {"lease_token": it["lease_token"], "error_code": "content_policy",
                      "message": "the prompt was refused", "retryable": False}), 200)
        else:
            ok(*call("POST", f"/api/internal/worker/items/{it['item_id']}/complete", "worker",
                     {"lease_token": it["lease_token"],
                      "result_url": f"https://cdn.example.com/{it['item_id']}.mp4"}), 200)
    b4 = ok(*call("POST", "/api/enterprise/video-batch", "beta",
                  {"request_id": "up-4", "items": items(2, "four")}), 201)
    ok(*call("POST", "/api/admin/keys/beta/credits/grant", "admin",
             {"amount": 250, "note": "invoice 7"}), 200)
    return [b["batch_id"] for b in (b1, b2, b3, b4)]


def calls_of(ids, day):
    b1, b2, b3, b4 = ids
    usage = f"?from={day}&to={day}"
    reads = [
        ("acme", "/video-batch"), ("beta", "/video-batch"), ("acme", "/video-batch?limit=1"),
        ("acme", f"/video-batch/{b1}"), ("acme", f"/video-batch/{b2}"), ("beta", f"/video-batch/{b3}"),
        ("beta", f"/video-batch/{b4}"), ("beta", f"/video-batch/{b1}"),
        ("acme", f"/video-batch/{b1}/items?limit=2"), ("acme", f"/video-batch/{b1}/results"),
        ("acme", f"/video-batch/{b1}/errors"), ("acme", "/credits"), ("beta", "/credits?limit=2"),
        ("acme", f"/usage{usage}"), ("beta", f"/usage{usage}"),
        ("acme", "/webhooks/deliveries"), ("acme", "/webhooks/endpoints"),
    ]
    out = [{"method": "GET", "path": f"/api/enterprise{p}", "auth": k} for k, p in reads]
    out.append({"method": "POST", "path": "/api/enterprise/video-batch", "auth": "acme",
                "body": {"request_id": "up-1", "items": [{"prompt": f"one prompt {i}", "params": {"duration_s": 5}} for i in range(3)],
                         "metadata": {"team": "video"}}})
    out.append({"method": "POST", "path": f"/api/enterprise/video-batch/{b2}/cancel", "auth": "acme"})
    for p in ["/keys", "/keys/acme/credits", f"/keys/beta/usage{usage}", "/webhooks"]:
        out.append({"method": "GET", "path": f"/api/admin{p}", "auth": "admin"})
    # Last, after every read above was audited: the usage they made.
    out.append({"method": "GET", "path": f"/api/enterprise/usage{usage}", "auth": "acme"})
    return out


def record(calls):
    answers = []
    for i, c in enumerate(calls):
        c["request_id"] = f"fixture-{i}"
        status, text = call(c["method"], c["path"], c["auth"], c.get("body"), c["request_id"])
        answers.append({"status": status, "body": text})
    return answers


def run(binary, out, backend, url, conf_dir, keep):
    with open(os.path.join(conf_dir, "base.toml"), "w") as f:
        f.write(config(url))
    open(os.path.join(conf_dir, "test.toml"), "w").close()
    proc = serve(binary, conf_dir)
    ids = session()
    stop(proc)
    keep()
    proc = serve(binary, conf_dir)
    recorded_at = datetime.now(timezone.utc)
    calls = calls_of(ids, recorded_at.date().isoformat())
    answers = record(calls)
    stop(proc)
    with open(os.path.join(out, f"answers.{backend}.json"), "w") as f:
        json.dump({"recorded_at": recorded_at.isoformat(), "calls": calls, "answers": answers}, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pg")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.toml"), "w") as f:
        f.write(config("DATABASE_URL"))
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "store.db")

        def keep_sqlite():
            src = sqlite3.connect(db)
            target = os.path.join(a.out, "store.sqlite")
            if os.path.exists(target):
                os.remove(target)
            src.execute(f"VACUUM INTO '{target}'")
            src.close()

        run(a.bin, a.out, "sqlite", f"sqlite://{db}?mode=rwc", tmp, keep_sqlite)
        if a.pg:
            name = f"vb_fixture_{os.getpid()}"
            subprocess.run(["psql", a.pg, "-qc", f"CREATE DATABASE {name}"], check=True)
            url = a.pg.rsplit("/", 1)[0] + "/" + name

            def keep_pg():
                dump = subprocess.run(["pg_dump", "--no-owner", "--no-privileges", url],
                                      check=True, capture_output=True, text=True).stdout
                with open(os.path.join(a.out, "store.pg.sql"), "w") as f:
                    f.write(dump)

            try:
                run(a.bin, a.out, "pg", url, tmp, keep_pg)
            finally:
                subprocess.run(["psql", a.pg, "-qc", f"DROP DATABASE IF EXISTS {name}"])


if __name__ == "__main__":
    main()
