//! portalloc: the cluster-wide allocator of ambassador ports, on etcd.
//!
//! Every service port that someone links to gets one ambassador port, unique in the whole
//! cluster. The truth is two keys written together in one transaction:
//! `ports/alloc/<stack>/<job>/<port>-<proto>` (`{port}`) and `ports/owner/<port>` (the service
//! port as text), both compared as absent. That compare, not any counter, is what makes a port
//! unique under any number of concurrent allocators in any number of processes.
//!
//! `ports/next` is only a hint of where fresh ports start; it is moved forward inside the same
//! transaction by a nested compare-and-put, so it never goes back and never becomes the one hot
//! key every allocation must compare. Released ports go to `ports/free/<port>` and are handed
//! out before the counter grows. See ARCHITECTURE.md for the measurements behind this scheme.
//!
//! Cost: an allocation is one read (linearizable, no raft commit) and one write transaction
//! per chunk of service ports. A chunk holds as many as etcd's `--max-txn-ops` allows
//! (63 with the default 128); [`Allocator::round_trips`] counts the requests.

mod inspect;
pub mod plan;
pub mod repair;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use runtime::{Backoff, EtcdError};
use schema::records::{self, PortAllocRecord, RecordError};
use schema::{Dir, Key, Prefix, ServicePort};
use tracing::debug;

pub use plan::{PortRange, RangeError};
pub use repair::Fix;

/// Collisions tolerated before an allocation gives up: far more than contention among even
/// hundreds of allocators produces, since every retry spreads its picks wider.
const MAX_ATTEMPTS: u32 = 64;

/// Why an allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(
        "no free ambassador port left in range {range}: {needed} needed, {available} free; \
release unused service ports (portalloc list, portalloc release) or widen --range"
    )]
    Exhausted {
        range: PortRange,
        needed: usize,
        available: usize,
    },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{0}; run `portalloc repair` to fix the allocation keys")]
    Corrupt(#[from] RecordError),
    #[error(
        "gave up after {attempts} attempts: other allocators kept taking the same ports; try again"
    )]
    Contention { attempts: u32 },
}

/// Exit status for a command: 2 for bad settings, 1 for everything else.
impl runtime::Fatal for AllocError {
    fn exit_code(&self) -> u8 {
        match self {
            AllocError::Etcd(e) => e.exit_code(),
            _ => runtime::process::FAILURE,
        }
    }
}

/// One allocation as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Allocation {
    pub service_port: String,
    pub port: u16,
    /// Whether `ports/owner/<port>` names this service port back; `repair` fixes it when not.
    pub consistent: bool,
}

/// Counts of requests, for tests and benches.
#[derive(Debug, Default)]
struct Stats {
    round_trips: AtomicU64,
    conflicts: AtomicU64,
}

/// Allocates ambassador ports. Cheap to clone; clones share the hints and counters.
#[derive(Clone)]
pub struct Allocator {
    kv: KvClient,
    prefix: Prefix,
    range: PortRange,
    max_txn_ops: usize,
    /// How long transient etcd failures (no leader, connection lost) are retried.
    retry_for: Duration,
    endpoints: String,
    /// Last `ports/next` seen, so the next read looks for holes in the right window (0: none).
    next_hint: Arc<AtomicU32>,
    /// Recent contention: the attempt number to start at, so a busy allocator spreads at once.
    heat: Arc<AtomicU32>,
    stats: Arc<Stats>,
}

/// What one read saw.
struct Snapshot {
    /// The revision the read saw.
    revision: i64,
    existing: HashMap<ServicePort, u16>,
    view: plan::View,
    next_present: bool,
}

