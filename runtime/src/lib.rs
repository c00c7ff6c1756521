//! Shared plumbing for viking's daemons and commands.
//!
//! * [`etcd`]: connection settings (every flag with a `VIKING_*` env twin) and error
//!   classification (retry or give up).
//! * [`watch`]: a prefix watcher that lists, watches from the listed revision, resumes after a
//!   disconnect and re-lists after a compaction.
//! * [`members`]: keeps a daemon's requests off etcd members that do not answer.
//! * [`lease`]: a lease keeper that grants, keeps alive, re-grants and tells its owner.
//! * [`admin`]: the daemons' admin server (`/metrics`, `/healthz`, `/state`) on hyper.
//! * [`args`]: `--range`, `--run-dir` and `--output`, defined once for every binary that takes them.
//! * [`backoff`]: exponential backoff with jitter.
//! * [`handover`]: listening sockets passed to a successor (`--upgrade`), systemd readiness.
//! * [`host`]: this host's id and addresses, and RFC 3339 time.
//! * [`telemetry`]: tracing set-up, plain or JSON.
//! * [`shutdown`]: SIGTERM/SIGINT -> a `CancellationToken`.
//! * [`output`]: `--output text|json`, the same in every binary.
//! * [`process`]: one set-up for every binary: logs, runtime, exit status, error printing.

pub mod accept;
pub mod admin;
pub mod args;
pub mod backoff;
pub mod docker;
pub mod etcd;
pub mod handover;
pub mod host;
pub mod lease;
pub mod members;
pub mod output;
pub mod process;
pub mod shutdown;
pub mod telemetry;
pub mod watch;

pub use args::{OutputArgs, RangeArgs, RunDirArgs, TxnArgs};
pub use backoff::{Backoff, sleep_until};
pub use etcd::{EtcdArgs, EtcdError};
pub use host::HostArgs;
pub use process::{Failure, Fatal};
pub use tokio_util::sync::CancellationToken;
