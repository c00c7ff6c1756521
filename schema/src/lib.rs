//! The wire contract of viking (docs/contract.md) as code: names and their validation, service
//! ports, every etcd key (built and parsed), the JSON records stored under them, the job spec,
//! the container labels and names, docker-link env naming, and etcd's transaction limit.
//!
//! Pure: no tokio, no I/O. Every other crate depends on this one, and only this one formats
//! or parses key paths.

pub mod domain;
pub mod env;
pub mod job;
pub mod keys;
pub mod kv;
pub mod names;
pub mod range;
pub mod records;
pub mod service;

pub use domain::{DOMAIN_RULE, Domain, DomainError};
pub use job::{
    CommandSpec, JobKind, JobSpec, LinkPortSpec, LinkSpec, MAX_SCALE, Placement, PortSpec,
    Resources, Restart, UpdatePolicy, check_image, container_name, format_memory, is_env_name,
    labels, parse_cpus, parse_memory,
};
pub use keys::{DEFAULT_PREFIX, Dir, Instance, Key, KeyError, Prefix, Slot};
pub use kv::{Kv, MAX_TXN_OPS};
pub use names::{HostId, JobName, NameError, NameKind, StackName, check_member_addr};
pub use range::{PortRange, RangeError};
pub use service::{Proto, ServiceId, ServicePort, ServicePortError};
