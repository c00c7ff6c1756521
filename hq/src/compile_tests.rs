//! `compile` is pure: its output for the design notes' stacks is checked in as a snapshot
//! (`tests/snapshots/design_notes.json`), so a change to compiled config shows in review as a
//! diff. `UPDATE_SNAPSHOTS=1` rewrites it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schema::ServicePort;

use super::{ClusterView, compile, required_service_ports};
use crate::folder;

/// The design notes' example stacks, copied exactly (tab-indented).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/design-notes")
}

#[test]
fn design_notes_stacks_compile_to_the_snapshot() {
    let dir = fixtures();
    let stacks = vec![
        folder::read_stack(&dir.join("app"), "app").unwrap(),
        folder::read_stack(&dir.join("shared"), "shared").unwrap(),
    ];
    let mut view = ClusterView {
        ambassador_addr: "172.17.0.1".into(),
        ..ClusterView::default()
    };
    let required = required_service_ports(&stacks, &view).unwrap();
    let names: Vec<String> = required.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        [
            "app/middleware:80/tcp",
            "shared/auth:80/tcp",
            "shared/mongo:27017/tcp"
        ]
    );
    view.ports = required
        .into_iter()
        .zip(20000u16..)
        .collect::<BTreeMap<ServicePort, u16>>();
    let deployment = compile(&stacks, &view).unwrap();
    // Linked-to first: shared before app, middleware before web.
    let order: Vec<(String, Vec<String>)> = deployment
        .stacks
        .iter()
        .map(|s| (s.name.to_string(), s.order.clone()))
        .collect();
    assert_eq!(
        order,
        [
            (
                "shared".to_owned(),
                vec!["mongo".to_owned(), "auth".to_owned()]
            ),
            (
                "app".to_owned(),
                vec!["middleware".to_owned(), "web".to_owned()]
            ),
        ]
    );
    let mut got = serde_json::to_string_pretty(&deployment).unwrap();
    got.push('\n');
    testkit::assert_snapshot(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/design_notes.json"),
        &got,
    );
}

#[test]
fn cycles_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(
        dir.join("stack.yml"),
        "a:\n\timage: x\n\tports: [1]\n\tlink: [b]\nb:\n\timage: y\n\tports: [2]\n\tlink: [c]\nc:\n\timage: z\n\tports: [3]\n\tlink: [a]\n",
    )
    .unwrap();
    let stacks = vec![folder::read_stack(&dir, "cyc").unwrap()];
    let err = required_service_ports(&stacks, &ClusterView::default())
        .unwrap_err()
        .to_string();
    assert!(err.ends_with(
        "link cycle: cyc/a -> cyc/b -> cyc/c -> cyc/a; linked-to jobs must start first, so a cycle cannot start"
    ), "{err}");
    assert!(err.contains("stack.yml:4:9: "), "{err}");
}

#[test]
fn env_prefix_collisions_are_errors_with_their_place() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("stack.yml"),
        "web:\n  image: x\n  link:\n    - shared/mongo\n    - shared-mongo\nshared-mongo:\n  image: y\n  ports: [1]\n",
    )
    .unwrap();
    let stacks = vec![folder::read_stack(tmp.path(), "app").unwrap()];
    let err = required_service_ports(&stacks, &ClusterView::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("stack.yml:5:7: job web: links \"shared/mongo\" and \"shared-mongo\" both give the env prefix SHARED_MONGO"),
        "{err}"
    );
}
