//! Flags that several binaries take, defined once (`#[command(flatten)]`); the etcd flags are
//! [`crate::EtcdArgs`], `--host` is [`crate::HostArgs`].

use schema::PortRange;

use crate::output::Format;

/// `--range`: the ambassador ports of the cluster. portalloc and `viking` hand them out from
/// it, the ambassador serves nothing outside it.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RangeArgs {
    /// Ambassador ports, FIRST-LAST: handed out from it, and nothing outside it is served
    /// (keep it below the kernel's ephemeral range, 32768-60999 on Linux)
    #[arg(
        long = "range",
        env = "VIKING_PORT_RANGE",
        default_value_t = PortRange::DEFAULT,
        value_name = "FIRST-LAST",
        global = true
    )]
    pub range: PortRange,
}

/// `--output`: results as text for people or JSON for programs; logs always go to stderr.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// Output of results: text for people, json for programs (logs go to stderr)
    #[arg(
        long = "output",
        env = "VIKING_OUTPUT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub output: Format,
}
