//! The ambassador's sockets by name, for an upgrade (`runtime::handover`): what this process
//! offers its successor (copies of every listening socket, made as each is opened and dropped
//! as each is closed), and what it inherited from its predecessor (taken as each is needed).
//!
//! Names: `tcp/<port>/<thread>`, `udp/<port>/<thread>`, `dns/udp`, `dns/tcp`, `admin`, `lock`.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use tracing::debug;

#[derive(Default)]
pub struct Sockets {
    offered: Mutex<BTreeMap<String, OwnedFd>>,
    inherited: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Sockets {
    /// Sockets received from the predecessor.
    pub fn inheriting(fds: BTreeMap<String, OwnedFd>) -> Sockets {
        Sockets {
            offered: Mutex::default(),
            inherited: Mutex::new(fds),
        }
    }

    /// Whether this process was started to take over (and has not used everything yet).
    pub fn is_inheriting(&self) -> bool {
        !self.inherited.lock().expect("sockets lock").is_empty()
    }

    /// Offers a copy of `socket` under `name` to a successor.
    pub fn offer(&self, name: String, socket: &impl AsFd) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(copy) => {
                self.offered
                    .lock()
                    .expect("sockets lock")
                    .insert(name, copy);
            }
            // Without the copy an upgrade binds this socket anew: slower, never wrong.
            Err(e) => debug!(name, "cannot keep a copy of a socket for an upgrade: {e}"),
        }
    }

    /// Stops offering every socket whose name starts with `prefix` (it is being closed).
    pub fn withdraw(&self, prefix: &str) {
        self.offered
            .lock()
            .expect("sockets lock")
            .retain(|name, _| !name.starts_with(prefix));
    }

    /// The inherited socket `name`, if there is one.
    pub fn inherit(&self, name: &str) -> Option<OwnedFd> {
        self.inherited.lock().expect("sockets lock").remove(name)
    }

    /// All of `names`, or none (a port is served by all threads' sockets or bound anew).
    pub fn inherit_all(&self, names: &[String]) -> Option<Vec<OwnedFd>> {
        let mut inherited = self.inherited.lock().expect("sockets lock");
        if !names.iter().all(|n| inherited.contains_key(n)) {
            return None;
        }
        Some(names.iter().filter_map(|n| inherited.remove(n)).collect())
    }

    /// Closes the inherited service sockets not used (of ports released meanwhile); returns
    /// their names.
    pub fn drop_inherited(&self) -> Vec<String> {
        let mut inherited = self.inherited.lock().expect("sockets lock");
        let names: Vec<String> = inherited
            .keys()
            .filter(|n| n.starts_with("tcp/") || n.starts_with("udp/"))
            .cloned()
            .collect();
        for name in &names {
            inherited.remove(name);
        }
        names
    }

    /// Copies of everything offered now, for a successor.
    pub fn listing(&self) -> Vec<(String, OwnedFd)> {
        self.offered
            .lock()
            .expect("sockets lock")
            .iter()
            .filter_map(|(name, fd)| fd.try_clone().ok().map(|fd| (name.clone(), fd)))
            .collect()
    }
}
