//! The `video-batch-api` binary: all work happens in the `api` library.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    api::cli::run().await
}
