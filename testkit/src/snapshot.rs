//! The one snapshot check: output that reviewers should see change as a diff is kept in a
//! file beside the tests. `UPDATE_SNAPSHOTS=1` rewrites the files from what the test got.

use std::path::Path;

/// Fails unless `got` equals the file at `path`; with `UPDATE_SNAPSHOTS` set, writes `got`
/// there first.
pub fn assert_snapshot(path: impl AsRef<Path>, got: &str) {
    let path = path.as_ref();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the snapshot dir");
        }
        std::fs::write(path, got).expect("write the snapshot");
    }
    let want = std::fs::read_to_string(path).unwrap_or_else(|_| {
        panic!(
            "no snapshot at {}; run with UPDATE_SNAPSHOTS=1 to write it",
            path.display()
        )
    });
    if got != want {
        let line = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .map_or(got.lines().count().min(want.lines().count()) + 1, |i| i + 1);
        panic!(
            "{} differs from what the test got, first at line {line}; review the change, then \
             UPDATE_SNAPSHOTS=1 rewrites it\n--- got ---\n{got}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_snapshot_passes_and_a_different_one_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.txt");
        std::fs::write(&path, "a\nb\n").unwrap();
        assert_snapshot(&path, "a\nb\n");
        let failed = std::panic::catch_unwind(|| assert_snapshot(&path, "a\nc\n")).unwrap_err();
        let text = failed.downcast_ref::<String>().unwrap();
        assert!(text.contains("first at line 2"), "{text}");
    }
}
