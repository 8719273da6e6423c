"""The account both stock ceilings write as: one account with one key, its id returned (the
owner of the wallet, batches, items and windows the scripts write)."""
import sqlite3


def stock_account(db: sqlite3.Connection, now: str) -> int:
    db.execute(
        "INSERT INTO account (name, disabled, created_at, updated_at) VALUES (?, 0, ?, ?)",
        ("stock", now, now),
    )
    account = db.execute("SELECT id FROM account WHERE name = 'stock'").fetchone()[0]
    db.execute(
        "INSERT INTO api_key (name, key_sha256, disabled, account_id, created_at, updated_at) "
        "VALUES (?, ?, 0, ?, ?, ?)",
        ("stock", "0" * 64, account, now, now),
    )
    return account
