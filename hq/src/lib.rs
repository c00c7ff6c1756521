//! HQ: stack files become deployment config in etcd (the `viking` command).
//!
//! * [`stackfile`]: the stack-file format, parsed strictly with `file:line:column` errors.
//! * [`compile`]: pure: links resolved, jobs ordered, docker-link env built.
//! * [`store`]: the etcd edge: allocate ports, write a deployment in one transaction.
//! * [`folder`]: the design notes' hand-editable deployment folder (`export`, `apply`).
//! * [`launch`]: `viking run`/`stop`/`scale`/`logs`: a stack's containers on the local Docker.
//! * [`up`]: `viking up`: etcd, the ambassador and the registrator in one process.

pub mod compile;
pub mod folder;
pub mod launch;
pub mod stackfile;
pub mod store;
pub mod up;

pub use compile::{
    ClusterView, CompileError, Deployment, JobSpec, compile, required_service_ports,
};
pub use stackfile::{ParseError, StackFile};
pub use store::{HqError, Store};
