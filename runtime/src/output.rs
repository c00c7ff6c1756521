//! `--output`, the same flag in every binary: results on stdout as text for people or as JSON
//! for programs; logs always go to stderr.

/// The shape of what a command lists or reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// Pretty JSON with a final newline, for `--output json`.
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("output serializes");
    text.push('\n');
    text
}