impl Allocator {
    pub fn new(client: &Client, prefix: Prefix, range: PortRange) -> Self {
        Self {
            // A full scan of a 64k-port range reads ~5 MB of keys: above tonic's 4 MB default.
            kv: client.kv_client().max_decoding_message_size(64 << 20),
            prefix,
            range,
            max_txn_ops: schema::MAX_TXN_OPS,
            retry_for: Duration::from_secs(30),
            endpoints: String::from("etcd"),
            next_hint: Arc::default(),
            heat: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Matches etcd's `--max-txn-ops` when the server allows more than the default 128.
    pub fn with_max_txn_ops(mut self, n: usize) -> Self {
        self.max_txn_ops = n.max(4);
        self
    }

    /// How long to keep retrying while etcd is unreachable or electing a leader.
    pub fn with_retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }

    /// The endpoints, named in error messages.
    pub fn with_endpoints_label(mut self, endpoints: impl Into<String>) -> Self {
        self.endpoints = endpoints.into();
        self
    }

    /// etcd's `--max-txn-ops` as this allocator was told it.
    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Requests sent to etcd so far (reads and writes).
    pub fn round_trips(&self) -> u64 {
        self.stats.round_trips.load(Ordering::Relaxed)
    }

    /// Write transactions that lost a race and were retried.
    pub fn conflicts(&self) -> u64 {
        self.stats.conflicts.load(Ordering::Relaxed)
    }

    fn key(&self, key: &Key) -> String {
        self.prefix.key(key)
    }

    /// One transaction, retried while etcd is unavailable, within `retry_for`.
    async fn txn(&self, make: impl Fn() -> Txn) -> Result<TxnResponse, AllocError> {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
            let mut kv = self.kv.clone();
            match kv.txn(make()).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    let e = EtcdError::classify(e, &self.endpoints);
                    if !e.is_retryable() || Instant::now() >= deadline {
                        return Err(e.into());
                    }
                    debug!(error = %e, "etcd unavailable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// The ambassador port of `service_port`, allocating one if it has none.
    pub async fn allocate(&self, service_port: &ServicePort) -> Result<u16, AllocError> {
        let ports = self
            .allocate_many(std::slice::from_ref(service_port))
            .await?;
        Ok(ports[0])
    }

    /// The ambassador ports of `service_ports` (same order), allocating the missing ones.
    ///
    /// Idempotent: a service port that has a port keeps it. Either every missing one gets a
    /// port or, when the range cannot hold them all, none is written. Large batches are
    /// written in chunks of at most `max_txn_ops` operations, each chunk atomic.
    pub async fn allocate_many(
        &self,
        service_ports: &[ServicePort],
    ) -> Result<Vec<u16>, AllocError> {
        let mut got: HashMap<ServicePort, u16> = HashMap::new();
        let mut attempt = self.heat.load(Ordering::Relaxed);
        let mut tries = 0u32;
        let mut rng = fastrand::Rng::new();
        loop {
            let missing: Vec<&ServicePort> = unique(service_ports)
                .into_iter()
                .filter(|sp| !got.contains_key(*sp))
                .collect();
            if missing.is_empty() {
                break;
            }
            let mut snap = self.read(&missing, false).await?;
            got.extend(snap.existing.drain());
            let need: Vec<&ServicePort> = missing
                .into_iter()
                .filter(|sp| !got.contains_key(*sp))
                .collect();
            if need.is_empty() {
                break;
            }
            let chosen = match plan::choose(&snap.view, self.range, need.len(), attempt, &mut rng) {
                Ok(c) => c,
                Err(_) => {
                    // Not enough near the counter: look at the whole range once.
                    let full = self.read(&need, true).await?;
                    snap.view = full.view;
                    plan::choose(&snap.view, self.range, need.len(), attempt, &mut rng).map_err(
                        |s| AllocError::Exhausted {
                            range: self.range,
                            needed: need.len(),
                            available: s.available,
                        },
                    )?
                }
            };
            let mut conflict = false;
            let items: Vec<(&ServicePort, plan::Candidate)> =
                need.iter().copied().zip(chosen).collect();
            // Ports this round has committed, so each chunk moves the frontier over them.
            let mut taken = BTreeSet::new();
            for chunk in self.chunks(&items) {
                if self.write(chunk, &snap, &mut taken).await? {
                    got.extend(chunk.iter().map(|(sp, c)| ((*sp).clone(), c.port)));
                } else {
                    conflict = true;
                }
            }
            if !conflict {
                // Cool down slowly: one quiet success does not mean the others stopped.
                if attempt == self.heat.load(Ordering::Relaxed) && attempt > 0 && rng.u8(..8) == 0 {
                    let _ = self.heat.compare_exchange(
                        attempt,
                        attempt - 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                break;
            }
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            tries += 1;
            if tries >= MAX_ATTEMPTS {
                return Err(AllocError::Contention { attempts: tries });
            }
            attempt += 1;
            self.heat.fetch_max(attempt.min(6), Ordering::Relaxed);
        }
        Ok(service_ports.iter().map(|sp| got[sp]).collect())
    }

    /// [`Allocator::allocate_many`], and an etcd revision at which every returned port was
    /// allocated as returned (one read that saw them all, after any write): a writer that
    /// puts the ports in a transaction of its own adds [`Allocator::released_since`] of it,
    /// so that a release in between fails that transaction. One read more than
    /// `allocate_many`.
    pub async fn allocate_many_at(
        &self,
        service_ports: &[ServicePort],
    ) -> Result<(Vec<u16>, i64), AllocError> {
        let sps = unique(service_ports);
        for _ in 0..MAX_ATTEMPTS {
            let ports = self.allocate_many(service_ports).await?;
            let snap = self.read(&sps, false).await?;
            let same = service_ports
                .iter()
                .zip(&ports)
                .all(|(sp, port)| snap.existing.get(sp) == Some(port));
            if same {
                return Ok((ports, snap.revision));
            }
            // Released (and maybe handed out again) between the two: allocate again.
        }
        Err(AllocError::Contention {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Compares that fail once any port was released after `revision`: a release creates
    /// `ports/free/<port>`, and handing the port out again creates `ports/owner/<port>`, so
    /// nothing newer than `revision` under either directory means every port allocated at
    /// `revision` still belongs to whom it did. Two compares, whatever the number of ports;
    /// any allocation after `revision` fails them too, and the writer plans again.
    pub fn released_since(&self, revision: i64) -> [Compare; 2] {
        [Dir::PortFree, Dir::PortOwners].map(|dir| {
            Compare::mod_revision(self.prefix.dir(dir), CompareOp::Less, revision + 1).with_prefix()
        })
    }

    /// The compare and operations that release `service_port`, whose allocation record was
    /// read at `alloc_rev` holding `port`, inside a caller's transaction: the record goes,
    /// and the owner key goes (and the port joins the free list) only if it names
    /// `service_port`. Two operations, the second a nested transaction of two.
    pub fn release_parts(
        &self,
        service_port: &ServicePort,
        port: u16,
        alloc_rev: i64,
    ) -> (Compare, [TxnOp; 2]) {
        let alloc_key = self.key(&Key::PortAlloc(service_port.clone()));
        let owner_key = self.key(&Key::PortOwner(port));
        // Delete the owner key (and free the port) only if it names us: a mismatch is
        // repair's business, and the port may belong to someone else.
        let owner = Txn::new()
            .when([Compare::value(
                owner_key.clone(),
                CompareOp::Equal,
                records::owner_value(service_port),
            )])
            .and_then([
                TxnOp::delete(owner_key, None),
                TxnOp::put(self.key(&Key::PortFree(port)), "", None),
            ]);
        (
            Compare::mod_revision(alloc_key.clone(), CompareOp::Equal, alloc_rev),
            [TxnOp::delete(alloc_key, None), TxnOp::txn(owner)],
        )
    }

    /// Splits `items` so that each write stays within `max_txn_ops` compares and operations.
    fn chunks<'a, 'b>(
        &self,
        items: &'b [(&'a ServicePort, plan::Candidate)],
    ) -> Vec<&'b [(&'a ServicePort, plan::Candidate)]> {
        // etcd gives a nested transaction what its parent leaves of --max-txn-ops, and the
        // counter update nests two deep: keep two for it.
        let budget = self.max_txn_ops - 2;
        let mut out = Vec::new();
        let mut start = 0;
        let (mut compares, mut ops) = (0, 1); // 1: the nested counter update
        for (i, (_, c)) in items.iter().enumerate() {
            let extra_ops = if c.source == plan::Source::Free { 3 } else { 2 };
            if compares + 2 > budget || ops + extra_ops > budget {
                out.push(&items[start..i]);
                start = i;
                compares = 0;
                ops = 1;
            }
            compares += 2;
            ops += extra_ops;
        }
        if start < items.len() {
            out.push(&items[start..]);
        }
        out
    }

    /// Reads what allocation needs: existing allocations of `sps`, the counter, the free list
    /// and the owned ports around the counter (or in the whole range, with `full_scan`).
    async fn read(&self, sps: &[&ServicePort], full_scan: bool) -> Result<Snapshot, AllocError> {
        let next_key = self.key(&Key::PortsNext);
        let free_dir = self.prefix.dir(Dir::PortFree);
        let owner_dir = self.prefix.dir(Dir::PortOwners);
        let hint = match self.next_hint.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        };
        // Without a hint, owners are not read at all: the compare on each owner key keeps
        // allocation correct, and the first retry has the hint.
        let scanned = if full_scan {
            (u32::from(self.range.start), u32::from(self.range.end))
        } else {
            hint.map_or((1, 0), |h| plan::window(self.range, Some(h)))
        };
        let free_limit = if full_scan {
            0
        } else {
            (sps.len() + 600) as i64
        };
        let mut head = vec![
            TxnOp::get(next_key.clone(), None),
            TxnOp::get(
                free_dir.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(free_limit),
                ),
            ),
        ];
        // A full scan is the only read that may pick a port below the frontier (a hole), so it
        // also reads the other side of the truth: a port some allocation record claims is
        // taken even when its owner key was lost (deleted by hand, say). Window reads pick only
        // released ports and ports at or above the frontier, which no allocation claims unless
        // the free list or the counter were edited by hand too; `portalloc repair` finds those.
        if full_scan {
            head.push(TxnOp::get(
                self.prefix.dir(Dir::PortAllocs),
                Some(GetOptions::new().with_prefix()),
            ));
        }
        let owners_from = head.len();
        if scanned.0 <= scanned.1 {
            for (from, to) in plan::lexicographic_pieces(scanned.0, scanned.1) {
                let mut end = format!("{owner_dir}{to}").into_bytes();
                end.push(0);
                head.push(TxnOp::get(
                    format!("{owner_dir}{from}"),
                    Some(GetOptions::new().with_range(end).with_keys_only()),
                ));
            }
        }
        let head_len = head.len();
        let per_txn = self.max_txn_ops.saturating_sub(head_len).max(1);
        let mut responses: Vec<TxnOpResponse> = Vec::new();
        let mut revision = 0;
        let sp_chunks: Vec<&[&ServicePort]> = if sps.is_empty() {
            vec![&[]]
        } else {
            sps.chunks(per_txn).collect()
        };
        for (i, chunk) in sp_chunks.iter().enumerate() {
            let mut ops = if i == 0 { head.clone() } else { Vec::new() };
            ops.extend(
                chunk
                    .iter()
                    .map(|sp| TxnOp::get(self.key(&Key::PortAlloc((*sp).clone())), None)),
            );
            let resp = self.txn(|| Txn::new().and_then(ops.clone())).await?;
            revision = revision.max(resp.header().map_or(0, |h| h.revision()));
            responses.extend(resp.op_responses());
        }

        let mut gets = responses.into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g,
            other => unreachable!("a read-only txn answered {other:?}"),
        });
        let next_resp = gets.next().expect("next");
        let next_present = !next_resp.kvs().is_empty();
        let next = next_resp
            .kvs()
            .first()
            .and_then(|kv| records::parse_next(kv.value()));
        if let Some(n) = next {
            self.next_hint.store(n, Ordering::Relaxed);
        }
        let port_of = |key: &[u8], dir: &str| -> Option<u16> {
            let key = std::str::from_utf8(key).ok()?;
            schema::service::parse_port(key.strip_prefix(dir)?)
        };
        let free: BTreeSet<u16> = gets
            .next()
            .expect("free")
            .kvs()
            .iter()
            .filter_map(|kv| port_of(kv.key(), &free_dir))
            .collect();
        let mut owned = BTreeSet::new();
        if full_scan {
            // Unreadable records are repair's business; the owner compare still guards them.
            for kv in gets.next().expect("allocs").kvs() {
                if let Ok(rec) = serde_json::from_slice::<PortAllocRecord>(kv.value()) {
                    owned.insert(rec.port);
                }
            }
        }
        for _ in owners_from..head_len {
            for kv in gets.next().expect("owners").kvs() {
                if let Some(p) = port_of(kv.key(), &owner_dir) {
                    if (scanned.0..=scanned.1).contains(&u32::from(p)) {
                        owned.insert(p);
                    }
                }
            }
        }
        let mut existing = HashMap::new();
        for (sp, resp) in sps.iter().zip(gets) {
            if let Some(kv) = resp.kvs().first() {
                let key = self.key(&Key::PortAlloc((*sp).clone()));
                let rec: PortAllocRecord = records::decode(&key, kv.value())?;
                existing.insert((*sp).clone(), rec.port);
            }
        }
        Ok(Snapshot {
            revision,
            existing,
            view: plan::View {
                next,
                free,
                owned,
                scanned,
                full_scan,
            },
            next_present,
        })
    }

