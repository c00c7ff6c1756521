//! HQ: stack files become deployment config in etcd (the `viking` command).
//!
//! * [`stackfile`]: the stack-file format, parsed strictly with `file:line:column` errors.
//! * [`compile`]: pure: links resolved, jobs ordered, docker-link env built.
//! * [`deploy`]: pure: a deploy's writes, the guards of its one transaction, its report.
//! * [`store`]: the etcd edge: allocate ports, write a deployment in one transaction.
//! * [`folder`]: the design notes' hand-editable deployment folder (`export`, `apply`).
//! * [`launch`]: `viking run`/`stop`/`scale`/`logs`: a stack's containers on the local Docker.
//! * [`output`]: typed rows of the listings, as text tables or JSON.
//! * [`up`]: `viking up`: etcd, the ambassador and the registrator in one process.
//! * [`web`]: `viking routes` and `viking cert`: the router's routes and certificates.
//! * [`ui`]: `viking ui`: the cluster on one live page.

pub mod compile;
pub mod deploy;
pub mod folder;
pub mod grid;
pub mod launch;
pub mod output;
pub mod stackfile;
pub mod store;
pub mod ui;
pub mod up;
pub mod web;

pub use compile::{
    ClusterView, CompileError, Deployment, JobSpec, compile, required_service_ports,
};
pub use stackfile::{ParseError, StackFile};
pub use store::{HqError, Store};
