//! Choosing ports: the pure part of allocation.
//!
//! Given what a read saw (the counter hint, the free list, the owned ports in a window around
//! the counter), [`choose`] picks candidate ports. Uniqueness does not depend on this choice:
//! the write transaction compares every chosen `owner/<port>` as absent. The choice only
//! decides how often writes collide, so it is tuned for that:
//!
//! * first try: the lowest candidates, released ports first, then upward from the counter,
//!   so ports stay dense and released ones come back first;
//! * after a collision: a random pick among the first `k + spread` candidates, the spread
//!   doubling with each retry, so concurrent allocators stop chasing the same port.
//!
//! `ports/next` is the *dense frontier*: every port below it is owned or on the free list.
//! Random picks above it leave gaps, but those gaps stay at or above the frontier, where every
//! later read looks ([`window`]), so no port is ever lost below it. [`frontier`] computes how
//! far a write may move it.

use std::collections::BTreeSet;

pub use schema::{PortRange, RangeError};

/// Where a candidate came from; a port from the free list must also leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `ports/free/<port>`: released earlier.
    Free,
    /// Below the counter and unowned: skipped by a concurrent allocation, or found by a scan.
    Hole,
    /// At or above the counter.
    Counter,
}

/// A chosen port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub port: u16,
    pub source: Source,
}

/// What one read saw; the input of [`choose`].
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The counter hint (`ports/next`), if present and readable.
    pub next: Option<u32>,
    /// Ports in the free list.
    pub free: BTreeSet<u16>,
    /// Ports with an owner key, as far as the read looked.
    pub owned: BTreeSet<u16>,
    /// The numeric interval the owner read covered; `owned` is complete inside it.
    pub scanned: (u32, u32),
    /// Whether the read covered the whole range (then every unowned port is a candidate).
    pub full_scan: bool,
}

/// How far above the counter a read looks for owned ports. Gaps left by random picks lie
/// within the largest spread (512) plus a batch of this, so the window covers them; candidates
/// come only from inside it.
pub const AHEAD_WINDOW: u32 = 1024;

/// The largest spread a retry uses.
const MAX_SPREAD: usize = 512;

/// The numeric interval a window read should cover, given the counter hint.
pub fn window(range: PortRange, next: Option<u32>) -> (u32, u32) {
    let lo = next
        .unwrap_or(u32::from(range.start))
        .max(u32::from(range.start));
    let hi = lo.saturating_add(AHEAD_WINDOW).min(u32::from(range.end));
    (lo, hi.max(lo))
}

/// The frontier after a write that takes `taken` (on top of what `view` saw owned): the
/// lowest port at or above the seen counter that is neither owned nor taken, as far as the
/// read can vouch for. Never below the seen counter.
pub fn frontier(view: &View, range: PortRange, taken: &BTreeSet<u16>) -> u32 {
    let mut q = view
        .next
        .unwrap_or(u32::from(range.start))
        .max(u32::from(range.start));
    let known = |q: u32| view.full_scan || (view.scanned.0..=view.scanned.1).contains(&q);
    while q <= u32::from(range.end) {
        let p = q as u16;
        if taken.contains(&p) || (known(q) && view.owned.contains(&p)) {
            q += 1;
        } else {
            break;
        }
    }
    q
}

/// Not enough candidates: the caller scans the whole range, or reports exhaustion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortage {
    pub available: usize,
}

/// Picks `k` distinct candidates. `attempt` 0 takes the lowest; later attempts pick at random
/// among the first `k + spread` to avoid colliding with other allocators.
pub fn choose(
    view: &View,
    range: PortRange,
    k: usize,
    attempt: u32,
    rng: &mut fastrand::Rng,
) -> Result<Vec<Candidate>, Shortage> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let spread = if attempt == 0 {
        0
    } else {
        (8usize << attempt.min(10)).min(MAX_SPREAD)
    };
    let want = k + spread;
    let pool = candidates(view, range, want);
    if pool.len() < k {
        return Err(Shortage {
            available: pool.len(),
        });
    }
    if attempt == 0 {
        return Ok(pool[..k].to_vec());
    }
    let mut pool = pool;
    // Partial Fisher-Yates: the first k positions become a uniform sample of the pool.
    for i in 0..k {
        let j = rng.usize(i..pool.len());
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool.sort_by_key(|c| c.port);
    Ok(pool)
}

