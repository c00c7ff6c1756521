//! viking's registrator: what Docker runs on this host becomes leased endpoint records in
//! etcd (`/viking/services/<stack>/<job>/<port>-<proto>/<instance>`), and stops being one
//! when it stops.
//!
//! * [`naming`]: a container's endpoints, a pure function of its Docker state (labels,
//!   `SERVICE_*` conventions, published or internal addresses, health).
//! * [`docker`]: the Docker edge (bollard): connect, list, inspect, events.
//! * [`sync`]: the etcd edge: read back, diff, write in transactions under the lease.
//! * [`agent`]: the loop that ties them together, and the one-shot reconciliation.
//! * [`daemon`]: the flags, their checks and the start-up shared by the binary and `viking up`.

pub mod agent;
pub mod daemon;
pub mod docker;
pub mod naming;
pub mod sync;

pub use agent::{Config, OnceError, once, run};
pub use daemon::{RegistratorArgs, StartError};
pub use naming::Settings;
