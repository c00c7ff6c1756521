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
//! * [`server`]: etcd sync, listeners, connections, graceful shutdown, metrics.
//! * [`admin`]: `/metrics`, `/healthz`, `/state`.

pub mod admin;
pub mod dns;
pub mod relay;
pub mod routes;
pub mod server;
pub mod steer;

pub use relay::RelayConfig;
pub use server::{Config, Shared, ShutdownReport, run};
