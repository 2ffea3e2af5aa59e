//! Logs, metrics and health. Logs are JSON lines; contact data never reaches them (handlers log
//! contact values only through `pii::Masked`).

pub mod health;
pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber (`RUST_LOG` filters, default `info`). Safe to call twice.
pub fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_current_span(false)
        .try_init();
}
