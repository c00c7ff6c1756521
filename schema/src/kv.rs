//! A key as read from etcd: its value, the revision it last changed at and its lease. Every
//! reader keeps what it read as this, and writers compare on `mod_revision`.

/// One key and its value as read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the key's last change: what a compare-and-swap checks.
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// etcd's default `--max-txn-ops`: the most operations (and, separately, compares) one
/// transaction may carry. Writers split larger batches, never one unit of work.
pub const MAX_TXN_OPS: usize = 128;