    /// Writes one chunk: true if it committed, false if another allocator won a key first.
    async fn write(
        &self,
        items: &[(&ServicePort, plan::Candidate)],
        snap: &Snapshot,
        taken: &mut BTreeSet<u16>,
    ) -> Result<bool, AllocError> {
        let mut compares = Vec::with_capacity(items.len() * 2);
        let mut ops = Vec::with_capacity(items.len() * 3 + 1);
        for (sp, c) in items {
            let alloc_key = self.key(&Key::PortAlloc((*sp).clone()));
            let owner_key = self.key(&Key::PortOwner(c.port));
            compares.push(Compare::create_revision(
                alloc_key.clone(),
                CompareOp::Equal,
                0,
            ));
            compares.push(Compare::create_revision(
                owner_key.clone(),
                CompareOp::Equal,
                0,
            ));
            ops.push(TxnOp::put(
                alloc_key,
                records::encode(&PortAllocRecord::new(c.port)),
                None,
            ));
            ops.push(TxnOp::put(owner_key, records::owner_value(sp), None));
            if c.source == plan::Source::Free {
                ops.push(TxnOp::delete(self.key(&Key::PortFree(c.port)), None));
            }
        }
        let mut with_chunk = taken.clone();
        with_chunk.extend(items.iter().map(|(_, c)| c.port));
        let new_next = plan::frontier(&snap.view, self.range, &with_chunk);
        if new_next > snap.view.next.unwrap_or(0) || !snap.next_present {
            ops.push(TxnOp::txn(advance_next(
                &self.key(&Key::PortsNext),
                new_next,
            )));
        }
        let resp = self
            .txn(|| Txn::new().when(compares.clone()).and_then(ops.clone()))
            .await?;
        if resp.succeeded() {
            *taken = with_chunk;
            for (sp, c) in items {
                debug!(service_port = %sp, port = c.port, source = ?c.source, "allocated");
            }
        }
        Ok(resp.succeeded())
    }

