//! One ambassador per bind address and network namespace. Listening sockets of one user on
//! the same address and port join one SO_REUSEPORT group, so a second ambassador (say one of
//! `viking up` beside a systemd one) would silently take a share of the other's connections
//! and send them to its own cluster's backends. Before it binds anything, an ambassador takes
//! an exclusive lock on a file named after its bind address and namespace under the run dir;
//! the lock goes with the process, however it ends.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::daemon::StartError;

/// Held while the ambassador runs.
#[derive(Debug)]
pub struct BindLock {
    _lock: Flock<File>,
}

impl BindLock {
    /// The locked file, to hand to a successor.
    pub fn file(&self) -> &File {
        &self._lock
    }
}

/// This network namespace's id, as `/proc/self/ns/net` names it (`net:[4026531840]`).
fn netns_id() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| {
            let text = l.to_string_lossy().into_owned();
            let digits: String = text.chars().filter(char::is_ascii_digit).collect();
            (!digits.is_empty()).then_some(digits)
        })
        .unwrap_or_else(|| "0".to_owned())
}

/// The name of the ambassador of `bind` in this namespace, for its files under the run dir.
pub fn name(bind: IpAddr) -> String {
    format!("ambassador-{bind}-net{}", netns_id())
}

/// The lock file of `bind` in this namespace.
pub fn path(run_dir: &Path, bind: IpAddr) -> PathBuf {
    run_dir.join(format!("{}.lock", name(bind)))
}

/// Takes the lock of `bind`, or says which ambassador holds it.
pub fn take(run_dir: &Path, bind: IpAddr, admin: SocketAddr) -> Result<BindLock, StartError> {
    take_from(run_dir, bind, admin, None)
}

/// [`take`], or with `inherited` the lock a predecessor handed over: the same open file, so
/// the lock is already this process's too (flock belongs to the open file, not the process).
pub fn take_from(
    run_dir: &Path,
    bind: IpAddr,
    admin: SocketAddr,
    inherited: Option<File>,
) -> Result<BindLock, StartError> {
    let dir_error = |error| StartError::RunDir {
        dir: run_dir.to_owned(),
        error,
    };
    std::fs::create_dir_all(run_dir).map_err(dir_error)?;
    let path = path(run_dir, bind);
    let file = match inherited {
        Some(file) => file,
        None => File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(dir_error)?,
    };
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StartError::BindTaken {
                bind,
                holder: if holder.is_empty() {
                    "another ambassador".to_owned()
                } else {
                    holder.to_owned()
                },
                path,
            });
        }
    };
    // Who holds it, for the one that is refused.
    let me = format!(
        "the ambassador with pid {} and admin {admin}",
        std::process::id()
    );
    let written = lock
        .set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(me.as_bytes()));
    written.map_err(dir_error)?;
    Ok(BindLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_bind_address_names_the_holder_and_another_address_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let bind: IpAddr = "127.0.0.1".parse().unwrap();
        let admin: SocketAddr = "127.0.0.1:9181".parse().unwrap();
        let first = take(dir.path(), bind, admin).unwrap();
        let err = take(dir.path(), bind, "127.0.0.1:9183".parse().unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())) && text.contains("9181"),
            "{text}"
        );
        assert!(take(dir.path(), "127.0.0.2".parse().unwrap(), admin).is_ok());
        drop(first);
        assert!(
            take(dir.path(), bind, admin).is_ok(),
            "free again once dropped"
        );
    }
}
