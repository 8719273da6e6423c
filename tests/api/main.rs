//! HTTP-level integration tests; each runs on SQLite and, with `TEST_DATABASE_URL`, PostgreSQL.
mod helpers;

mod account;
mod admin;
mod cli;
mod config;
mod crash;
mod create;
mod errors;
mod keys;
mod lifecycle;
mod ops;
mod security;
mod two_nodes;
mod webhooks;
