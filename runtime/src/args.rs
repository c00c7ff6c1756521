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

impl RangeArgs {
    /// The range to hand ports out from: refused below 1024, where this host's own services
    /// listen (DNS 53, SSH 22), and warned about where it overlaps the kernel's ephemeral ports
    /// (outgoing connections may hold one when an ambassador wants to bind it).
    pub fn for_allocation(&self) -> Result<PortRange, crate::Failure> {
        let range = self.range;
        if range.start < 1024 {
            return Err(crate::Failure::usage(format!(
                "--range {range} reaches below 1024, where system services listen (DNS 53, SSH \
                 22): an ambassador port there would collide with them; give a range from 1024 \
                 up, e.g. 20000-29999"
            )));
        }
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| {
                let mut it = t.split_whitespace().map(|n| n.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            })
            .unwrap_or((32768, 60999));
        if range.start <= ephemeral.1 && range.end >= ephemeral.0 {
            tracing::warn!(
                "--range {range} overlaps this host's ephemeral ports {}-{} \
                 (net.ipv4.ip_local_port_range): an outgoing connection may hold a port when an \
                 ambassador wants to bind it; keep the range below {}",
                ephemeral.0,
                ephemeral.1,
                ephemeral.0
            );
        }
        Ok(range)
    }
}

/// `--max-txn-ops`: etcd's limit on the operations (and, apart, the compares) of one
/// transaction. What belongs together is written in one, so a larger batch needs the server's
/// `--max-txn-ops` raised and this flag with it.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct TxnArgs {
    /// etcd's --max-txn-ops; raise it with the server's to write big batches in one transaction
    #[arg(
        long = "max-txn-ops",
        env = "VIKING_ETCD_MAX_TXN_OPS",
        default_value_t = schema::MAX_TXN_OPS,
        global = true
    )]
    pub max_txn_ops: usize,
}

/// `--run-dir`: where this host's viking processes keep their locks (one ambassador per bind
/// address).
#[derive(Debug, Clone, clap::Args)]
pub struct RunDirArgs {
    /// Where locks live (default: /run/viking for root, else $XDG_RUNTIME_DIR/viking)
    #[arg(
        long = "run-dir",
        env = "VIKING_RUN_DIR",
        value_name = "DIR",
        global = true
    )]
    pub run_dir: Option<std::path::PathBuf>,
}

impl RunDirArgs {
    /// `--run-dir`, or the default for this user.
    pub fn dir(&self) -> std::path::PathBuf {
        self.run_dir.clone().unwrap_or_else(default_run_dir)
    }
}

/// The run dir when none is given: `/run/viking` for root, else the user's runtime dir
/// (locks between processes of one user are all these are for).
pub fn default_run_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    // The owner of /proc/self is this process's effective user.
    let uid =
        std::fs::metadata("/proc/self").map_or(0, |m| std::os::unix::fs::MetadataExt::uid(&m));
    if uid == 0 {
        return PathBuf::from("/run/viking");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("viking"),
        None => std::env::temp_dir().join(format!("viking-{uid}")),
    }
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
