//! Putting a job's previous spec back: `viking rollback`, and the scheduler's
//! `update.auto_revert`. One transaction swaps `stacks/<stack>/<job>` and
//! `stacks/<stack>/prev/<job>`, compared against what was read, so that a deploy in between
//! makes it fail rather than be undone.

use etcd_client::{Compare, CompareOp, TxnOp};
use schema::{JobSpec, Kv, records};

/// The compares and operations that swap a job's spec (`current`) with its previous one
/// (`prev`), keeping the scale it has now; or why the keys cannot be read.
pub fn swap(current: &Kv, prev: &Kv) -> Result<(Vec<Compare>, Vec<TxnOp>), String> {
    let now: JobSpec = records::decode(&current.key, &current.value).map_err(|e| e.to_string())?;
    let mut back: JobSpec = records::decode(&prev.key, &prev.value).map_err(|e| e.to_string())?;
    back.scale = now.scale;
    Ok((
        vec![
            Compare::mod_revision(current.key.as_str(), CompareOp::Equal, current.mod_revision),
            Compare::mod_revision(prev.key.as_str(), CompareOp::Equal, prev.mod_revision),
        ],
        vec![
            TxnOp::put(current.key.as_str(), records::encode(&back), None),
            TxnOp::put(prev.key.as_str(), current.value.clone(), None),
        ],
    ))
}
