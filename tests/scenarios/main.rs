//! Scenarios across viking's parts, against real etcd.

mod allocations_are_watched;
mod many_hosts;
mod startup;
