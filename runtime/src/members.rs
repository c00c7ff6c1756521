//! Keeps a daemon's etcd requests off members that do not answer.
//!
//! etcd-client spreads requests over its endpoints at random and goes on picking a member that
//! is down: each request sent there fails at once. With one member of three stopped, 49 of 200
//! reads in a row failed (`tests/integration/members.rs` without this task), and a
//! registration, a read and a write in a row, could miss for ten seconds of retries. The Go
//! client's balancer skips such members; this task does the same from outside: every
//! [`INTERVAL`] it asks each member for its status over a connection of its own, takes a
//! member that does not answer in time (or answers without a leader) out of the client's list,
//! and puts it back once it answers again. The list never goes empty: when no member answers, all are in it, so
//! requests go on trying and their errors name every endpoint.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::EtcdArgs;

/// How often every member is asked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Starts following the members of `args` for `client` until `shutdown`; nothing to follow
/// with a single endpoint.
pub fn spawn(args: &EtcdArgs, client: &Client, shutdown: CancellationToken) {
    let tls = args.ca.is_some() || args.cert.is_some();
    let endpoints: Vec<Member> = args
        .endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(|e| Member::new(args, e, tls))
        .collect();
    if endpoints.len() >= 2 {
        tokio::spawn(follow(endpoints, client.clone(), shutdown));
    }
}

/// One endpoint and the connection its status is asked over.
struct Member {
    /// The URL as etcd-client keys its balancer: with the scheme it adds to a bare host:port.
    url: String,
    args: EtcdArgs,
    probe: Option<Client>,
}

impl Member {
    fn new(args: &EtcdArgs, endpoint: &str, tls: bool) -> Self {
        let url = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            endpoint.to_owned()
        } else if tls {
            format!("https://{endpoint}")
        } else {
            format!("http://{endpoint}")
        };
        let mut args = args.clone();
        args.endpoints = vec![endpoint.to_owned()];
        args.timeout = args.timeout.min(INTERVAL);
        Self {
            url,
            args,
            probe: None,
        }
    }

    /// True when the member answers within the timeout and knows a leader.
    async fn answers(&mut self) -> bool {
        let timeout = self.args.timeout;
        let asked = async {
            if self.probe.is_none() {
                // Lazy without credentials; with them, connecting asks for a token, so a
                // member that is down fails here and is connected again next time.
                self.probe = Some(self.args.connect().await.ok()?);
            }
            let probe = self.probe.as_mut()?;
            probe.status().await.ok()
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(Some(status)) => status.leader() != 0,
            _ => false,
        }
    }
}

async fn follow(mut members: Vec<Member>, client: Client, shutdown: CancellationToken) {
    let all: BTreeSet<String> = members.iter().map(|m| m.url.clone()).collect();
    let mut listed = all.clone();
    loop {
        let answers = futures_util::future::join_all(members.iter_mut().map(Member::answers)).await;
        let live: BTreeSet<String> = members
            .iter()
            .zip(answers)
            .filter(|(_, ok)| *ok)
            .map(|(m, _)| m.url.clone())
            .collect();
        let wanted = if live.is_empty() { &all } else { &live };
        if live.is_empty() && listed != all {
            warn!("no etcd member answers; sending requests to all of them");
        }
        for url in listed.difference(wanted) {
            if client.remove_endpoint(url).await.is_err() {
                debug!("the client is gone; stop following etcd members");
                return;
            }
            warn!(member = %url, "etcd member does not answer; sending requests to the others");
        }
        for url in wanted.difference(&listed) {
            if client.add_endpoint(url).await.is_err() {
                debug!("the client is gone; stop following etcd members");
                return;
            }
            if !live.is_empty() {
                info!(member = %url, "etcd member answers again; sending it requests");
            }
        }
        listed.clone_from(wanted);
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
