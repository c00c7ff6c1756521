//! The router against real etcd, real backends and real clients.
