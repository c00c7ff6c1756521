//! Lost hosts: how long the scheduler waits before it places a lost host's instances
//! elsewhere, and how that grows for a host that flaps. Pure; the scheduler keeps the records
//! in etcd (`grid/lost/<host>`), so a new leader carries on with the same deadlines.
//!
//! The first loss waits `reschedule_after`; each further loss without an hour of good health
//! in between waits twice as long as the one before, up to ten minutes.

use std::time::{Duration, SystemTime};

use runtime::host::{parse_rfc3339, rfc3339};
use schema::HostId;
use schema::records::{LostRecord, RECORD_VERSION};

/// The longest wait, however often a host flaps.
pub const MAX_DELAY: Duration = Duration::from_secs(600);
/// Good health after which a host's losses are forgotten.
pub const HEALTHY_RESET: Duration = Duration::from_secs(3600);

/// The wait after the `losses`-th loss in a row.
pub fn delay(base: Duration, losses: u32) -> Duration {
    let doubled = base.saturating_mul(1u32 << losses.saturating_sub(1).min(16));
    doubled.min(MAX_DELAY.max(base))
}

/// What to do with a host's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(LostRecord),
    Delete,
    Keep,
}

/// The record of `host` after this look: `live` (its launcher's node key is there) and
/// `holding` (instances are assigned to it).
pub fn track(
    record: Option<&LostRecord>,
    host: &HostId,
    live: bool,
    holding: bool,
    now: SystemTime,
    base: Duration,
) -> Change {
    let lost = |losses: u32| {
        Change::Put(LostRecord {
            v: RECORD_VERSION,
            host: host.clone(),
            since: rfc3339(now),
            until: rfc3339(now + delay(base, losses)),
            losses,
            back_since: None,
        })
    };
    match (record, live) {
        (None, true) => Change::Keep,
        (Some(r), true) => match r.back_since.as_deref().and_then(parse_rfc3339) {
            None => Change::Put(LostRecord {
                back_since: Some(rfc3339(now)),
                ..r.clone()
            }),
            Some(back) if now.duration_since(back).unwrap_or_default() >= HEALTHY_RESET => {
                Change::Delete
            }
            Some(_) => Change::Keep,
        },
        (None, false) if holding => lost(1),
        (Some(r), false) if holding && r.back_since.is_some() => lost(r.losses + 1),
        _ => Change::Keep,
    }
}

/// When a lost host's instances move, if the record says it is lost now.
pub fn deadline(record: &LostRecord) -> Option<SystemTime> {
    if record.back_since.is_some() {
        return None;
    }
    parse_rfc3339(&record.until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flapping_host_waits_longer_each_time_and_is_forgiven_after_an_hour() {
        let host = HostId::new("b").unwrap();
        let base = Duration::from_secs(30);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let Change::Put(first) = track(None, &host, false, true, t0, base) else {
            panic!()
        };
        assert_eq!(first.losses, 1);
        assert_eq!(deadline(&first), Some(t0 + base));
        // Still lost a moment later: the same record, the same deadline.
        assert_eq!(
            track(Some(&first), &host, false, true, t0 + base / 2, base),
            Change::Keep
        );
        // Back: remembered.
        let t1 = t0 + Duration::from_secs(20);
        let Change::Put(back) = track(Some(&first), &host, true, true, t1, base) else {
            panic!()
        };
        assert_eq!(deadline(&back), None);
        // Lost again: twice the wait; a third time: four times.
        let t2 = t1 + Duration::from_secs(10);
        let Change::Put(second) = track(Some(&back), &host, false, true, t2, base) else {
            panic!()
        };
        assert_eq!((second.losses, deadline(&second)), (2, Some(t2 + base * 2)));
        let Change::Put(back2) = track(Some(&second), &host, true, true, t2, base) else {
            panic!()
        };
        let Change::Put(third) = track(Some(&back2), &host, false, true, t2, base) else {
            panic!()
        };
        assert_eq!(deadline(&third), Some(t2 + base * 4));
        // Never more than ten minutes; and an hour of health forgets it.
        assert_eq!(delay(base, 12), MAX_DELAY);
        let Change::Put(healthy) = track(Some(&third), &host, true, true, t2, base) else {
            panic!()
        };
        assert_eq!(
            track(Some(&healthy), &host, true, true, t2 + HEALTHY_RESET, base),
            Change::Delete
        );
        // A host that goes with nothing placed there needs no record.
        assert_eq!(track(None, &host, false, false, t0, base), Change::Keep);
    }
}
