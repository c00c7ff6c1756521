//! The runtime plumbing against a real etcd.

mod lease;
mod watch;
