//! The grid: which host runs each instance of every job that is asked to run.
//!
//! [`place`] is the pure placement (constraints, capacity, spread, stability); [`scheduler`]
//! is the loop that one elected launcher runs: it follows etcd, places, and writes the
//! assignments, every write guarded by its leadership.

pub mod assign;
pub mod lost;
pub mod place;
pub mod rollback;
pub mod scheduler;

pub use place::{Host, HostState, InstanceId, Pending, Plan, place, place_avoiding};
