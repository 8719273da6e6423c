//! HTTP-level integration tests; each runs on SQLite and, with `TEST_DATABASE_URL`, PostgreSQL.
mod helpers;

mod admin;
mod config;
mod create;
mod errors;
mod keys;
mod lifecycle;
mod ops;
mod webhooks;
