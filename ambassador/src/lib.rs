//! The ambassador: viking's per-host TCP proxy.
//!
//! It listens on one cluster-wide port per allocated TCP service port (`ports/alloc/`) and
//! forwards each connection to a live backend of that service port (`services/`), on any
//! host, learning both from etcd as they change.
//!
//! * [`routes`]: the table and backend choice (two random choices, fewer active connections
//!   wins; ejection after consecutive connect failures, with exponential return).
//! * [`relay`]: the data path: copying for small exchanges, `splice()` once a direction
//!   carries bulk; half-close both ways; idle timeout.
//! * [`daemon`]: the `ambassador` flags, their checks and the one start-up that both the
//!   binary and `viking up` use.
//! * [`config`]: the settings the library takes.
//! * [`server`]: the shared state, etcd into routes and DNS zone, graceful shutdown.
//! * [`listeners`], [`workers`], [`connection`]: listening sockets and accept loops, the
//!   worker threads, one proxied connection.
//! * [`access`]: link-scoped access: who may connect to which service.
//! * [`metrics`]: every counter, once, read by `/metrics` and `/state`.
//! * [`steer`]: which threads take new connections.
//! * [`udp`]: UDP service ports: a session per client address.
//! * [`udp_kernel`]: `--udp-kernel`, UDP service ports balanced by the kernel as a socket sends.
//! * [`stats`]: the `stats/<host>` record for the UI.
//! * [`lock`]: one ambassador per bind address.
//! * [`admin`]: `/metrics`, `/healthz`, `/state`.
//! * [`dns`]: the service DNS.

pub mod access;
pub mod admin;
pub mod config;
mod connection;
pub mod daemon;
pub mod dns;
mod kernel;
mod listeners;
pub mod lock;
pub mod metrics;
pub mod relay;
pub mod routes;
pub mod server;
pub mod stats;
pub mod steer;
pub mod udp;
mod udp_batch;
pub mod udp_kernel;
mod workers;

pub use config::Config;
pub use daemon::{AmbassadorArgs, Running, StartError};
/// How often the kernel path reads a live connection's byte counts.
pub use kernel::COUNT_EVERY as KERNEL_COUNT_EVERY;
pub use relay::RelayConfig;
pub use server::{Shared, ShutdownReport, run};
