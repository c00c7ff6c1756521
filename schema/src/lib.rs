//! The wire contract of viking (DESIGN.md) as code: names and their validation, service ports,
//! every etcd key (built and parsed), the JSON records stored under them, and docker-link env
//! naming.
//!
//! Pure: no tokio, no I/O. Every other crate depends on this one, and only this one formats
//! or parses key paths.

pub mod env;
pub mod keys;
pub mod names;
pub mod records;
pub mod service;

pub use keys::{DEFAULT_PREFIX, Dir, Instance, Key, KeyError, Prefix};
pub use names::{HostId, JobName, NameError, NameKind, StackName};
pub use service::{Proto, ServiceId, ServicePort, ServicePortError};
