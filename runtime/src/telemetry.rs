//! Tracing set-up shared by every binary.
//!
//! Logs go to stderr (stdout belongs to command output such as the port `portalloc alloc`
//! prints). `RUST_LOG` sets the filter (default `info`); `VIKING_LOG_FORMAT=json` switches to
//! one JSON object per line, `plain` (the default) is for people.

use tracing_subscriber::EnvFilter;

/// Output shape of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

impl LogFormat {
    /// Reads `VIKING_LOG_FORMAT`; anything but `json` means plain.
    pub fn from_env() -> Self {
        match std::env::var("VIKING_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Plain,
        }
    }
}

/// Installs the global subscriber with `default_filter` unless `RUST_LOG` says otherwise.
/// Calling it twice is harmless (the second call changes nothing).
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for people: piped logs (journald, files, tests) stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match LogFormat::from_env() {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}
