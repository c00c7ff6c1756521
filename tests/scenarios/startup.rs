//! One start-up per daemon: `viking up` runs the ambassador and the registrator through the
//! same `check` and `start` as their own binaries, so the same bad flag or busy port gives the
//! same message and exit status from each, and a start-up error is a JSON log line when logs
//! are JSON.

use std::net::TcpListener;
use std::process::Output;
use std::time::Duration;

use testkit::Etcd;

/// Runs a workspace binary against `etcd`, the caller's `VIKING_*` env removed.
fn run(bin: &str, etcd: &str, args: &[&str]) -> Output {
    testkit::run_cli(
        testkit::workspace_bin(bin).to_str().expect("utf-8"),
        etcd,
        args,
    )
}

/// (exit status, message without the program's name).
fn failure(bin: &str, out: &Output) -> (Option<i32>, String) {
    let stderr = testkit::stderr(out);
    let line = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "{}: ",
                if bin == "viking" { "viking" } else { bin }
            ))
        })
        .unwrap_or_else(|| panic!("{bin} printed no error line: {stderr}"))
        .to_owned();
    (out.status.code(), line)
}

/// A loopback URL where nothing answers: the checks must fail before etcd is needed.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", testkit::free_ports(1)[0])
}

/// The daemon's own binary and `viking up` with the same flags fail alike; returns the message.
fn same_failure(daemon: &str, etcd: &str, flags: &[&str]) -> String {
    let own = run(daemon, etcd, flags);
    let mut up_args = vec!["up"];
    up_args.extend_from_slice(flags);
    let up = run("viking", etcd, &up_args);
    let (own_code, own_text) = failure(daemon, &own);
    let (up_code, up_text) = failure("viking", &up);
    assert_eq!(own_code, Some(2), "{daemon} {flags:?}: {own_text}");
    assert_eq!(
        (up_code, &up_text),
        (own_code, &own_text),
        "viking up {flags:?} and {daemon} {flags:?} disagree"
    );
    own_text
}

