//! The launcher: every host runs one. It publishes what the host offers (`grid/nodes/<host>`),
//! follows what the grid assigned to this host (`grid/assign/<host>/`), converges Docker to it,
//! and reports each instance (`grid/status/<host>/...`), all under its lease. Every launcher
//! also campaigns to be the scheduler (`grid::scheduler`).
//!
//! `converge` is pure (what to start, restart, replace and remove); `engine` is the container
//! runtime behind a trait (Docker here; a stand-in for simulations); `agent` is the loop;
//! `capacity` reads what the host has; `withdraw` takes a container out of service before it
//! is stopped; `daemon` is the flags and the start-up.

pub mod agent;
pub mod capacity;
pub mod converge;
pub mod daemon;
pub mod engine;
pub mod withdraw;

pub use agent::Config;
pub use daemon::{LauncherArgs, StartError};
pub use engine::{DockerEngine, Engine, Existing, RunState};
