//! The `portalloc` binary: output, exit codes, and what it writes.

use etcd_client::Client;
use testkit::Etcd;

use crate::{count_keys, portalloc, stderr, stdout};

#[tokio::test]
async fn alloc_get_release_list() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let out = portalloc(&ep, &["alloc", "shared/mongo:27017"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "20000\n", "the port alone on stdout");

    let out = portalloc(
        &ep,
        &["alloc", "shared/dns:53/udp", "shared/mongo:27017/tcp"],
    );
    assert_eq!(stdout(&out), "20001\n20000\n");

    let out = portalloc(&ep, &["get", "shared/mongo:27017"]);
    assert_eq!(stdout(&out), "20000\n");

    let out = portalloc(&ep, &["list"]);
    assert_eq!(
        stdout(&out),
        "20000\tshared/mongo:27017/tcp\n20001\tshared/dns:53/udp\n"
    );
    let out = portalloc(&ep, &["list", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[1]["service_port"], "shared/dns:53/udp");
    assert_eq!(json[1]["port"], 20001);
    assert_eq!(json[1]["consistent"], true);

    let out = portalloc(&ep, &["release", "shared/mongo:27017"]);
    assert_eq!(stdout(&out), "20000\n");
    let out = portalloc(&ep, &["get", "shared/mongo:27017"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("shared/mongo:27017/tcp has no port"),
        "{}",
        stderr(&out)
    );
    let out = portalloc(&ep, &["release", "shared/mongo:27017"]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("nothing to release"));
}

#[tokio::test]
async fn invalid_input_exits_2_names_the_value_and_writes_nothing() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let table: &[(&[&str], &str)] = &[
        (
            &["alloc", "Shared/Mongo:80"],
            "invalid stack name \"Shared\"",
        ),
        (&["alloc", "shared/../x:80"], "invalid job name \"../x\""),
        (&["alloc", "shared/mongo:0"], "invalid port \"0\""),
        (&["alloc", "shared/mongo:70000"], "invalid port \"70000\""),
        (
            &["alloc", "a/b:80/sctp"],
            "invalid protocol \"sctp\": use tcp or udp",
        ),
        (
            &["alloc", "ok/fine:80", "a/b:80/sctp"],
            "invalid protocol \"sctp\"",
        ),
        (
            &["--range", "30000-20000", "alloc", "a/b:80"],
            "invalid port range \"30000-20000\"",
        ),
        (
            &["--prefix", "viking", "alloc", "a/b:80"],
            "invalid key prefix \"viking\"",
        ),
        (&["alloc"], "required"),
    ];
    for (args, message) in table {
        let out = portalloc(&ep, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    let mut client: Client = etcd.client().await;
    assert_eq!(count_keys(&mut client, "").await, 0, "bad input wrote keys");
}

#[tokio::test]
async fn unreachable_etcd_exits_1_and_says_what_to_do() {
    let port = testkit::free_ports(1)[0];
    let ep = format!("http://127.0.0.1:{port}");
    let out = portalloc(
        &ep,
        &["--etcd-timeout", "1s", "alloc", "shared/mongo:27017"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot reach etcd at {ep}")), "{err}");
    assert!(err.contains("pass --etcd or set VIKING_ETCD"), "{err}");
}

#[tokio::test]
async fn exhausted_range_exits_1_naming_the_range() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let out = portalloc(&ep, &["--range", "31000-31001", "alloc", "a/b:1", "a/c:1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = portalloc(&ep, &["--range", "31000-31001", "alloc", "a/d:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no free ambassador port left in range 31000-31001"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

#[tokio::test]
async fn repair_fixes_a_hand_broken_state() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let mut client = etcd.client().await;
    let out = portalloc(&ep, &["alloc", "s/a:80", "s/b:80", "s/c:80"]);
    assert_eq!(stdout(&out), "20000\n20001\n20002\n");
    // Break it by hand, the ways an operator or an older tool would.
    client
        .delete("/viking/ports/owner/20000", None)
        .await
        .unwrap(); // owner lost
    client
        .put("/viking/ports/owner/20001", "x/y:1/tcp", None)
        .await
        .unwrap(); // wrong owner
    client
        .put("/viking/ports/alloc/s/c/80-tcp", r#"{"port":20001}"#, None)
        .await
        .unwrap(); // double claim
    client
        .put("/viking/ports/owner/20007", "s/d:80/tcp", None)
        .await
        .unwrap(); // owner without alloc
    client
        .put("/viking/ports/next", "20001", None)
        .await
        .unwrap(); // counter behind

    let out = portalloc(&ep, &["list"]);
    assert!(stdout(&out).contains("inconsistent"), "{}", stdout(&out));

    let out = portalloc(&ep, &["repair", "--dry-run"]);
    let dry = stdout(&out);
    assert!(dry.contains("would fix: "), "{dry}");
    let out = portalloc(&ep, &["repair"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fixed = stdout(&out);
    assert_eq!(fixed.replace("fixed: ", ""), dry.replace("would fix: ", ""));
    for line in [
        "fixed: created owner of port 20000 for s/a:80/tcp (it was missing)",
        "fixed: owner of port 20001 set to s/b:80/tcp (was \"x/y:1/tcp\")",
        "fixed: moved s/c:80/tcp from port 20001 (held by s/b:80/tcp) to port 20002",
        "fixed: restored allocation s/d:80/tcp -> 20007 from its owner key",
        "fixed: set the counter to 20008 (was \"20001\")",
    ] {
        assert!(
            fixed.lines().any(|l| l == line),
            "missing {line:?} in:\n{fixed}"
        );
    }
    let out = portalloc(&ep, &["list"]);
    assert_eq!(
        stdout(&out),
        "20000\ts/a:80/tcp\n20001\ts/b:80/tcp\n20002\ts/c:80/tcp\n20007\ts/d:80/tcp\n"
    );
    let out = portalloc(&ep, &["repair"]);
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("nothing to repair"));
    // Allocation carries on past the repaired counter.
    let out = portalloc(&ep, &["alloc", "s/e:80"]);
    assert_eq!(stdout(&out), "20008\n");
}

#[tokio::test]
async fn a_port_whose_owner_key_was_lost_is_not_handed_out_again() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let mut c = etcd.client().await;
    let range = ["--range", "31000-31002"];
    let out = portalloc(
        &ep,
        &[&range[..], &["alloc", "s/a:1", "s/d2:1", "s/c:1"]].concat(),
    );
    assert_eq!(stdout(&out), "31000\n31001\n31002\n", "{}", stderr(&out));
    c.delete("/viking/ports/owner/31001", None).await.unwrap();
    // The range is full: the allocator scans all of it and must see that s/d2 holds 31001.
    let out = portalloc(&ep, &[&range[..], &["alloc", "s/new2:1"]].concat());
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("no free ambassador port left in range 31000-31002"),
        "{}",
        stderr(&out)
    );
    let out = portalloc(&ep, &[&range[..], &["repair"]].concat());
    assert_eq!(
        stdout(&out),
        "fixed: created owner of port 31001 for s/d2:1/tcp (it was missing)\n"
    );
}

#[tokio::test]
async fn repair_moves_the_newcomer_and_never_the_original_holder() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let mut c = etcd.client().await;
    let out = portalloc(&ep, &["alloc", "s/d2:1"]);
    assert_eq!(stdout(&out), "20000\n");
    // What an allocator without the alloc-side check did after the owner key was lost: the
    // newcomer took the port and wrote an owner key naming itself.
    c.put(
        "/viking/ports/alloc/s/new2/1-tcp",
        r#"{"v":1,"port":20000}"#,
        None,
    )
    .await
    .unwrap();
    c.put("/viking/ports/owner/20000", "s/new2:1/tcp", None)
        .await
        .unwrap();
    let out = portalloc(&ep, &["repair"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fixed = stdout(&out);
    for line in [
        "fixed: owner of port 20000 set to s/d2:1/tcp (was \"s/new2:1/tcp\")",
        "fixed: moved s/new2:1/tcp from port 20000 (held by s/d2:1/tcp) to port 20001",
    ] {
        assert!(
            fixed.lines().any(|l| l == line),
            "missing {line:?} in:\n{fixed}"
        );
    }
    let out = portalloc(&ep, &["list"]);
    assert_eq!(stdout(&out), "20000\ts/d2:1/tcp\n20001\ts/new2:1/tcp\n");
}

#[tokio::test]
async fn repair_reports_an_allocation_outside_the_range_instead_of_blessing_it() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let mut c = etcd.client().await;
    // A hand-written (or stray) value: port 22, outside the default range.
    c.put(
        "/viking/ports/alloc/s/x/80-tcp",
        r#"{"v":1,"port":22}"#,
        None,
    )
    .await
    .unwrap();
    let out = portalloc(&ep, &["repair"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "not fixed: /viking/ports/alloc/s/x/80-tcp holds port 22 outside the range 20000-29999"
        ),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot fix"),
        "{out:?}"
    );
    let owner = c.get("/viking/ports/owner/22", None).await.unwrap();
    assert!(
        owner.kvs().is_empty(),
        "repair created an owner key for port 22"
    );
}

#[tokio::test]
async fn a_range_below_1024_is_refused_and_one_in_the_ephemeral_ports_warned_about() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let out = portalloc(&ep, &["--range", "53-54", "alloc", "s/a:1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("--range 53-54 reaches below 1024"),
        "{}",
        stderr(&out)
    );
    let out = portalloc(&ep, &["--range", "40000-40010", "alloc", "s/a:1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("overlaps this host's ephemeral ports"),
        "{}",
        stderr(&out)
    );
    let out = portalloc(&ep, &["alloc", "s/b:1"]);
    assert!(
        !stderr(&out).contains("ephemeral"),
        "the default range is not warned about"
    );
}
