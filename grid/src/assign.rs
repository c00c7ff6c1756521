//! Reading the assignments: where each instance runs now, and moves under way.
//!
//! An instance moving off a live host (drained, or crashing there) has two assignments for a
//! while: the new one, and the old one marked `leaving`, kept until the new copy is healthy so
//! that the job never serves with one instance fewer.

use std::collections::BTreeMap;

use schema::records::AssignRecord;
use schema::{HostId, Slot};

use crate::place::InstanceId;

/// Where each instance is assigned now: its assignment that is not leaving, or the leaving
/// one if that is all it has. Two that are not leaving (a hand edit): the first host by name.
pub fn current<'a>(
    assignments: impl IntoIterator<Item = (&'a Slot, &'a AssignRecord)>,
) -> BTreeMap<InstanceId, HostId> {
    let mut out: BTreeMap<InstanceId, (HostId, bool)> = BTreeMap::new();
    for (slot, record) in assignments {
        let id = (slot.service.clone(), slot.instance);
        match out.get(&id) {
            Some((_, false)) => {}
            Some((_, true)) if record.leaving => {}
            _ => {
                out.insert(id, (slot.host.clone(), record.leaving));
            }
        }
    }
    out.into_iter().map(|(id, (host, _))| (id, host)).collect()
}

/// Instances moving off a host: the host each one is leaving.
pub fn leaving<'a>(
    assignments: impl IntoIterator<Item = (&'a Slot, &'a AssignRecord)>,
) -> BTreeMap<InstanceId, HostId> {
    assignments
        .into_iter()
        .filter(|(_, r)| r.leaving)
        .map(|(s, _)| ((s.service.clone(), s.instance), s.host.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use schema::ServiceId;

    use super::*;

    fn slot(host: &str, instance: u32) -> Slot {
        Slot {
            host: HostId::new(host).unwrap(),
            service: "app/web".parse::<ServiceId>().unwrap(),
            instance,
        }
    }

    fn record(leaving: bool) -> AssignRecord {
        AssignRecord {
            v: 1,
            spec_digest: "d".into(),
            generation: 1,
            assigned_at: String::new(),
            leaving,
        }
    }

    #[test]
    fn a_moving_instance_is_where_it_goes_and_leaves_where_it_was() {
        let (a0, b0, a1) = (slot("a", 0), slot("b", 0), slot("a", 1));
        let (old, new) = (record(true), record(false));
        let all = [(&a0, &old), (&b0, &new), (&a1, &new)];
        let now = current(all);
        assert_eq!(now[&(a0.service.clone(), 0)], b0.host);
        assert_eq!(now[&(a1.service.clone(), 1)], a1.host);
        assert_eq!(
            leaving(all),
            BTreeMap::from([((a0.service.clone(), 0), a0.host.clone())])
        );
        // Only the leaving one left: it is still where the instance runs.
        let now = current([(&a0, &old)]);
        assert_eq!(now[&(a0.service.clone(), 0)], a0.host);
    }
}
