//! The router: HTTP and HTTPS from the internet to web jobs, by domain.
//!
//! It follows `routes/` (written by `viking deploy` from each job's `domains`), `services/`
//! (the live endpoints) and `certs/` in etcd, and serves `--http` and `--https`:
//!
//! * [`table`]: domain -> route -> backends (exact name, then the longest wildcard); backends
//!   chosen and ejected by the ambassador's own code (`ambassador::routes`).
//! * [`h1`]: HTTP/1.1 without hyper, the path almost every request takes.
//! * [`client`]: a client's socket in clear, in tokio's reactor only once it has to wait.
//! * [`proxy`]: one request through hyper (HTTP/2, and what `h1` hands over: WebSocket,
//!   `Expect`, HTTP/1.0): forwarding headers, retries, the router's own answers.
//! * [`plain`]: a request hyper serves without body, over a plain backend connection.
//! * [`park`]: idle keep-alive connections held without a task.
//! * [`pool`]: keep-alive connections to backends.
//! * [`batch`]: an HTTP/2 connection's writes gathered over a turn of its task.
//! * [`tls`]: certificates by SNI, from `--certs` and etcd, swapped without dropping anything.
//! * [`server`]: listeners, limits, PROXY protocol, graceful shutdown.
//! * [`state`]: etcd into the table and the certificates.
//! * [`metrics`], [`admin`]: `/metrics`, `/healthz`, `/state`.
//! * [`daemon`]: the flags and the one start-up that `router` and `viking up --router` share.

pub mod admin;
pub mod batch;
pub mod client;
pub mod daemon;
pub mod h1;
pub mod metrics;
pub mod park;
pub mod plain;
pub mod pool;
pub mod proxy;
pub mod quiet;
pub mod server;
pub mod stall;
pub mod state;
pub mod table;
pub mod tls;

pub use daemon::{RouterArgs, StartError};