/// Up to `limit` candidates in preference order.
fn candidates(view: &View, range: PortRange, limit: usize) -> Vec<Candidate> {
    let mut out = Vec::with_capacity(limit.min(range.len()));
    let next = view
        .next
        .unwrap_or(u32::from(range.start))
        .clamp(u32::from(range.start), u32::from(range.end) + 1);
    let free_ok = |p: u16| range.contains(p) && !view.owned.contains(&p);
    for &p in &view.free {
        if out.len() == limit {
            return out;
        }
        if free_ok(p) {
            out.push(Candidate {
                port: p,
                source: Source::Free,
            });
        }
    }
    // Holes below the frontier exist only if written by hand or by an older version; a full
    // scan (near exhaustion) finds them.
    let hole_hi = if view.full_scan {
        next
    } else {
        u32::from(range.start)
    };
    for p in u32::from(range.start)..hole_hi {
        if out.len() == limit {
            return out;
        }
        let p = p as u16;
        if !view.owned.contains(&p) && !view.free.contains(&p) {
            out.push(Candidate {
                port: p,
                source: Source::Hole,
            });
        }
    }
    // Upward from the counter, skipping what the read saw owned (gaps left by random picks),
    // and no further than the read looked: above it every port is a guess, and under heavy
    // contention, with the frontier held back by a gap, most guesses are owned ports (measured:
    // a retry loop picking owned ports above the window until it gave up). Too few known free
    // ports makes a shortage, and the caller reads the whole range. A read that looked at no
    // owners (no counter hint yet) leaves everything to the compare on the owner key.
    let looked = view.scanned.0 <= view.scanned.1;
    let top = if view.full_scan || !looked {
        u32::from(range.end)
    } else {
        view.scanned.1.min(u32::from(range.end))
    };
    for p in next..=top {
        if out.len() == limit {
            break;
        }
        let p = p as u16;
        if !view.owned.contains(&p) && !view.free.contains(&p) {
            out.push(Candidate {
                port: p,
                source: Source::Counter,
            });
        }
    }
    out
}

