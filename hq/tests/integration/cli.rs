//! The `viking` command against a real etcd.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::GetOptions;
use testkit::Etcd;

use crate::{fixtures, stderr, stdout, viking};

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn env_of(ep: &str, service: &str) -> BTreeMap<String, String> {
    let out = viking(ep, &["env", service, "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Checks `web`'s env: exactly Docker's link names for each link, plus `<P>_PORT_<n>`.
fn assert_web_env(env: &BTreeMap<String, String>, ports: &BTreeMap<String, String>) {
    for (prefix, service, port) in [
        ("SHARED_MONGO", "shared/mongo", 27017),
        ("SHARED_AUTH", "shared/auth", 80),
        ("MIDDLEWARE", "app/middleware", 80),
    ] {
        let n = &ports[&format!("{service}:{port}/tcp")];
        let link_name = if service.starts_with("app/") {
            "middleware"
        } else {
            &service.replace('/', "_")
        };
        let want: BTreeMap<String, String> = [
            (format!("{prefix}_NAME"), format!("/app_web/{link_name}")),
            (format!("{prefix}_PORT"), format!("tcp://172.17.0.1:{n}")),
            (format!("{prefix}_PORT_{port}"), format!("172.17.0.1:{n}")),
            (
                format!("{prefix}_PORT_{port}_TCP"),
                format!("tcp://172.17.0.1:{n}"),
            ),
            (
                format!("{prefix}_PORT_{port}_TCP_ADDR"),
                "172.17.0.1".to_owned(),
            ),
            (format!("{prefix}_PORT_{port}_TCP_PORT"), n.clone()),
            (format!("{prefix}_PORT_{port}_TCP_PROTO"), "tcp".to_owned()),
        ]
        .into_iter()
        .collect();
        let got: BTreeMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{prefix}_")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(got, want, "{prefix}");
    }
    assert_eq!(env.len(), 21, "{env:#?}");
}

fn ports(ep: &str) -> BTreeMap<String, String> {
    let out = viking(ep, &["ports"]);
    stdout(&out)
        .lines()
        .map(|l| {
            let (port, sp) = l.split_once('\t').unwrap();
            (sp.to_owned(), port.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn design_notes_stacks_deploy_in_either_order_and_together() {
    let f = fixtures();
    let (shared, app) = (f.join("shared"), f.join("app"));

    // shared first, then app.
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let out = viking(&ep, &["deploy", path(&shared)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "shared: created mongo, auth\n");
    let out = viking(&ep, &["deploy", path(&app)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app: created middleware, web\n");
    let first = ports(&ep);
    assert_web_env(&env_of(&ep, "app/web"), &first);

    // app first: refused, naming the missing stack; nothing written.
    let etcd2 = Etcd::start().await;
    let ep2 = etcd2.endpoint();
    let out = viking(&ep2, &["deploy", path(&app)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("app/stack.yml:7:5: job middleware links to shared/mongo, but stack shared is not deployed; deploy it first"), "{err}");
    let mut c = etcd2.client().await;
    assert_eq!(
        c.get("", Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .unwrap()
            .count(),
        0
    );
    // Then together, app named first: the order inside the command does not matter.
    let out = viking(&ep2, &["deploy", path(&app), path(&shared)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "shared: created mongo, auth\napp: created middleware, web\n"
    );
    assert_web_env(&env_of(&ep2, "app/web"), &ports(&ep2));

    // Re-deploying the same files changes nothing, not even a revision.
    let rev = |resp: etcd_client::GetResponse| resp.header().unwrap().revision();
    let before = rev(c.get("x", None).await.unwrap());
    let out = viking(&ep2, &["deploy", path(&app), path(&shared)]);
    assert_eq!(
        stdout(&out),
        "shared: unchanged mongo, auth\napp: unchanged middleware, web\n"
    );
    assert_eq!(rev(c.get("x", None).await.unwrap()), before);
}

#[tokio::test]
async fn changes_update_only_what_changed_and_ports_stay() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let out = viking(
        &ep,
        &["deploy", path(&f.join("shared")), path(&f.join("app"))],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let before = ports(&ep);

    // Edit app: web scales to 3, middleware gains an env var exported to web.
    let app = dir.path().join("app");
    std::fs::create_dir(&app).unwrap();
    let text = std::fs::read_to_string(f.join("app/stack.yml")).unwrap();
    let text = text.replace(
        "middleware:\n\ttype: job\n",
        "middleware:\n\ttype: job\n\tenv:\n\t\tMODE: fast\n\texport_env:\n\t\t- MODE\n",
    );
    let text = text.replace("web:\n\ttype: job\n", "web:\n\ttype: job\n\tscale: 3\n");
    std::fs::write(app.join("stack.yml"), text).unwrap();
    let out = viking(&ep, &["deploy", path(&app)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app: updated middleware, web\n");
    assert_eq!(ports(&ep), before, "ports are stable across re-deploys");
    let env = env_of(&ep, "app/web");
    assert_eq!(env["MIDDLEWARE_ENV_MODE"], "fast");

    // The export -> edit -> apply round trip.
    let deploy_dir = dir.path().join("deploy");
    let out = viking(&ep, &["export", "app", path(&deploy_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let web = deploy_dir.join("app/web.yaml");
    let text = std::fs::read_to_string(&web).unwrap();
    assert!(text.contains("scale: 3"), "{text}");
    std::fs::write(&web, text.replace("scale: 3", "scale: 5")).unwrap();
    let out = viking(&ep, &["apply", path(&deploy_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app: updated web; unchanged middleware\n");
    let out = viking(&ep, &["ps", "app", "--output", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[1]["service"], "app/web");
    assert_eq!(rows[1]["scale"], 5);
    assert_eq!(
        rows[0]["ambassador_ports"][0],
        format!("80/tcp={}", before["app/middleware:80/tcp"])
    );

    // A hand edit that breaks the rules is refused with its place, and changes nothing.
    std::fs::write(&web, "image: x\nlink: [nosuch]\n").unwrap();
    let out = viking(&ep, &["apply", path(&deploy_dir)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("web.yaml:2:8: job web links to nosuch, which is not a job of stack app"),
        "{}",
        stderr(&out)
    );

    // rm: refused while linked to, then allowed; ports released.
    let out = viking(&ep, &["rm", "shared"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stack shared is linked to by app/middleware -> shared/mongo"),
        "{}",
        stderr(&out)
    );
    // --force removes shared while app links to it, but keeps the ports app's env points at.
    let out = viking(&ep, &["rm", "shared", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "removed shared; released ports: none\n");
    let out = viking(&ep, &["deploy", path(&f.join("shared"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ports(&ep),
        before,
        "the same ports again after re-deploying shared"
    );
    let out = viking(&ep, &["rm", "app"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "removed app; released ports: {}\n",
            before["app/middleware:80/tcp"]
        )
    );
    let out = viking(&ep, &["rm", "shared"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ports(&ep).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_deploys_share_one_port_per_service_port() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let out = viking(&ep, &["deploy", path(&fixtures().join("shared"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let file = dir.path().join(format!("app{i}.yml"));
        std::fs::write(
            &file,
            "web:\n\timage: x\n\tlink:\n\t\t- shared/mongo\n\t\t- shared/auth\n",
        )
        .unwrap();
        let ep = ep.clone();
        tasks.spawn_blocking(move || {
            let out = viking(&ep, &["deploy", file.to_str().unwrap()]);
            assert!(out.status.success(), "{}", stderr(&out));
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let all = ports(&ep);
    assert_eq!(all.len(), 2, "{all:?}");
    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let env = env_of(&ep, &format!("app{i}/web"));
        seen.insert((
            env["SHARED_MONGO_PORT_27017_TCP_PORT"].clone(),
            env["SHARED_AUTH_PORT_80_TCP_PORT"].clone(),
        ));
    }
    assert_eq!(seen.len(), 1, "env differs between stacks: {seen:?}");
    let (mongo, auth) = seen.into_iter().next().unwrap();
    assert_eq!(mongo, all["shared/mongo:27017/tcp"]);
    assert_eq!(auth, all["shared/auth:80/tcp"]);
}

#[tokio::test]
async fn bad_input_exits_2_with_its_place_and_writes_nothing() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "mixed.yml",
            "a:\n\timage: x\n  \tports: [1]\n",
            "mixed.yml:3:3: indentation mixes tabs and spaces",
        ),
        (
            "badname.yml",
            "Web:\n  image: x\n",
            "badname.yml:1:1: invalid job name \"Web\"",
        ),
        ("badyaml.yml", "a:\n  image: [x\n", "badyaml.yml:2:10: "),
        (
            "unknown.yml",
            "a:\n  image: x\n  volumes: [/d]\n",
            "unknown.yml:3:3: unknown field `volumes`",
        ),
        (
            "cycle.yml",
            "a:\n  image: x\n  ports: [1]\n  link: [b]\nb:\n  image: y\n  ports: [2]\n  link: [a]\n",
            "cycle.yml:4:10: link cycle: cycle/a -> cycle/b -> cycle/a",
        ),
    ];
    for (name, text, want) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = viking(&ep, &["deploy", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{name}: {}", stderr(&out));
    }
    let out = viking(
        &ep,
        &[
            "deploy",
            dir.path().join("mixed.yml").to_str().unwrap(),
            "--name",
            "Bad_Name",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid stack name \"Bad_Name\""),
        "{}",
        stderr(&out)
    );
    let mut c = etcd.client().await;
    assert_eq!(
        c.get("", Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn hosts_add_list_remove() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    assert!(
        viking(
            &ep,
            &["host", "add", "node-1", "10.0.0.1", "--role", "router"]
        )
        .status
        .success()
    );
    assert!(
        viking(&ep, &["host", "add", "node-2", "10.0.0.2"])
            .status
            .success()
    );
    let out = viking(&ep, &["host", "ls"]);
    assert_eq!(
        stdout(&out),
        "HOST\tADDR\tROLES\tALIVE\tSTATE\tCPUS\tMEMORY\tINSTANCES\tLABELS\n\
         node-1\t10.0.0.1\trouter\t-\tno launcher\t0/0\t0B/0B\t0\t-\n\
         node-2\t10.0.0.2\t-\t-\tno launcher\t0/0\t0B/0B\t0\t-\n"
    );
    // Labels: at add, then set and removed; a bad one is refused naming it.
    let out = viking(&ep, &["host", "label", "node-2", "role=db", "zone=a"]);
    assert_eq!(stdout(&out), "node-2: role=db,zone=a\n", "{}", stderr(&out));
    let out = viking(&ep, &["host", "label", "node-2", "zone-"]);
    assert_eq!(stdout(&out), "node-2: role=db\n");
    let out = viking(&ep, &["host", "label", "node-2", "bad label=x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("\"bad label=x\""), "{}", stderr(&out));
    let out = viking(&ep, &["host", "label", "node-9", "role=db"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("node-9 is not a member"),
        "{}",
        stderr(&out)
    );
    let out = viking(
        &ep,
        &["host", "add", "node-4", "10.0.0.4", "--label", "role=web"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = viking(&ep, &["--output", "json", "host", "ls"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[2]["host"], "node-4");
    assert_eq!(rows[2]["labels"]["role"], "web");
    assert!(viking(&ep, &["host", "rm", "node-4"]).status.success());
    let out = viking(&ep, &["host", "add", "Node_3", "10.0.0.3"]);
    assert_eq!(out.status.code(), Some(2));
    for special in [
        "0.0.0.0",
        "255.255.255.255",
        "127.0.0.1",
        "::ffff:10.250.0.1",
    ] {
        let out = viking(&ep, &["host", "add", "node-3", special]);
        assert_eq!(out.status.code(), Some(2), "{special}: {}", stderr(&out));
        assert!(stderr(&out).contains(special), "{}", stderr(&out));
    }
    let out = viking(&ep, &["host", "add", "node-3", "10.0.0.300"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(viking(&ep, &["host", "rm", "node-1"]).status.success());
    let out = viking(&ep, &["host", "rm", "node-1"]);
    assert_eq!(out.status.code(), Some(1));
    let out = viking(&ep, &["host", "ls", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["host"], "node-2");
    assert_eq!(v.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn one_unreadable_job_key_stops_only_its_own_stack_and_rm_removes_it() {
    let f = fixtures();
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let out = viking(
        &ep,
        &["deploy", path(&f.join("shared")), path(&f.join("app"))],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut c = etcd.client().await;
    c.put("/viking/stacks/x/meta", r#"{"v":1,"name":"x"}"#, None)
        .await
        .unwrap();
    c.put("/viking/stacks/x/jobs/y", "garbage", None)
        .await
        .unwrap();

    // Every command about other stacks works, and says which key it left out.
    for args in [
        &["ps"][..],
        &["ps", "app"],
        &["env", "app/web"],
        &["graph"],
        &["stacks"],
    ] {
        let out = viking(&ep, args);
        assert!(out.status.success(), "viking {args:?}: {}", stderr(&out));
    }
    let out = viking(&ep, &["ps"]);
    assert!(
        stderr(&out).contains("/viking/stacks/x/jobs/y"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("app/web"), "{}", stdout(&out));
    let out = viking(&ep, &["deploy", path(&f.join("shared"))]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Its own stack: run refuses, naming the key; rm removes it.
    let out = viking(&ep, &["run", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be read (/viking/stacks/x/jobs/y)"),
        "{}",
        stderr(&out)
    );
    let out = viking(&ep, &["rm", "x"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let left = c
        .get("/viking/stacks/x/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "rm left {:?}", left.kvs());
}

#[tokio::test]
async fn a_hand_edited_spec_is_checked_like_a_stack_file_before_anything_runs() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let mut c = etcd.client().await;
    c.put("/viking/stacks/x/meta", r#"{"v":1,"name":"x"}"#, None)
        .await
        .unwrap();
    // Valid JSON, but a spec no stack file could produce.
    let spec = r#"{"v":1,"stack":"x","job":"big","image":"busybox","scale":5000}"#;
    c.put("/viking/stacks/x/jobs/big", spec, None)
        .await
        .unwrap();
    let env = r#"{"v":1,"stack":"x","job":"env","image":"","env":{"A=B":"1"}}"#;
    c.put("/viking/stacks/x/jobs/env", env, None).await.unwrap();
    let out = viking(&ep, &["run", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("/viking/stacks/x/jobs/big: scale 5000 is out of range"),
        "{err}"
    );
    assert!(
        err.contains("/viking/stacks/x/jobs/env: image \"\" is empty"),
        "{err}"
    );
    assert!(err.contains("nothing was started"), "{err}");
}

#[tokio::test]
async fn a_deploy_too_big_for_one_transaction_is_refused_before_any_port_is_allocated() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    // 140 jobs, each exposing a port that another links to: 140 writes and allocations.
    let mut text = String::new();
    for i in 0..140 {
        text.push_str(&format!("j{i}:\n  image: x\n  ports: [80]\n"));
        if i > 0 {
            text.push_str(&format!("  link: [j{}]\n", i - 1));
        }
    }
    std::fs::write(dir.path().join("stack.yml"), text).unwrap();
    let out = viking(
        &ep,
        &["deploy", dir.path().to_str().unwrap(), "--name", "big"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("one etcd transaction of 143 compares (140 jobs, 1 stack metas"),
        "{err}"
    );
    assert!(err.contains("deploy at most 125 jobs at once"), "{err}");
    let mut c = etcd.client().await;
    let keys = c
        .get(
            "/viking/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(keys, 0, "nothing allocated or written");
    // With etcd's limit raised (and told), it fits.
    let etcd2 = Etcd::start_with(&["--max-txn-ops", "1024"]).await;
    let out = viking(
        &etcd2.endpoint(),
        &[
            "--max-txn-ops",
            "1024",
            "deploy",
            dir.path().to_str().unwrap(),
            "--name",
            "big",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `viking rm lone` racing `viking deploy` of a stack that links to `lone/db`: exactly one
/// wins, every time, and what is left is consistent (no link to a removed stack, no port held
/// by a stack that does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_racing_a_deploy_that_links_to_it_lets_exactly_one_win() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("lone.yml");
    std::fs::write(&lone, "db:\n  image: x\n  ports: [5432]\n").unwrap();
    let linker = dir.path().join("linker.yml");
    std::fs::write(&linker, "app:\n  image: x\n  link: [lone/db]\n").unwrap();
    let (mut rm_won, mut deploy_won) = (0, 0);
    for round in 0..30 {
        let out = viking(&ep, &["deploy", path(&lone), "--name", "lone"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let (ep1, ep2, linker) = (ep.clone(), ep.clone(), linker.clone());
        // The remove starts a little later each round, so that it lands before, inside and
        // after the deploy's read-allocate-write.
        let delay = std::time::Duration::from_millis(round % 10 * 4);
        let rm = tokio::task::spawn_blocking(move || {
            std::thread::sleep(delay);
            viking(&ep1, &["rm", "lone"])
        });
        let deploy = tokio::task::spawn_blocking(move || {
            viking(&ep2, &["deploy", path(&linker), "--name", "linker"])
        });
        let (rm, deploy) = (rm.await.unwrap(), deploy.await.unwrap());
        let stacks = stdout(&viking(&ep, &["stacks"]));
        let allocated = ports(&ep);
        match (rm.status.success(), deploy.status.success()) {
            (true, false) => {
                rm_won += 1;
                assert!(
                    stderr(&deploy).contains("lone/db"),
                    "round {round}: {}",
                    stderr(&deploy)
                );
                assert!(
                    !stacks.contains("lone") && !stacks.contains("linker"),
                    "{stacks}"
                );
                assert!(
                    allocated.is_empty(),
                    "round {round}: ports left: {allocated:?}"
                );
            }
            (false, true) => {
                deploy_won += 1;
                assert!(
                    stderr(&rm).contains("linked to by linker/app -> lone/db"),
                    "round {round}: {}",
                    stderr(&rm)
                );
                assert!(
                    stacks.contains("lone") && stacks.contains("linker"),
                    "{stacks}"
                );
                assert_eq!(allocated.len(), 1, "round {round}: {allocated:?}");
                let out = viking(&ep, &["rm", "linker"]);
                assert!(out.status.success(), "{}", stderr(&out));
                let out = viking(&ep, &["rm", "lone"]);
                assert!(out.status.success(), "{}", stderr(&out));
            }
            (r, d) => panic!(
                "round {round}: rm {r}, deploy {d}: exactly one must win\nrm: {}\ndeploy: {}",
                stderr(&rm),
                stderr(&deploy)
            ),
        }
    }
    eprintln!("rm won {rm_won}, deploy won {deploy_won}");
}

#[tokio::test]
async fn a_deploy_that_fails_after_allocating_releases_its_ports() {
    // Small requests: the allocation fits, the deploy's transaction (with a 40 KB env) does not.
    let etcd = Etcd::start_with(&["--max-request-bytes", "32768"]).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let big = "x".repeat(40_000);
    std::fs::write(
        dir.path().join("stack.yml"),
        format!("db:\n  image: x\n  ports: [5432]\napp:\n  image: x\n  link: [db]\n  env:\n    BIG: {big}\n"),
    )
    .unwrap();
    let out = viking(&ep, &["deploy", path(dir.path()), "--name", "big"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("released the ports it had allocated"),
        "{}",
        stderr(&out)
    );
    assert!(ports(&ep).is_empty(), "{:?}", ports(&ep));
}

#[tokio::test]
async fn rm_of_a_stack_that_is_not_deployed_releases_the_ports_it_still_holds() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let mut c = etcd.client().await;
    // What a deploy that failed half-way left behind (before deploys cleaned up after
    // themselves): an allocation for a stack that does not exist.
    c.put(
        "/viking/ports/alloc/ghost/db/5432-tcp",
        r#"{"v":1,"port":20000}"#,
        None,
    )
    .await
    .unwrap();
    c.put("/viking/ports/owner/20000", "ghost/db:5432/tcp", None)
        .await
        .unwrap();
    let out = viking(&ep, &["rm", "ghost"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "ghost was not deployed; released the ports a failed deploy left allocated: 20000\n"
    );
    assert!(ports(&ep).is_empty());
    let out = viking(&ep, &["rm", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stack ghost is not deployed and holds no ports"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn rollback_puts_back_the_spec_the_last_deploy_replaced_keeping_the_scale() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stack.yml");
    let write = |image: &str| {
        std::fs::write(&file, format!("web:\n  image: {image}\n  scale: 2\n")).unwrap();
    };
    write("web:1");
    assert!(
        viking(&ep, &["deploy", path(&file), "--name", "s"])
            .status
            .success()
    );
    let out = viking(&ep, &["rollback", "s/web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("s/web has no previous spec"),
        "{}",
        stderr(&out)
    );
    write("web:2");
    assert!(
        viking(&ep, &["deploy", path(&file), "--name", "s"])
            .status
            .success()
    );
    assert!(viking(&ep, &["scale", "s/web", "5"]).status.success());
    // A scale the job's own check would refuse is refused before anything is written (it
    // was written, and the job then left out everywhere as broken).
    let out = viking(&ep, &["scale", "s/web", "100000"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("'100000'") && stderr(&out).contains("from 0 to 1000"),
        "{}",
        stderr(&out)
    );
    let out = viking(&ep, &["rollback", "s/web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let image = |ep: &str| {
        let out = viking(ep, &["--output", "json", "ps", "s"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            rows[0]["image"].as_str().unwrap().to_owned(),
            rows[0]["scale"].as_u64().unwrap(),
        )
    };
    assert_eq!(
        image(&ep),
        ("web:1".to_owned(), 5),
        "the previous spec, at the current scale"
    );
    // Again: back to web:2.
    assert!(viking(&ep, &["rollback", "s/web"]).status.success());
    assert_eq!(image(&ep).0, "web:2");
    // rm takes the previous specs with it.
    assert!(viking(&ep, &["rm", "s"]).status.success());
    let mut c = etcd.client().await;
    let left = c
        .get("/viking/stacks/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "{:?}", left.kvs());
}

#[tokio::test]
async fn domains_become_routes_in_the_deploy_and_bad_domains_or_certificates_write_nothing() {
    let etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("stack.yml"), text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let shop = write(
        "shop",
        "front:\n  image: x\n  ports: [8080, 9090]\n  domains: [shop.example.com, \"*.shop.example.com\"]\n  https_redirect: true\n",
    );
    let out = viking(&ep, &["deploy", &shop]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = viking(&ep, &["routes", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(routes.as_array().unwrap().len(), 2, "{routes}");
    assert_eq!(routes[0]["domain"], "*.shop.example.com");
    assert_eq!(routes[1]["service"], "shop/front");
    assert_eq!(routes[1]["port"], 8080, "the first TCP port");
    assert_eq!(routes[1]["https_redirect"], true);

    let mut c = etcd.client().await;
    let count = |c: &mut etcd_client::Client| {
        let mut c = c.clone();
        async move {
            c.get(
                "/viking/routes/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap()
            .count()
        }
    };
    // Bad input: exit 2 naming the value, nothing written.
    for (name, text, want) in [
        (
            "bad",
            "web:\n  image: x\n  ports: [80]\n  domains: [\"exa mple.com\"]\n",
            "invalid domain \"exa mple.com\"",
        ),
        (
            "noport",
            "web:\n  image: x\n  ports: [80]\n  domains: [a.example.com]\n  http_port: 81\n",
            "http_port 81 is not one of its TCP ports (80)",
        ),
        (
            "blog",
            "web:\n  image: x\n  ports: [80]\n  domains: [blog.example.com, shop.example.com]\n",
            "domain shop.example.com of job blog/web is already routed to shop/front",
        ),
        (
            "twice",
            "a:\n  image: x\n  ports: [80]\n  domains: [t.example.com]\nb:\n  image: x\n  ports: [80]\n  domains: [t.example.com]\n",
            "domain t.example.com is also listed by twice/a",
        ),
    ] {
        let out = viking(&ep, &["deploy", &write(name, text)]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{name}: {}", stderr(&out));
    }
    assert_eq!(count(&mut c).await, 2, "nothing written");
    assert!(
        c.get(
            "/viking/stacks/blog/",
            Some(GetOptions::new().with_prefix())
        )
        .await
        .unwrap()
        .kvs()
        .is_empty(),
        "the job of a refused deploy is not written either"
    );

    // A domain dropped from the file goes; `viking rm` takes the rest.
    let shop = write(
        "shop",
        "front:\n  image: x\n  ports: [8080]\n  domains: [shop.example.com]\n",
    );
    assert!(viking(&ep, &["deploy", &shop]).status.success());
    assert_eq!(count(&mut c).await, 1);
    assert!(viking(&ep, &["rm", "shop"]).status.success());
    assert_eq!(count(&mut c).await, 0);

    // Certificates: checked before they are written.
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    testkit::certs::ca(d);
    testkit::certs::leaf(d, "a", &["a.example.com"], 10);
    testkit::certs::leaf(d, "b", &["b.example.com"], 10);
    let p = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let out = viking(
        &ep,
        &["cert", "add", "a.example.com", &p("a.crt"), &p("b.key")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the key does not fit the certificate"),
        "{}",
        stderr(&out)
    );
    let out = viking(
        &ep,
        &["cert", "add", "b.example.com", &p("a.crt"), &p("a.key")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("names a.example.com and not b.example.com"),
        "{}",
        stderr(&out)
    );
    let out = viking(
        &ep,
        &["cert", "add", "Bad Domain", &p("a.crt"), &p("a.key")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        c.get("/viking/certs/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
    let out = viking(
        &ep,
        &["cert", "add", "a.example.com", &p("a.crt"), &p("a.key")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = viking(&ep, &["cert", "ls", "--output", "json"]);
    let ls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ls[0]["domain"], "a.example.com");
    assert_eq!(ls[0]["days_left"], 9, "{ls}");
    assert!(
        viking(&ep, &["cert", "rm", "a.example.com"])
            .status
            .success()
    );
    assert_eq!(
        viking(&ep, &["cert", "rm", "a.example.com"]).status.code(),
        Some(1)
    );
}

#[test]
fn completions_for_three_shells_and_a_man_page_come_from_the_same_definition_as_help() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_viking"))
            .args(args)
            .output()
            .expect("viking");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert!(run(&["completions", "bash"]).contains("_viking()"));
    assert!(run(&["completions", "zsh"]).starts_with("#compdef viking"));
    let fish = run(&["completions", "fish"]);
    assert!(
        fish.contains("complete -c viking") && fish.contains("routes"),
        "{fish}"
    );
    let man = run(&["--man-page"]);
    assert!(man.contains(".TH viking 1"), "{man}");
    assert!(
        man.contains("routes") && man.contains("cert"),
        "every subcommand is listed"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_viking"))
        .args(["completions", "tcsh"])
        .output()
        .expect("viking");
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    assert!(
        stderr(&out).contains("bash, elvish, fish, powershell, zsh"),
        "{}",
        stderr(&out)
    );
}
