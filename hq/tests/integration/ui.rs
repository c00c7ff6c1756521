//! `viking ui` in a real browser (Debian's headless Chromium through chromedriver, driven with
//! fantoccini), against a real etcd, the real registrator, ambassador and launcher on the
//! local Docker daemon (issue 21).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::docker::{self, IMAGE};
use testkit::{Daemon, Etcd};

const LIMIT: Duration = Duration::from_secs(60);

fn port() -> u16 {
    testkit::free_ports(1)[0]
}

/// A headless Chromium session; the browser and its driver go with it.
struct Browser {
    client: Option<fantoccini::Client>,
    _driver: Daemon,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(width: u32, height: u32) -> Browser {
        for tool in ["chromium", "chromedriver"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} not found: run `make test` (scripts/setup.sh installs chromium and \
                 chromium-driver)"
            );
        }
        let driver_port = port();
        let mut driver = Daemon::spawn("chromedriver", &[format!("--port={driver_port}")]);
        driver.wait_log("ChromeDriver was started successfully", LIMIT);
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("a chromium session");
        Browser {
            client: Some(client),
            _driver: driver,
            _profile: profile,
        }
    }

    /// Ends the session: chromedriver closes the browser and reaps it.
    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }

    fn c(&self) -> &fantoccini::Client {
        self.client.as_ref().expect("session")
    }

    async fn js(&self, script: &str) -> Value {
        self.c().execute(script, vec![]).await.expect("script")
    }

    /// Polls `script` every 50 ms until it returns something truthy; how long that took.
    async fn until(&self, what: &str, script: &str) -> Duration {
        let started = Instant::now();
        loop {
            let v = self.js(script).await;
            if v.as_bool() == Some(true) || v.as_u64().is_some_and(|n| n > 0) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < LIMIT,
                "{what}: not on the page after {LIMIT:?}; it shows:\n{}",
                self.js("return document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that failed before `close`: killing chromedriver would leave its browser
        // running, so every process started with this test's profile directory goes too.
        let _ = self.client.take();
        let profile = format!("--user-data-dir={}", self._profile.path().display());
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in procs.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == profile.as_bytes())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A stack of two jobs, web linking to db, each a busybox httpd.
fn stack_dir(root: &Path, stack: &str) -> String {
    let dir = root.join(stack);
    std::fs::create_dir_all(&dir).unwrap();
    let serve = "\"hostname > /www/index.html; exec httpd -f -p 80 -h /www\"";
    std::fs::write(
        dir.join("stack.yml"),
        format!(
            "db:\n  image: {IMAGE}\n  ports: [80]\n  command: {serve}\n\
             web:\n  image: {IMAGE}\n  ports: [80]\n  link: [db]\n  command: {serve}\n"
        ),
    )
    .unwrap();
    dir.to_str().unwrap().to_owned()
}

/// A stack of 48 jobs in three tiers, as a big application has them: 4 stores, 12 services
/// linking to two stores each, 32 front ends linking to one or two services (72 links): the
/// links graph at 50 jobs with the first stack's two.
fn tiers_dir(root: &Path, stack: &str) -> String {
    let dir = root.join(stack);
    std::fs::create_dir_all(&dir).unwrap();
    let mut yml = String::new();
    let mut job = |name: String, links: Vec<String>| {
        yml.push_str(&format!("{name}:\n  image: {IMAGE}\n  ports: [80]\n"));
        if !links.is_empty() {
            yml.push_str(&format!("  link: [{}]\n", links.join(", ")));
        }
    };
    for d in 0..4 {
        job(format!("store-{d}"), vec![]);
    }
    for s in 0..12 {
        job(
            format!("service-{s:02}"),
            vec![format!("store-{}", s % 4), format!("store-{}", (s + 1) % 4)],
        );
    }
    for f in 0..32 {
        let mut links = vec![format!("service-{:02}", f % 12)];
        if f % 2 == 0 {
            links.push(format!("service-{:02}", (f + 1) % 12));
        }
        job(format!("front-end-number-{f:02}"), links);
    }
    std::fs::write(dir.join("stack.yml"), yml).unwrap();
    dir.to_str().unwrap().to_owned()
}

/// What in the links graph is drawn over something else (boxes of jobs, the labels of links),
/// and job names wider than their box.
const GRAPH_OVERLAPS: &str = "
    const boxes = [], bad = [];
    for (const g of document.querySelectorAll('#graph g.node')) {
      const r = g.querySelector('rect').getBBox();
      boxes.push(['job ' + g.dataset.job, r]);
      if (g.querySelector('text').getComputedTextLength() > r.width - 12) bad.push('name wider than its box: ' + g.dataset.job);
    }
    for (const t of document.querySelectorAll('#graph text.label'))
      boxes.push(['label ' + t.textContent + ' of ' + t.dataset.from + '>' + t.dataset.to, t.getBBox()]);
    const meet = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;
    for (let i = 0; i < boxes.length; i++)
      for (let j = i + 1; j < boxes.length; j++)
        if (meet(boxes[i][1], boxes[j][1])) bad.push(boxes[i][0] + ' over ' + boxes[j][0]);
    return bad;";

/// Removes the containers the test's launcher made, also when the test fails.
struct Containers(String);

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = docker::docker_ok(
            None,
            &[
                "ps",
                "-aq",
                "--filter",
                &format!("label=viking.host={}", self.0),
            ],
        );
        for id in ids.lines() {
            let _ = docker::docker(None, &["rm", "-f", id]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_cluster_live_in_a_real_browser() {
    docker::require(None);
    let etcd = Etcd::start().await;
    let endpoint = etcd.endpoint();
    let host = format!("ui{:06x}", std::process::id() & 0xff_ffff);
    let run = tempfile::tempdir().unwrap();
    let _containers = Containers(host.clone());
    let common = ["--etcd", endpoint.as_str(), "--host", host.as_str()];
    let bin = |name: &str| testkit::workspace_bin(name);
    let mut agents = Vec::new();
    let mut args: Vec<String> = common.iter().map(|s| (*s).to_owned()).collect();
    args.extend([
        "--addr".into(),
        "127.0.0.1".into(),
        "--ttl".into(),
        "3s".into(),
    ]);
    agents.push(Daemon::spawn(bin("registrator"), &args));
    let mut args: Vec<String> = common.iter().map(|s| (*s).to_owned()).collect();
    args.extend(
        [
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--ttl",
            "3s",
            "--stop-timeout",
            "1s",
            "--shutdown-delay",
            "0s",
            "--admin",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    agents.push(Daemon::spawn(bin("launcher"), &args));
    let mut args: Vec<String> = common.iter().map(|s| (*s).to_owned()).collect();
    let admin = format!("127.0.0.1:{}", port());
    args.extend([
        "--bind".into(),
        "127.0.0.1".into(),
        "--dns".into(),
        "off".into(),
        "--admin".into(),
        admin,
        "--links".into(),
        "open".into(),
        "--run-dir".into(),
        run.path().to_str().unwrap().into(),
    ]);
    agents.push(Daemon::spawn(bin("ambassador"), &args));
    // A second host's ambassador (on 127.0.0.2, with the same ports): the traffic table sums
    // the hosts' stats records.
    let other = format!("{host}b");
    let run2 = tempfile::tempdir().unwrap();
    agents.push(Daemon::spawn(
        bin("ambassador"),
        &[
            "--etcd",
            &endpoint,
            "--host",
            &other,
            "--bind",
            "127.0.0.2",
            "--dns",
            "off",
            "--admin",
            &format!("127.0.0.1:{}", port()),
            "--links",
            "open",
            "--run-dir",
            run2.path().to_str().unwrap(),
        ],
    ));

    let viking = |args: &[&str]| {
        let out = crate::viking(&endpoint, args);
        assert!(
            out.status.success(),
            "viking {args:?}: {}",
            crate::stderr(&out)
        );
        crate::stdout(&out)
    };
    viking(&[
        "host",
        "add",
        &host,
        "10.99.0.1",
        "--role",
        "router",
        "--label",
        "zone=test",
    ]);
    let stacks = tempfile::tempdir().unwrap();
    let stack = format!("s{:06x}", std::process::id() & 0xff_ffff);
    viking(&["deploy", &stack_dir(stacks.path(), &stack)]);

    // The page, on loopback without a token.
    let listen: SocketAddr = ([127, 0, 0, 1], port()).into();
    let mut ui = Daemon::spawn(
        env!("CARGO_BIN_EXE_viking"),
        &["--etcd", &endpoint, "ui", "--listen", &listen.to_string()],
    );
    ui.wait_log("viking ui serving the cluster", LIMIT);
    let browser = Browser::start(1280, 800).await;
    browser
        .c()
        .goto(&format!("http://{listen}/"))
        .await
        .unwrap();
    browser
        .until(
            "the host row",
            &format!(
                "return [...document.querySelectorAll('#hosts tbody tr')]\
                 .some(r => r.innerText.includes('{host}') && r.innerText.includes('zone=test'))"
            ),
        )
        .await;
    browser
        .until(
            "the stack and both jobs",
            &format!(
                "return document.querySelectorAll('[data-stack=\"{stack}\"] details').length == 2"
            ),
        )
        .await;
    // The links graph: a node per job, an edge per link labelled with the ambassador port.
    let db_port: u16 = {
        let ports = viking(&["--output", "json", "ports"]);
        let rows: Value = serde_json::from_str(&ports).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r.to_string().contains(&format!("{stack}/db")))
            .and_then(|r| r["port"].as_u64().or(r["ambassador_port"].as_u64()))
            .unwrap_or_else(|| panic!("no port of {stack}/db in {ports}")) as u16
    };
    let graph = browser
        .js("return [document.querySelectorAll('#graph g.node').length, \
             [...document.querySelectorAll('#graph g.link')].map(g => g.dataset.from + '>' + g.dataset.to + ' ' + g.textContent)]")
        .await;
    assert_eq!(graph[0], 2, "{graph}");
    let edges = graph[1].as_array().unwrap();
    assert_eq!(edges.len(), 1, "{graph}");
    let edge = edges[0].as_str().unwrap();
    assert!(
        edge.starts_with(&format!("{stack}/web>{stack}/db")) && edge.contains(&db_port.to_string()),
        "{edge}"
    );

    // Run it: each instance shows within 2 s of its launcher reporting it running.
    viking(&["run", &stack, "--detach"]);
    let mut etcd_client = etcd.client().await;
    let status_key = format!("/viking/grid/status/{host}/{stack}/web/0");
    let running_at = loop {
        let r = etcd_client.get(status_key.as_str(), None).await.unwrap();
        if let Some(kv) = r.kvs().first() {
            let v: Value = serde_json::from_slice(kv.value()).unwrap();
            if v["state"] == "running" {
                break Instant::now();
            }
        }
        assert!(ui.log().len() < 10_000_000);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    browser
        .until(
            "web/0 running in the grid",
            &format!(
                "return [...document.querySelectorAll('[data-host=\"{host}\"] li')]\
                 .some(li => li.innerText.startsWith('{stack}/web/0') && li.innerText.includes('running'))"
            ),
        )
        .await;
    let shown = running_at.elapsed();
    eprintln!("web/0 on the page {shown:?} after its status said running");
    assert!(shown < Duration::from_secs(2), "{shown:?}");

    // Traffic: connections through db's ambassador port on both hosts show in the traffic
    // table as their sum (each ambassador publishes every 5 s): 5 through this host's, 3
    // through the other's; neither alone reaches 8.
    for (addr, n) in [("127.0.0.1", 5), ("127.0.0.2", 3)] {
        for _ in 0..n {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "--max-time",
                    "5",
                    &format!("http://{addr}:{db_port}/"),
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "through {addr}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    browser
        .until(
            "db's connections of both hosts summed in the traffic table",
            &format!(
                "const row = document.querySelector('#traffic tr[data-service=\"{stack}/db:80/tcp\"]'); \
                 return row != null && Number(row.children[2].innerText) == 8"
            ),
        )
        .await;

    // Env values masked until revealed.
    let env = browser
        .js(&format!(
            "const d = document.querySelector('details[data-job=\"{stack}/web\"]'); d.open = true; \
             return d.querySelector('table.env').innerText"
        ))
        .await;
    let env = env.as_str().unwrap().to_owned();
    // A link within the stack, `db`: the env prefix DB.
    assert!(
        env.contains("DB_PORT_80_TCP") && env.contains("••••••"),
        "{env}"
    );
    assert!(!env.contains("tcp://"), "values shown before reveal: {env}");
    browser
        .js(&format!(
            "document.querySelector('details[data-job=\"{stack}/web\"] button').click(); return true"
        ))
        .await;
    browser
        .until(
            "env values revealed",
            &format!(
                "return document.querySelector('details[data-job=\"{stack}/web\"] table.env').innerText.includes(':{db_port}')"
            ),
        )
        .await;

    // The screenshot at 1280x800, for the README.
    let png = browser.c().screenshot().await.unwrap();
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ui.png");
    std::fs::write(&shot, &png).unwrap();
    // A phone's width: nothing wider than the screen but the scrolling tables inside it.
    browser.c().set_window_size(390, 844).await.unwrap();
    let wide = browser
        .js("return document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(
        wide.as_i64().is_some_and(|w| w <= 1),
        "the page is {wide} px too wide at 390 px"
    );

    // Beyond loopback: a token is required, in the page and on the event stream.
    let out = crate::viking(&endpoint, &["ui", "--listen", "0.0.0.0:1"]);
    assert_eq!(out.status.code(), Some(2), "{}", crate::stderr(&out));
    assert!(
        crate::stderr(&out).contains("--token"),
        "{}",
        crate::stderr(&out)
    );
    let open: SocketAddr = ([0, 0, 0, 0], port()).into();
    let mut guarded = Daemon::spawn(
        env!("CARGO_BIN_EXE_viking"),
        &[
            "--etcd",
            &endpoint,
            "ui",
            "--listen",
            &open.to_string(),
            "--token",
            "s3cret",
        ],
    );
    guarded.wait_log("viking ui serving the cluster", LIMIT);
    let at = format!("http://127.0.0.1:{}", open.port());
    let status = |url: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "3",
                "-w",
                "%{http_code}",
                url,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status(&format!("{at}/")), "401");
    assert_eq!(status(&format!("{at}/events")), "401");
    assert_eq!(status(&format!("{at}/api/env?job={stack}/web")), "401");
    assert_eq!(status(&format!("{at}/?token=wrong")), "401");
    assert_eq!(status(&format!("{at}/api/model?token=s3cret")), "200");
    browser.c().goto(&format!("{at}/")).await.unwrap();
    let text = browser.js("return document.body.innerText").await;
    assert!(
        text.as_str().unwrap().contains("a token is required"),
        "{text}"
    );
    browser
        .c()
        .goto(&format!("{at}/?token=s3cret"))
        .await
        .unwrap();
    browser
        .until(
            "the page with the token",
            &format!("return document.body.innerText.includes('{host}')"),
        )
        .await;

    // The links graph at 50 jobs: a second stack of 48 deployed (not run) beside the first.
    let chain = format!("{stack}c");
    viking(&["deploy", &tiers_dir(stacks.path(), &chain)]);
    // Tall enough for the whole graph in the picture below.
    browser.c().set_window_size(1280, 1700).await.unwrap();
    browser
        .c()
        .goto(&format!("http://{listen}/"))
        .await
        .unwrap();
    browser
        .until(
            "50 jobs and 73 links in the graph",
            "return document.querySelectorAll('#graph g.node').length == 50 \
             && document.querySelectorAll('#graph g.link').length == 73",
        )
        .await;
    let overlaps = browser.js(GRAPH_OVERLAPS).await;
    assert_eq!(
        overlaps,
        serde_json::json!([]),
        "the graph at 50 jobs draws things over each other"
    );
    let labels = browser
        .js("return document.querySelectorAll('#graph text.label').length")
        .await;
    assert_eq!(labels, 73, "every link labelled with its ambassador port");
    // Its picture, for docs/ui.md's readers and the next change to the layout.
    let graph = browser
        .c()
        .find(fantoccini::Locator::Css("#graph svg"))
        .await
        .unwrap();
    let png = graph.screenshot().await.unwrap();
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ui-links-50.png");
    std::fs::write(&shot, &png).unwrap();

    viking(&["stop", &stack]);
    browser.close().await;
    drop(agents);
}
