//! One process set-up for every binary: logs, the tokio runtime, and how an error ends the
//! process (its exit status, and its message with every cause, as JSON when logs are).
//!
//! Exit status, the same for every viking binary:
//!
//! * 0: done, or stopped by SIGTERM/SIGINT;
//! * 1: failed while working (etcd, Docker or nft refused or failed); the cause is printed;
//! * 2: bad usage, or a setting this host cannot honour (a busy port, a missing interface):
//!   refused before anything was changed;
//! * 130: a second SIGTERM/SIGINT, which exits at once ([`crate::shutdown`]).

use std::error::Error;
use std::future::Future;
use std::process::ExitCode;

use crate::telemetry::{self, LogFormat};

/// Failed while working.
pub const FAILURE: u8 = 1;
/// Bad usage or a setting that cannot be honoured; nothing was changed.
pub const USAGE: u8 = 2;
/// A second SIGTERM or SIGINT.
pub const INTERRUPTED: u8 = 130;

/// The exit-status paragraph of every binary's `--help` (`after_help`).
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 done (or stopped by SIGTERM/SIGINT); \
1 failed while working (the cause is printed); 2 bad usage or a setting this host cannot \
honour, nothing changed; 130 a second SIGTERM/SIGINT.";

/// An error that knows the exit status it ends a process with.
pub trait Fatal: Error + Send + Sync + 'static {
    fn exit_code(&self) -> u8;
}

/// What ends a process: an exit status and the error, with its causes.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: Box<dyn Error + Send + Sync>,
}

impl Failure {
    /// Bad usage (exit 2), with a message that says what to do.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }

    /// A failure while working (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FAILURE, message)
    }

    pub fn new(code: u8, message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self {
            code,
            error: message.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.code
    }

    /// The message with every cause, `outer: inner: innermost`.
    pub fn message(&self) -> String {
        with_causes(self.error.as_ref())
    }
}

impl<E: Fatal> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: error.exit_code(),
            error: Box::new(error),
        }
    }
}

/// `error` and its sources joined by `: `, leaving out a source whose text the message
/// already holds (thiserror messages often quote their source).
pub fn with_causes(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// Prints why `program` stops: `program: message` on stderr, or one JSON log line when
/// `VIKING_LOG_FORMAT=json` (the subscriber is set up by then).
pub fn report(program: &str, failure: &Failure) {
    let message = failure.message();
    match LogFormat::from_env() {
        LogFormat::Json => {
            tracing::error!(program, exit_code = failure.code, "{message}");
        }
        LogFormat::Plain => eprintln!("{program}: {message}"),
    }
}

/// The whole life of a binary: logs to stderr (`default_filter` unless `RUST_LOG` says
/// otherwise), `body` on a single-threaded tokio runtime, its error printed with its causes
/// and turned into the exit status.
pub fn main<F>(program: &str, default_filter: &str, body: F) -> ExitCode
where
    F: Future<Output = Result<(), Failure>>,
{
    main_on(program, default_filter, 1, body)
}

/// [`main`] on `threads` runtime threads (one: the single-threaded runtime), for a daemon
/// whose every task may run on any of them.
pub fn main_on<F>(program: &str, default_filter: &str, threads: usize, body: F) -> ExitCode
where
    F: Future<Output = Result<(), Failure>>,
{
    telemetry::init(default_filter);
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let result = builder
        .enable_all()
        .build()
        .map_err(|e| Failure::failed(format!("cannot start the tokio runtime: {e}")))
        .and_then(|rt| rt.block_on(body));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            report(program, &failure);
            ExitCode::from(failure.code)
        }
    }
}

/// The flag every binary answers with its man page: `PROGRAM --man-page` prints the page
/// (roff, from the same `clap` definition as `--help`) and exits; `make install` installs what
/// it prints. Call first thing in `main`, before parsing (it needs no other argument).
pub const MAN_PAGE_FLAG: &str = "--man-page";

/// Prints the man page of `C` and exits when the only argument is [`MAN_PAGE_FLAG`].
pub fn man_page<C: clap::CommandFactory>() {
    let mut args = std::env::args_os().skip(1);
    if let (Some(flag), None) = (args.next(), args.next())
        && flag == MAN_PAGE_FLAG
    {
        let mut out = std::io::stdout().lock();
        let code = match clap_mangen::Man::new(C::command()).render(&mut out) {
            Ok(()) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => {
                eprintln!("cannot write the man page: {e}");
                1
            }
        };
        std::process::exit(code);
    }
}

/// Raises the soft limit of open files to the hard one (as most servers do: the soft default
/// of 1024 is for programs that do not expect many); returns the limit now in force.
pub fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    Some(
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            hard
        } else {
            soft
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    impl Fatal for Outer {
        fn exit_code(&self) -> u8 {
            USAGE
        }
    }

    #[test]
    fn a_failure_keeps_the_errors_exit_status_and_prints_every_cause_once() {
        let failure = Failure::from(Outer {
            path: "x.yml",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
        assert_eq!(failure.exit_code(), USAGE);
        assert_eq!(failure.message(), "cannot read x.yml: no such file");
    }

    #[test]
    fn a_cause_already_quoted_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot listen on 1.2.3.4:5: {source}; pick another")]
        struct Quoting {
            source: std::io::Error,
        }
        let e = Quoting {
            source: std::io::Error::other("address in use"),
        };
        assert_eq!(
            with_causes(&e),
            "cannot listen on 1.2.3.4:5: address in use; pick another"
        );
    }

    #[test]
    fn usage_and_failed_carry_2_and_1() {
        assert_eq!(Failure::usage("x").exit_code(), 2);
        assert_eq!(Failure::failed("x").exit_code(), 1);
        assert_eq!(Failure::failed("x").message(), "x");
    }
}
