//! The `video-batch-api` binary: all work happens in the `api` library.
use std::process::ExitCode;

/// A request allocates and frees many small buffers (headers, JSON, rows): mimalloc's
/// per-thread free lists serve them with less work than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match api::cli::run().await {
        Ok(()) => ExitCode::SUCCESS,
        // A configuration mistake is the operator's to fix: one clear line, exit status 2
        // (like a usage error), and no backtrace even with RUST_BACKTRACE set.
        Err(e) if e.downcast_ref::<api::settings::ConfigError>().is_some() => {
            eprintln!("video-batch-api: invalid configuration: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}
