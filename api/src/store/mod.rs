//! The store: every statement the service runs, one module per table, as named functions.
//! Plain inserts and reads use sea-orm's builder; raw SQL only where a statement needs
//! `RETURNING`, `ON CONFLICT`, `SKIP LOCKED`, a partial index or a multi-row form. The rules
//! every statement follows (`SKIP LOCKED`, literal `LIMIT`s) are in [`sql`]. Services compose
//! these functions inside the transactions of the write lanes of [`commit`]; the benchmark calls the
//! same functions.
pub mod appended;
pub mod commit;
pub mod counts;
pub mod items;
pub mod jobs;
pub mod keys;
pub mod ledger;
pub mod probe;
pub mod rate_limits;
pub mod sql;
pub mod unit;
pub mod usage;
pub mod wallets;
pub mod webhooks;
