//! locknet: the nftables host firewall that admits only the cluster.
//!
//! * [`policy`]: what is admitted (members, open ports, filtered interfaces), parsed strictly.
//! * [`render`]: the ruleset as text, a pure function of the policy (snapshot-tested).
//! * [`nft`]: the edge: `nft -f -` in, `nft -j list` out.
//! * [`watch`]: members followed live from `/viking/hosts/` in etcd, with safe apply.

pub mod nft;
pub mod policy;
pub mod render;
pub mod watch;

use nft::{Applied, NftError};
use policy::Policy;

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The table already said exactly this.
    Unchanged,
    /// Same rules; member set elements added and removed.
    Members { added: usize, removed: usize },
    /// The table was created or replaced as a whole.
    Replaced,
}

/// The script that turns `current` into `policy`, or `None` if there is nothing to do.
pub fn plan(policy: &Policy, current: Option<&Applied>) -> Option<(String, Outcome)> {
    match current {
        Some(a) if a.drop_comment == render::drop_comment(policy) => {
            let script = render::members_change(&a.members, &policy.members);
            if script.is_empty() {
                return None;
            }
            let added = policy.members.difference(&a.members).count();
            let removed = a.members.difference(&policy.members).count();
            Some((script, Outcome::Members { added, removed }))
        }
        _ => Some((render::render(policy), Outcome::Replaced)),
    }
}

/// Makes the kernel's table say `policy`, in one transaction (reads the table first).
pub fn apply(policy: &Policy) -> Result<Outcome, NftError> {
    Firewall::default().apply(policy)
}

/// locknet's table as this process last read or wrote it, so that a membership change costs
/// one `nft -f` of element adds and deletes, not a read-back of every member first. Anything
/// that fails makes it read again.
#[derive(Debug, Default)]
pub struct Firewall {
    /// `None`: unknown, read before the next plan. `Some(None)`: there is no table.
    known: Option<Option<Applied>>,
}

impl Firewall {
    /// The script that turns the table into `policy`; `None` if it already is.
    pub fn plan(&mut self, policy: &Policy) -> Result<Option<(String, Outcome)>, NftError> {
        if self.known.is_none() {
            self.known = Some(nft::read()?);
        }
        let current = self.known.as_ref().and_then(Option::as_ref);
        Ok(plan(policy, current))
    }

    /// Runs `script`; afterwards the table is `after` (or unknown, if `None`).
    pub fn run(&mut self, script: &str, after: Option<&Policy>) -> Result<(), NftError> {
        self.known = None;
        nft::run(script)?;
        self.known = after.map(|p| {
            Some(Applied {
                members: p.members.clone(),
                drop_comment: render::drop_comment(p),
                ..Applied::default()
            })
        });
        Ok(())
    }

    /// Reads the kernel's table again and says whether it differs from what this process
    /// applied (gone, or other members or rules): someone flushed or edited it. What was read
    /// is what the next plan starts from.
    pub fn refresh(&mut self) -> Result<bool, NftError> {
        let now = nft::read()?;
        let same =
            |a: &Applied, b: &Applied| a.members == b.members && a.drop_comment == b.drop_comment;
        let drifted = match (self.known.as_ref(), now.as_ref()) {
            (None, _) => false,
            (Some(None), None) => false,
            (Some(Some(known)), Some(now)) => !same(known, now),
            (Some(_), _) => true,
        };
        self.known = Some(now);
        Ok(drifted)
    }

    /// What the table held before the last plan, if known: for undoing a membership change.
    pub fn members(&self) -> Option<&std::collections::BTreeSet<std::net::IpAddr>> {
        self.known.as_ref()?.as_ref().map(|a| &a.members)
    }

    pub fn apply(&mut self, policy: &Policy) -> Result<Outcome, NftError> {
        match self.plan(policy)? {
            None => Ok(Outcome::Unchanged),
            Some((script, outcome)) => {
                self.run(&script, Some(policy))?;
                Ok(outcome)
            }
        }
    }
}