/// Lexicographic key ranges `[from, to]` (inclusive, as decimal strings) covering the numeric
/// interval `[lo, hi]`: one per digit count, since `"9999" > "10000"` byte-wise. A range read
/// of `[from, to + "\0")` also returns longer keys that share a prefix (`1000`..`1099` brings
/// `10000`..`10999`); callers filter by parsing the number.
pub fn lexicographic_pieces(lo: u32, hi: u32) -> Vec<(String, String)> {
    let mut pieces = Vec::new();
    let mut start = lo;
    while start <= hi {
        let digits = start.to_string().len() as u32;
        let top = 10u32.saturating_pow(digits).saturating_sub(1);
        let end = hi.min(top);
        pieces.push((start.to_string(), end.to_string()));
        if end == u32::MAX {
            break;
        }
        start = end + 1;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(next: u32, owned: &[u16], free: &[u16]) -> View {
        View {
            next: Some(next),
            free: free.iter().copied().collect(),
            owned: owned.iter().copied().collect(),
            scanned: window(PortRange::DEFAULT, Some(next)),
            full_scan: false,
        }
    }

    #[test]
    fn first_try_prefers_free_then_the_counter_skipping_gaps() {
        let v = view(20005, &[20000, 20001, 20003, 20006], &[20001, 20004]);
        let mut rng = fastrand::Rng::with_seed(1);
        let got = choose(&v, PortRange::DEFAULT, 4, 0, &mut rng).unwrap();
        let ports: Vec<(u16, Source)> = got.iter().map(|c| (c.port, c.source)).collect();
        // 20001 is on the free list but owned (stale): skipped. 20006 is owned above the
        // frontier (a random pick of another allocator): skipped.
        assert_eq!(
            ports,
            vec![
                (20004, Source::Free),
                (20005, Source::Counter),
                (20007, Source::Counter),
                (20008, Source::Counter),
            ]
        );
    }

    #[test]
    fn frontier_moves_over_owned_and_taken_ports_only() {
        let v = view(20005, &[20006, 20008], &[]);
        let taken = |ps: &[u16]| ps.iter().copied().collect::<BTreeSet<u16>>();
        assert_eq!(frontier(&v, PortRange::DEFAULT, &taken(&[])), 20005);
        assert_eq!(frontier(&v, PortRange::DEFAULT, &taken(&[20005])), 20007);
        assert_eq!(
            frontier(&v, PortRange::DEFAULT, &taken(&[20005, 20007])),
            20009
        );
        assert_eq!(frontier(&v, PortRange::DEFAULT, &taken(&[20010])), 20005);
        // Outside what the read saw, only our own picks count.
        let cold = View {
            next: Some(20005),
            owned: taken(&[20006]),
            scanned: (1, 0),
            ..View::default()
        };
        assert_eq!(frontier(&cold, PortRange::DEFAULT, &taken(&[20005])), 20006);
        let full = PortRange::new(100, 101).unwrap();
        let v = View {
            next: Some(100),
            ..View::default()
        };
        assert_eq!(frontier(&v, full, &taken(&[100, 101])), 102);
    }

    #[test]
    fn candidates_stay_inside_what_the_read_looked_at() {
        // The frontier is held back by a gap at 20000; the window above it is owned but for
        // 3 ports. A retry must pick among those 3, not guess above the window.
        let (lo, hi) = window(PortRange::DEFAULT, Some(20000));
        let owned: Vec<u16> = (lo + 1..=hi)
            .filter(|p| ![20500, 21000].contains(p))
            .map(|p| p as u16)
            .collect();
        let v = view(20000, &owned, &[]);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..32 {
            let got = choose(&v, PortRange::DEFAULT, 1, 6, &mut rng).unwrap();
            assert!([20000, 20500, 21000].contains(&got[0].port), "{got:?}");
        }
        // More than the window holds: a shortage, so the caller reads the whole range.
        assert_eq!(
            choose(&v, PortRange::DEFAULT, 4, 0, &mut rng),
            Err(Shortage { available: 3 })
        );
    }

    #[test]
    fn retries_spread_out_and_stay_valid() {
        let v = view(20000, &[], &[]);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut distinct = BTreeSet::new();
        for _ in 0..32 {
            let got = choose(&v, PortRange::DEFAULT, 1, 3, &mut rng).unwrap();
            assert!(got[0].port >= 20000 && got[0].port < 20000 + 1 + 64);
            distinct.insert(got[0].port);
        }
        assert!(distinct.len() > 10, "retries do not spread: {distinct:?}");
    }

    #[test]
    fn reports_shortage_and_respects_range() {
        let range = PortRange::new(100, 109).unwrap();
        let owned: Vec<u16> = (100..108).collect();
        let v = View {
            next: Some(110),
            owned: owned.into_iter().collect(),
            scanned: (100, 109),
            full_scan: true,
            ..View::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(
            choose(&v, range, 3, 0, &mut rng),
            Err(Shortage { available: 2 })
        );
        let got = choose(&v, range, 2, 0, &mut rng).unwrap();
        assert_eq!(
            got.iter().map(|c| c.port).collect::<Vec<_>>(),
            vec![108, 109]
        );
    }

    #[test]
    fn a_full_scan_finds_holes_below_the_counter() {
        let range = PortRange::new(100, 109).unwrap();
        let v = View {
            next: Some(110),
            owned: [100, 105].into_iter().collect(),
            scanned: (100, 109),
            full_scan: true,
            ..View::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let got = choose(&v, range, 8, 0, &mut rng).unwrap();
        assert!(
            got.iter()
                .all(|c| c.source == Source::Hole && c.port != 105)
        );
        assert_eq!(got.len(), 8);
    }

    #[test]
    fn no_holes_where_the_read_did_not_look() {
        let v = View {
            next: Some(20005),
            scanned: (1, 0),
            ..View::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let got = choose(&v, PortRange::DEFAULT, 1, 0, &mut rng).unwrap();
        assert_eq!(
            got[0],
            Candidate {
                port: 20005,
                source: Source::Counter
            }
        );
    }

    #[test]
    fn ranges_parse_and_reject() {
        assert_eq!(
            "20000-29999".parse::<PortRange>().unwrap(),
            PortRange::DEFAULT
        );
        for bad in ["", "20000", "0-10", "10-5", "1-70000", "a-b", "-5"] {
            let err = bad.parse::<PortRange>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn lexicographic_pieces_split_by_digit_count() {
        assert_eq!(
            lexicographic_pieces(9990, 10010),
            vec![
                ("9990".into(), "9999".into()),
                ("10000".into(), "10010".into())
            ]
        );
        assert_eq!(
            lexicographic_pieces(20000, 20100),
            vec![("20000".into(), "20100".into())]
        );
    }
}