/// Flags both the ambassador and `viking up` accept, with `extra` after them.
fn ambassador_flags(extra: &[&'static str]) -> Vec<&'static str> {
    let mut flags = vec!["--host", "h1", "--bind", "127.0.0.1", "--dns", "off"];
    flags.extend_from_slice(extra);
    flags
}

#[test]
fn no_threads_is_the_same_error_from_the_ambassador_and_viking_up() {
    let text = same_failure(
        "ambassador",
        &nowhere(),
        &ambassador_flags(&["--threads", "0"]),
    );
    assert!(
        text.contains("--threads 0") && text.contains("--threads 1 or more"),
        "{text}"
    );
}

#[test]
fn an_unknown_congestion_control_is_the_same_error_from_the_ambassador_and_viking_up() {
    let text = same_failure(
        "ambassador",
        &nowhere(),
        &ambassador_flags(&["--local-congestion", "no-such-cc"]),
    );
    assert!(
        text.contains("--local-congestion no-such-cc: the kernel does not offer it"),
        "{text}"
    );
    assert!(text.contains("offered here:"), "{text}");
}

#[test]
fn a_bad_dns_address_is_the_same_error_from_the_ambassador_and_viking_up() {
    let text = same_failure(
        "ambassador",
        &nowhere(),
        &["--host", "h1", "--bind", "127.0.0.1", "--dns", "here"],
    );
    assert!(
        text.contains("--dns \"here\": expected ADDR:PORT"),
        "{text}"
    );
}

#[test]
fn a_short_ttl_is_the_same_error_from_the_registrator_and_viking_up() {
    // viking up checks the ambassador's flags too: give it ones that pass.
    let own = run(
        "registrator",
        &nowhere(),
        &["--host", "h1", "--addr", "127.0.0.1", "--ttl", "500ms"],
    );
    let up = run(
        "viking",
        &nowhere(),
        &[
            "up",
            "--host",
            "h1",
            "--bind",
            "127.0.0.1",
            "--dns",
            "off",
            "--addr",
            "127.0.0.1",
            "--ttl",
            "500ms",
        ],
    );
    let (own_code, own_text) = failure("registrator", &own);
    assert_eq!(own_code, Some(2), "{own_text}");
    assert_eq!(failure("viking", &up), (own_code, own_text.clone()));
    assert!(own_text.contains("--ttl 500ms is too short"), "{own_text}");
}

#[test]
fn a_bad_host_id_is_the_same_error_from_all_three() {
    let etcd = nowhere();
    let texts: Vec<(Option<i32>, String)> = [
        ("ambassador", vec!["--host=bad_host", "--bind", "127.0.0.1"]),
        (
            "registrator",
            vec!["--host=bad_host", "--addr", "127.0.0.1"],
        ),
        (
            "viking",
            vec!["up", "--host=bad_host", "--bind", "127.0.0.1"],
        ),
    ]
    .iter()
    .map(|(bin, args)| failure(bin, &run(bin, &etcd, args)))
    .collect();
    assert_eq!(texts[0].0, Some(2), "{:?}", texts[0]);
    assert!(texts.iter().all(|t| t == &texts[0]), "{texts:#?}");
    assert!(texts[0].1.ends_with("; pass --host"), "{:?}", texts[0]);
}

#[tokio::test]
async fn a_busy_admin_port_is_the_same_error_from_the_ambassador_and_viking_up() {
    // viking up binds the admin port after it has found etcd: give it one.
    let etcd = Etcd::start().await;
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = busy.local_addr().unwrap().to_string();
    let flags = [
        "--host",
        "h1",
        "--bind",
        "127.0.0.1",
        "--dns",
        "off",
        "--admin",
        &admin,
    ];
    let own = run("ambassador", &etcd.endpoint(), &flags);
    let mut up_flags = vec!["up", "--addr", "127.0.0.1"];
    up_flags.extend_from_slice(&flags);
    let up = run("viking", &etcd.endpoint(), &up_flags);
    let (own_code, own_text) = failure("ambassador", &own);
    assert_eq!(own_code, Some(2), "{own_text}");
    assert_eq!(failure("viking", &up), (own_code, own_text.clone()));
    assert!(
        own_text.starts_with(&format!("cannot listen on --admin {admin}: "))
            && own_text.ends_with("; pick another address"),
        "{own_text}"
    );
}

#[test]
fn a_start_up_error_is_a_json_line_when_logs_are_json() {
    let out = std::process::Command::new(testkit::workspace_bin("ambassador"))
        .args([
            "--etcd",
            &nowhere(),
            "--host",
            "h1",
            "--bind",
            "127.0.0.1",
            "--threads",
            "0",
        ])
        .env("VIKING_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = testkit::stderr(&out);
    let line: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["fields"]["exit_code"], 2, "{line}");
    let message = line["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--threads 0"), "{line}");
}

#[tokio::test]
async fn a_second_ambassador_on_the_same_bind_address_refuses_to_start_and_names_the_first() {
    let etcd = Etcd::start().await;
    let locks = tempfile::tempdir().unwrap();
    let run_dir = locks.path().to_str().unwrap();
    let [first_admin, second_admin] = testkit::free_ports(2)[..] else {
        unreachable!()
    };
    let first_admin = format!("127.0.0.1:{first_admin}");
    let second_admin = format!("127.0.0.1:{second_admin}");
    let flags = |admin: &str| {
        let mut f = vec!["--etcd".to_owned(), etcd.endpoint()];
        for x in [
            "--host",
            "h1",
            "--bind",
            "127.0.0.1",
            "--dns",
            "off",
            "--run-dir",
            run_dir,
            "--admin",
            admin,
        ] {
            f.push(x.to_owned());
        }
        f
    };
    let mut first =
        testkit::Daemon::spawn(testkit::workspace_bin("ambassador"), &flags(&first_admin));
    first.wait_log("admin listening on", Duration::from_secs(20));

    // Another admin address changes nothing: the bind address is what they would share.
    let second = run(
        "ambassador",
        &etcd.endpoint(),
        &flags(&second_admin)[2..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let (code, text) = failure("ambassador", &second);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!("pid {}", first.pid())) && text.contains(&first_admin),
        "names the running one: {text}"
    );
    assert!(text.contains("already serves --bind 127.0.0.1"), "{text}");
    let mut up = vec!["up", "--addr", "127.0.0.1"];
    let second_flags = flags(&second_admin);
    up.extend(second_flags[2..].iter().map(String::as_str));
    assert_eq!(
        failure("viking", &run("viking", &etcd.endpoint(), &up)),
        (code, text)
    );

    // Once the first is gone, the address is free.
    first.kill();
    let mut again =
        testkit::Daemon::spawn(testkit::workspace_bin("ambassador"), &flags(&second_admin));
    again.wait_log("admin listening on", Duration::from_secs(20));
}
