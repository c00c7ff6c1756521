//! The one way tests run a program as a daemon, and the one way they wait for something.
//!
//! [`Daemon`] starts a program with its stdout and stderr in a log file of its own, waits for
//! a log line, stops it with SIGTERM (checking that it exits in time) and kills it in `Drop`,
//! also when the test fails. [`eventually`] and [`eventually_async`] poll a condition within
//! a time budget and fail with what they waited for.

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How often the helpers poll.
const POLL: Duration = Duration::from_millis(10);

/// A program run by a test; killed (SIGKILL) on drop if still running.
pub struct Daemon {
    name: String,
    command: Command,
    child: Option<Child>,
    dir: TempDir,
    runs: u32,
}

impl Daemon {
    /// Runs `program` with `args`, the caller's `VIKING_*` environment removed (the test sees
    /// only what it passes) and plain logs.
    pub fn spawn<S: AsRef<OsStr>>(program: impl AsRef<Path>, args: &[S]) -> Daemon {
        let mut command = Command::new(program.as_ref());
        command.args(args);
        let name = program.as_ref().file_name().map_or_else(
            || "program".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        Self::spawn_command(&name, command)
    }

    /// Runs a prepared command (e.g. one that enters a network namespace first), called
    /// `name` in failures; the `VIKING_*` environment is removed the same way, and the logs
    /// made plain.
    pub fn spawn_command(name: &str, mut command: Command) -> Daemon {
        for (k, _) in std::env::vars() {
            if k.starts_with("VIKING_") {
                command.env_remove(k);
            }
        }
        command.env("VIKING_LOG_FORMAT", "plain");
        let mut daemon = Daemon {
            name: name.to_owned(),
            command,
            child: None,
            dir: tempfile::tempdir().expect("temp dir for a daemon's log"),
            runs: 0,
        };
        daemon.start();
        daemon
    }

    /// Starts it again (after [`Daemon::kill`] or [`Daemon::terminate`]), with a new log.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).expect("daemon log file");
        let child = self
            .command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("run{}.log", self.runs))
    }

    /// The log (stdout and stderr) of the current run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the log of this run holds `needle` and returns the first line with it;
    /// fails after `budget` with the log, or at once when the program exits first.
    pub fn wait_log(&mut self, needle: &str, budget: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                start.elapsed() < budget,
                "{} did not log {needle:?} within {budget:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("wait")
    }

    /// Sends `signal` to the running process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
    }

    /// SIGTERM, then waits up to `budget` for it to exit; fails (and kills it) if it does not.
    pub fn terminate(&mut self, budget: Duration) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(budget)
    }

    /// Waits up to `budget` for it to exit by itself; fails (and kills it) if it does not.
    pub fn wait_exit(&mut self, budget: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return status;
            }
            if start.elapsed() > budget {
                self.kill();
                panic!(
                    "{} did not exit within {budget:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL, then a new run with a new log: a crash and a supervisor's restart.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// SIGKILL: no chance to clean up, as when a host dies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a check of [`eventually`] says: `Some`/`Ok` when it holds; `None`, or `Err` with
/// what it saw instead (shown when the budget runs out), when not yet.
pub trait Check {
    type Value;
    fn outcome(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Check for Option<T> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T> Check for Result<T, String> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.map_err(Some)
    }
}

fn give_up(what: &str, budget: Duration, last: Option<String>) -> ! {
    match last {
        Some(seen) => panic!("{what}: not within {budget:?}; last seen: {seen}"),
        None => panic!("{what}: not within {budget:?}"),
    }
}

/// Polls `check` until it holds and returns its value; fails after `budget` with `what` was
/// awaited and what the last check saw.
pub fn eventually<C: Check>(
    budget: Duration,
    what: &str,
    mut check: impl FnMut() -> C,
) -> C::Value {
    let start = Instant::now();
    loop {
        match check().outcome() {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= budget => give_up(what, budget, last),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// [`eventually`] for a check that awaits (reads etcd, say).
pub async fn eventually_async<C, F, Fut>(budget: Duration, what: &str, mut check: F) -> C::Value
where
    C: Check,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    let start = Instant::now();
    loop {
        match check().await.outcome() {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= budget => give_up(what, budget, last),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_is_waited_for_by_its_log_and_stops_on_sigterm() {
        let mut d = Daemon::spawn(
            "sh",
            &[
                "-c",
                "echo ready; trap 'exit 3' TERM; while :; do sleep 0.01; done",
            ],
        );
        d.wait_log("ready", Duration::from_secs(10));
        let status = d.terminate(Duration::from_secs(10));
        assert_eq!(status.code(), Some(3));
        d.start();
        d.wait_log("ready", Duration::from_secs(10));
    }

    #[test]
    #[should_panic(expected = "exited")]
    fn waiting_for_a_line_fails_at_once_when_the_program_exits() {
        let mut d = Daemon::spawn("sh", &["-c", "echo other"]);
        d.wait_log("never", Duration::from_secs(10));
    }

    #[test]
    fn eventually_returns_the_value_and_fails_with_what_it_waited_for() {
        let mut n = 0;
        assert_eq!(
            eventually(Duration::from_secs(5), "three polls", || {
                n += 1;
                (n == 3).then_some(n)
            }),
            3
        );
        let failed = std::panic::catch_unwind(|| {
            eventually(Duration::from_millis(30), "the moon", || None::<()>)
        });
        let message = failed.unwrap_err();
        let text = message.downcast_ref::<String>().unwrap();
        assert!(text.contains("the moon: not within"), "{text}");
        let failed = std::panic::catch_unwind(|| {
            eventually(Duration::from_millis(30), "the sun", || {
                Err::<(), _>("clouds".to_owned())
            })
        });
        let message = failed.unwrap_err();
        let text = message.downcast_ref::<String>().unwrap();
        assert!(text.ends_with("last seen: clouds"), "{text}");
    }
}
