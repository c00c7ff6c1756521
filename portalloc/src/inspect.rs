//! The whole of `ports/` at once: `list` every allocation and `repair` keys that disagree
//! (the pure plan is [`crate::repair`]), applied in transactions of at most `--max-txn-ops`.

use std::sync::atomic::Ordering;

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
use schema::records::{self, PortAllocRecord};
use schema::{Dir, Key};

use crate::repair::{self, Fix};
use crate::{AllocError, Allocation, Allocator};

impl Allocator {
    /// Every allocation, sorted by port, with whether its owner key agrees.
    pub async fn list(&self) -> Result<Vec<Allocation>, AllocError> {
        let state = self.read_all().await?;
        let mut out: Vec<Allocation> = state
            .allocs
            .iter()
            .filter_map(|(key, raw)| {
                let Ok(Key::PortAlloc(sp)) = self.prefix.parse(key) else {
                    return None;
                };
                let rec: PortAllocRecord = records::decode(key, &raw.value).ok()?;
                let text = records::owner_value(&sp);
                let consistent = state
                    .owners
                    .get(&self.key(&Key::PortOwner(rec.port)))
                    .is_some_and(|o| o.value == text.as_bytes());
                Some(Allocation {
                    service_port: text,
                    port: rec.port,
                    consistent,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.port, &a.service_port).cmp(&(b.port, &b.service_port)));
        Ok(out)
    }

    /// Everything under `ports/`, at one revision.
    async fn read_all(&self) -> Result<repair::State, AllocError> {
        let dirs = [
            self.prefix.dir(Dir::PortAllocs),
            self.prefix.dir(Dir::PortOwners),
            self.prefix.dir(Dir::PortFree),
        ];
        let mut ops: Vec<TxnOp> = dirs
            .iter()
            .map(|d| TxnOp::get(d.clone(), Some(GetOptions::new().with_prefix())))
            .collect();
        ops.push(TxnOp::get(self.key(&Key::PortsNext), None));
        let resp = self.txn(|| Txn::new().and_then(ops.clone())).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut maps = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => runtime::watch::to_map(g.kvs()),
            other => unreachable!("a read-only txn answered {other:?}"),
        });
        let allocs = maps.next().unwrap_or_default();
        let owners = maps.next().unwrap_or_default();
        let free = maps.next().unwrap_or_default();
        let next = maps.next().unwrap_or_default().into_values().next();
        Ok(repair::State {
            revision,
            allocs,
            owners,
            free,
            next,
        })
    }

    /// Finds allocation keys that disagree and fixes them (unless `dry_run`), each fix in the
    /// returned list. Every fix commits only if the keys it read are unchanged.
    ///
    /// A batch whose keys changed under it (a concurrent allocation) is planned again from a
    /// fresh read, a few times; what is still left is returned as [`Fix::Unfixable`].
    pub async fn repair(&self, dry_run: bool) -> Result<Vec<Fix>, AllocError> {
        let mut done = Vec::new();
        for _ in 0..5 {
            let state = self.read_all().await?;
            let fixes = repair::plan(&state, &self.prefix, self.range);
            if dry_run {
                return Ok(fixes);
            }
            let (unfixable, fixable): (Vec<Fix>, Vec<Fix>) = fixes
                .into_iter()
                .partition(|f| matches!(f, Fix::Unfixable { .. }));
            let applied = self.apply_fixes(&fixable).await?;
            let complete = applied.len() == fixable.len();
            done.extend(applied);
            if complete {
                done.extend(unfixable);
                return Ok(done);
            }
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        done.push(Fix::Unfixable {
            what: "allocation keys kept changing during repair; run it again".into(),
        });
        Ok(done)
    }

    async fn apply_fixes(&self, fixes: &[Fix]) -> Result<Vec<Fix>, AllocError> {
        let mut applied = Vec::new();
        let mut batch: Vec<&Fix> = Vec::new();
        let (mut compares, mut ops) = (0usize, 0usize);
        for fix in fixes {
            let (c, o) = fix.txn_parts();
            if !batch.is_empty()
                && (compares + c.len() > self.max_txn_ops || ops + o.len() > self.max_txn_ops)
            {
                applied.extend(self.apply_batch(&batch).await?);
                batch.clear();
                compares = 0;
                ops = 0;
            }
            compares += c.len();
            ops += o.len();
            batch.push(fix);
        }
        if !batch.is_empty() {
            applied.extend(self.apply_batch(&batch).await?);
        }
        Ok(applied)
    }

    /// One transaction for `batch`: all of it, or none if a key it read has changed since.
    async fn apply_batch(&self, batch: &[&Fix]) -> Result<Vec<Fix>, AllocError> {
        let (mut cmp, mut op) = (Vec::new(), Vec::new());
        for fix in batch {
            let (c, o) = fix.txn_parts();
            cmp.extend(c);
            op.extend(o);
        }
        let resp = self
            .txn(|| Txn::new().when(cmp.clone()).and_then(op.clone()))
            .await?;
        Ok(if resp.succeeded() {
            batch.iter().map(|f| (*f).clone()).collect()
        } else {
            Vec::new()
        })
    }
}
