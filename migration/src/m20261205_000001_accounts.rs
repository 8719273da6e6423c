//! Accounts: the customer that owns a wallet, limits, batches, a ledger, webhooks and usage,
//! with any number of keys (`api_key.account_id`).
//!
//! Every key that exists becomes its own account, with the key's id and name, so that what a key
//! owned is its account's without rewriting a row: the owner columns of the account's tables
//! keep their name (`api_key_id`) and now hold account ids, which for these accounts are the key
//! ids they held. Their foreign keys are pointed at `account`. New accounts take ids above every
//! existing one.
//!
//! `config_reload` counts configuration reloads, so that a reload on one node is followed by
//! every node.
//!
//! Two tables are rebuilt, both small: `usage_rollup` gains the account in its primary key (a
//! key moved to another account starts new rows there), and `rate_limit_window` loses its
//! foreign key (its rows count calls per account, or per key for a key's own tighter limit).
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Creates `account` and moves the owner tables onto it.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// Tables whose `api_key_id` is the owning account from now on.
const OWNED: [&str; 6] = [
    "credit_wallet",
    "credit_ledger",
    "batch_job",
    "batch_item",
    "webhook_delivery",
    "charge_rollup",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        let (id, ts, boolean) = match backend {
            DbBackend::Postgres => (
                "id BIGSERIAL PRIMARY KEY",
                "TIMESTAMP WITH TIME ZONE",
                "BOOLEAN",
            ),
            _ => ("id INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT", "BOOLEAN"),
        };
        let mut steps: Vec<String> = vec![
            format!(
                "CREATE TABLE account ({id}, name VARCHAR(64) NOT NULL UNIQUE, \
                 disabled {boolean} NOT NULL DEFAULT FALSE, created_at {ts} NOT NULL, \
                 updated_at {ts} NOT NULL)"
            ),
            "INSERT INTO account (id, name, disabled, created_at, updated_at) \
             SELECT id, name, disabled, created_at, updated_at FROM api_key"
                .into(),
        ];
        if backend == DbBackend::Postgres {
            steps.push(
                "SELECT setval(pg_get_serial_sequence('account', 'id'), \
                 COALESCE((SELECT MAX(id) FROM account), 0) + 1, false)"
                    .into(),
            );
        }
        steps.extend(
            [
                "ALTER TABLE api_key ADD COLUMN account_id BIGINT REFERENCES account (id)",
                "UPDATE api_key SET account_id = id",
                "CREATE INDEX ix_api_key_account ON api_key (account_id)",
                // The audit row names the account as well as the key (rows written before this
                // name the key only: its account had the key's id).
                "ALTER TABLE usage_event ADD COLUMN account_id BIGINT",
                // usage_rollup: (account, day, key, outcome).
                "CREATE TABLE usage_rollup_new (\
                 account_id BIGINT NOT NULL REFERENCES account (id) ON DELETE RESTRICT, \
                 api_key_id BIGINT NOT NULL REFERENCES api_key (id) ON DELETE RESTRICT, \
                 day VARCHAR(10) NOT NULL, status_class INTEGER NOT NULL, \
                 error_code VARCHAR(32) NOT NULL DEFAULT '', calls BIGINT NOT NULL DEFAULT 0, \
                 rate_limited BIGINT NOT NULL DEFAULT 0, batches BIGINT NOT NULL DEFAULT 0, \
                 items BIGINT NOT NULL DEFAULT 0, \
                 PRIMARY KEY (account_id, day, api_key_id, status_class, error_code))",
                "INSERT INTO usage_rollup_new (account_id, api_key_id, day, status_class, \
                 error_code, calls, rate_limited, batches, items) \
                 SELECT api_key_id, api_key_id, day, status_class, error_code, calls, \
                 rate_limited, batches, items FROM usage_rollup",
                "DROP TABLE usage_rollup",
                "ALTER TABLE usage_rollup_new RENAME TO usage_rollup",
                "CREATE INDEX ix_usage_rollup_day ON usage_rollup (day)",
                // rate_limit_window: no foreign key.
                "CREATE TABLE rate_limit_window_new (api_key_id BIGINT NOT NULL, \
                 scope VARCHAR(16) NOT NULL, window_start BIGINT NOT NULL, \
                 count BIGINT NOT NULL, PRIMARY KEY (api_key_id, scope, window_start))",
                "INSERT INTO rate_limit_window_new (api_key_id, scope, window_start, count) \
                 SELECT api_key_id, scope, window_start, count FROM rate_limit_window",
                "DROP TABLE rate_limit_window",
                "ALTER TABLE rate_limit_window_new RENAME TO rate_limit_window",
                "CREATE INDEX ix_rate_limit_window_start ON rate_limit_window (window_start)",
            ]
            .map(String::from),
        );
        // A reload on any node is counted here; every other node reads its own files again
        // when the count moves (see the revocation watch).
        steps.push(format!(
            "CREATE TABLE config_reload (id INTEGER PRIMARY KEY, generation BIGINT NOT NULL, \
             updated_at {ts} NOT NULL)"
        ));
        steps.push(
            "INSERT INTO config_reload (id, generation, updated_at) \
             VALUES (1, 0, CURRENT_TIMESTAMP)"
                .into(),
        );
        if backend == DbBackend::Postgres {
            for sql in &steps {
                db.execute_unprepared(sql).await?;
            }
        } else {
            // One call: on SQLite the statements must run on one connection of the pool (each
            // of the pool's connections would otherwise see a schema of its own moment).
            db.execute_unprepared(&steps.join(";\n")).await?;
        }

        // The owner tables' foreign keys now name `account`.
        let list = OWNED
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        match backend {
            DbBackend::Postgres => {
                db.execute_unprepared(&format!(
                    "DO $$ DECLARE r record; BEGIN \
                     FOR r IN SELECT conrelid::regclass::text AS t, conname FROM pg_constraint \
                     WHERE contype = 'f' AND confrelid = 'api_key'::regclass \
                     AND conrelid::regclass::text IN ({list}) LOOP \
                     EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', r.t, r.conname); \
                     END LOOP; END $$"
                ))
                .await?;
                for t in OWNED {
                    // NOT VALID: every row already names an account (its key's id); new rows
                    // are checked.
                    db.execute_unprepared(&format!(
                        "ALTER TABLE {t} ADD CONSTRAINT {t}_account_fkey FOREIGN KEY (api_key_id) \
                         REFERENCES account (id) ON DELETE RESTRICT NOT VALID"
                    ))
                    .await?;
                }
            }
            _ => {
                let version: i64 = db
                    .query_one_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        "PRAGMA schema_version",
                    ))
                    .await?
                    .ok_or_else(|| DbErr::Custom("no schema_version".into()))?
                    .try_get_by_index(0)?;
                // The text of a foreign key is not stored in the table's pages: changing the
                // table it names is a change of the schema text alone. One call: the statements
                // must run on one connection of the pool.
                db.execute_unprepared(&format!(
                    "PRAGMA writable_schema = ON; \
                     UPDATE sqlite_master SET sql = replace(replace(sql, \
                     'REFERENCES \"api_key\" (\"id\")', 'REFERENCES \"account\" (\"id\")'), \
                     'REFERENCES api_key (id)', 'REFERENCES account (id)') \
                     WHERE type = 'table' AND name IN ({list}); \
                     PRAGMA schema_version = {}; \
                     PRAGMA writable_schema = OFF",
                    version + 1
                ))
                .await?;
                let left = db
                    .query_all_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        format!(
                            "SELECT name FROM sqlite_master WHERE type = 'table' \
                             AND name IN ({list}) \
                             AND (sql LIKE '%REFERENCES \"api_key\"%' OR sql LIKE '%REFERENCES api_key %')"
                        ),
                    ))
                    .await?;
                if !left.is_empty() {
                    return Err(DbErr::Migration(
                        "an owner table's foreign key was not moved to account".into(),
                    ));
                }
                let broken = db
                    .query_all_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        "PRAGMA foreign_key_check",
                    ))
                    .await?;
                if !broken.is_empty() {
                    return Err(DbErr::Migration(format!(
                        "{} rows name no account after the move",
                        broken.len()
                    )));
                }
            }
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        // Accounts with several keys cannot be split back into one wallet per key.
        Err(DbErr::Migration(
            "accounts cannot be rolled back once keys may share one".into(),
        ))
    }
}
