//! A cgroup (v2) of a test's own, for programs attached to a cgroup: processes started in it
//! with [`Cgroup::command`]; on Drop every process left in it is killed and the directory
//! removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `viking-test-<name>-<pid>` under the cgroup v2 mount. Needs root.
    pub fn new(name: &str) -> Cgroup {
        let root = sockmap::balance::cgroup2_mount()
            .expect("no cgroup v2 hierarchy in /proc/self/mounts (tests need one)");
        let path = root.join(format!("viking-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e} (tests run as root)", path.display()));
        Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program`, to be given its arguments, that moves itself into this cgroup before it
    /// starts (a shell writes its own pid into `cgroup.procs`, then execs it).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                self.path.display()
            ))
            .arg("sh")
            .arg(program);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}
