//! Logging setup: human-readable by default, JSON by config; `RUST_LOG` overrides the level.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// actix-http logs a malformed client request at ERROR; that is the client's problem, not
/// an operator's (ERROR means data loss or action needed), so it is kept out by default.
const QUIET_CLIENT_ERRORS: &str = "actix_http::h1::dispatcher=off";

pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},{QUIET_CLIENT_ERRORS}", settings.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
