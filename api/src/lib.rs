//! video-batch-api as a library: settings, database, services, routes and the application.
pub mod auth;
pub mod call;
pub mod cli;
pub mod clock;
pub mod context;
pub mod db;
pub mod docs;
pub mod domain;
pub mod error;
pub mod fault;
pub mod middleware;
pub mod readiness;
pub mod routes;
pub mod schemas;
pub mod server;
pub mod service;
pub mod settings;
pub mod startup;
pub mod state;
pub mod store;
pub mod strangers;
pub mod telemetry;
pub mod worker_client;

pub use startup::Application;
