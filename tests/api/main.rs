//! HTTP-level integration tests; each runs on SQLite and, with `TEST_DATABASE_URL`, PostgreSQL.
mod helpers;

mod account;
mod admin;
mod cli;
mod cluster;
mod config;
mod crash;
mod create;
mod delivery;
mod errors;
mod hostile;
mod isolation;
mod keys;
mod lifecycle;
mod ops;
mod paging;
mod pipeline;
mod policies;
mod promises;
mod reaper;
mod retention;
mod security;
mod targets;
mod two_nodes;
mod webhooks;
mod wire;