    /// The ambassador port of `service_port`, if it has one.
    pub async fn get(&self, service_port: &ServicePort) -> Result<Option<u16>, AllocError> {
        let key = self.key(&Key::PortAlloc(service_port.clone()));
        let resp = self
            .txn(|| Txn::new().and_then([TxnOp::get(key.clone(), None)]))
            .await?;
        match first_kv(&resp) {
            Some((_, value, _)) => Ok(Some(records::decode::<PortAllocRecord>(&key, &value)?.port)),
            None => Ok(None),
        }
    }

    /// Releases the port of `service_port`: its keys go, the port joins the free list.
    /// Returns the released port, or `None` if it had none.
    pub async fn release(&self, service_port: &ServicePort) -> Result<Option<u16>, AllocError> {
        let alloc_key = self.key(&Key::PortAlloc(service_port.clone()));
        let mut attempted: Option<u16> = None;
        for _ in 0..MAX_ATTEMPTS {
            let resp = self
                .txn(|| Txn::new().and_then([TxnOp::get(alloc_key.clone(), None)]))
                .await?;
            let Some((_, value, mod_rev)) = first_kv(&resp) else {
                // A retried release whose first try committed lands here too.
                return Ok(attempted);
            };
            let port = records::decode::<PortAllocRecord>(&alloc_key, &value)?.port;
            let (compare, ops) = self.release_parts(service_port, port, mod_rev);
            let release = Txn::new().when([compare]).and_then(ops);
            attempted = Some(port);
            if self.txn(|| release.clone()).await?.succeeded() {
                return Ok(Some(port));
            }
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        Err(AllocError::Contention {
            attempts: MAX_ATTEMPTS,
        })
    }
}

/// A nested transaction that moves `ports/next` forward to `to`, never back: created when
/// absent, else put only if the stored (zero-padded) value is lower.
fn advance_next(key: &str, to: u32) -> Txn {
    let value = records::next_value(to);
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value.clone(), None)])
        .or_else([TxnOp::txn(
            Txn::new()
                .when([Compare::value(key, CompareOp::Less, value.clone())])
                .and_then([TxnOp::put(key, value, None)]),
        )])
}

fn first_kv(resp: &TxnResponse) -> Option<(Vec<u8>, Vec<u8>, i64)> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    })
}

fn unique(sps: &[ServicePort]) -> Vec<&ServicePort> {
    let mut seen = BTreeSet::new();
    sps.iter().filter(|sp| seen.insert(*sp)).collect()
}
