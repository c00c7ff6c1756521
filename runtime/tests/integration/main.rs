//! The runtime plumbing against a real etcd.

mod lease;
mod members;
mod watch;
