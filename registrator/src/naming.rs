//! What a container should look like in etcd: a pure function of its Docker state.
//!
//! Names come from the labels HQ puts on its containers (`viking.stack`, `viking.job`) and,
//! for containers started by other means, from the conventions users of Docker registrators
//! already know: `SERVICE_NAME`, `SERVICE_<port>_NAME`, `SERVICE_IGNORE` and
//! `SERVICE_<port>_IGNORE`, read from labels or env (a label beats env; a port-specific
//! setting beats the generic one). Without any of these the stack is `default` and the job is
//! the image's last path segment without its tag, made into a valid name.
//!
//! Names under a stack that viking deployed belong to the containers viking launches for it:
//! only the `viking.*` labels may claim them. A `SERVICE_*` setting (or an image name) that
//! lands in a deployed stack is refused, so that a stray container cannot become a backend of
//! a deployed service; names outside deployed stacks keep the registrator conventions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use schema::records::{EndpointRecord, RECORD_VERSION};
use schema::{HostId, Instance, JobName, Proto, ServiceId, ServicePort, StackName};

/// A container as far as the registrator cares: read from `docker inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The full id.
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// The image as the container was created from it (`mongo:4.4`, `reg:5000/team/api`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// Exposed ports, each with its published host bindings (none if unpublished).
    pub ports: Vec<Port>,
    /// The container's address on its first network, if it has one.
    pub ip: Option<IpAddr>,
    /// Every address it has on a Docker network (link-scoped access knows it by these).
    pub addrs: Vec<IpAddr>,
    pub running: bool,
    pub paused: bool,
    pub health: Health,
    /// When Docker started it (RFC 3339); the endpoint's `registered_at`.
    pub started_at: String,
    /// Its network namespace's cookie, read when it was inspected running (`None` when it
    /// could not be: not running, or this process may not enter the namespace).
    pub netns_cookie: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    pub proto: Proto,
    /// Host bindings: `(host ip, host port)`; the ip is `None` for "all addresses".
    pub published: Vec<(Option<IpAddr>, u16)>,
}

/// Docker's health state; `None` when the container has no health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// How this host's endpoints are addressed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: HostId,
    /// The address other hosts reach this one on (`--addr`).
    pub addr: IpAddr,
    /// Register the container's own address and port instead of the published ones.
    pub internal: bool,
}

/// The stacks viking deployed and their jobs, as last read from etcd (`stacks/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Deployed {
    /// Not read yet: a claim by a `SERVICE_*` setting or an image name waits, since it might
    /// name a deployed stack. Label claims do not wait.
    #[default]
    Unknown,
    Known(BTreeMap<StackName, BTreeSet<JobName>>),
}

impl Deployed {
    /// Nothing deployed (what a cluster without HQ has).
    pub fn nothing() -> Self {
        Deployed::Known(BTreeMap::new())
    }
}

/// One endpoint to keep in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service_port: ServicePort,
    pub instance: Instance,
    pub record: EndpointRecord,
}

/// What to write for one container, and what was left out and why.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub registrations: Vec<Registration>,
    /// Ports (or the whole container) not registered because something is wrong with them,
    /// each with the reason and what to do. Worth a warning; ignored and unpublished ports are
    /// not listed here.
    pub problems: Vec<String>,
    /// Registered, but not as asked (a `SERVICE_NAME` made into a valid name): worth a
    /// warning too.
    pub notes: Vec<String>,
    /// Ports that wait until the deployed stacks are known.
    pub waiting: usize,
}

/// Why a container has no endpoints at all even though nothing is wrong with it.
pub fn not_serving(c: &Container) -> Option<&'static str> {
    if !c.running {
        Some("not running")
    } else if c.paused {
        Some("paused")
    } else {
        match c.health {
            Health::Starting => Some("health check still starting"),
            Health::Unhealthy => Some("unhealthy"),
            Health::None | Health::Healthy => None,
        }
    }
}

/// The endpoints a container should have right now, given the stacks viking deployed.
pub fn plan(c: &Container, settings: &Settings, deployed: &Deployed) -> Plan {
    let mut plan = Plan::default();
    if not_serving(c).is_some() {
        return plan;
    }
    for port in &c.ports {
        if is_ignored(c, port.port) {
            continue;
        }
        let (service, claim) = match service_of(c, port.port) {
            Ok(s) => s,
            Err(why) => {
                plan.problems.push(format!(
                    "container {} port {}/{}: {why}",
                    c.name, port.port, port.proto
                ));
                continue;
            }
        };
        match (&claim, deployed) {
            (Claim::Labels, _) => {}
            (_, Deployed::Unknown) => {
                plan.waiting += 1;
                continue;
            }
            (Claim::Convention { from, .. }, Deployed::Known(stacks))
                if stacks.contains_key(&service.stack) =>
            {
                plan.problems.push(format!(
                    "container {} port {}/{}: it claims {service} through {from}, but stack {} \
                     is deployed by viking and its names belong to the containers viking \
                     launches for it (labels {} and {}); give it a name outside that stack, \
                     or make it a job of the stack and deploy it",
                    c.name,
                    port.port,
                    port.proto,
                    service.stack,
                    schema::labels::STACK,
                    schema::labels::JOB,
                ));
                continue;
            }
            (Claim::Convention { rewritten, .. }, _) => {
                if let Some(note) = rewritten {
                    plan.notes.push(format!("container {}: {note}", c.name));
                }
            }
        }
        let (addr, host_port) = if settings.internal {
            match c.ip {
                Some(ip) => (ip, port.port),
                None => {
                    plan.problems.push(format!(
                        "container {} port {}/{}: it has no address of its own (host \
                         network?); run without --internal to register its published ports",
                        c.name, port.port, port.proto
                    ));
                    continue;
                }
            }
        } else {
            match published(port, settings.addr) {
                Published::At(addr, p) => (addr, p),
                Published::Not => continue,
                Published::LoopbackOnly => {
                    plan.problems.push(format!(
                        "container {} port {}/{}: published on a loopback address only, which \
                         other hosts cannot reach; publish it on all addresses (-p {}) or on \
                         this host's address",
                        c.name, port.port, port.proto, port.port
                    ));
                    continue;
                }
            }
        };
        let instance = match Instance::new(settings.host.clone(), &c.id, port.port) {
            Ok(i) => i,
            Err(e) => {
                plan.problems.push(format!("container {}: {e}", c.name));
                continue;
            }
        };
        plan.registrations.push(Registration {
            service_port: ServicePort {
                service,
                port: port.port,
                proto: port.proto,
            },
            instance,
            record: EndpointRecord {
                v: RECORD_VERSION,
                host: settings.host.clone(),
                addr: addr.to_string(),
                port: host_port,
                container_id: c.id.clone(),
                container_name: c.name.clone(),
                registered_at: c.started_at.clone(),
            },
        });
    }
    plan
}

enum Published {
    At(IpAddr, u16),
    Not,
    LoopbackOnly,
}

/// The address and port other hosts dial for a port: the first binding reachable from
/// outside, on this host's address unless Docker bound a specific one.
fn published(port: &Port, host_addr: IpAddr) -> Published {
    let mut loopback = false;
    for &(ip, host_port) in &port.published {
        match ip {
            None => return Published::At(host_addr, host_port),
            Some(ip) if ip.is_unspecified() => return Published::At(host_addr, host_port),
            Some(ip) if ip.is_loopback() => loopback = true,
            Some(ip) => return Published::At(ip, host_port),
        }
    }
    if loopback {
        Published::LoopbackOnly
    } else {
        Published::Not
    }
}

/// A setting from a label, else from env.
fn setting<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.labels
        .get(name)
        .or_else(|| c.env.get(name))
        .map(String::as_str)
}

/// A port-specific setting (`SERVICE_<port>_<what>`), else the generic one (`SERVICE_<what>`).
fn service_setting<'a>(c: &'a Container, port: u16, what: &str) -> Option<&'a str> {
    setting(c, &format!("SERVICE_{port}_{what}")).or_else(|| setting(c, &format!("SERVICE_{what}")))
}

fn is_ignored(c: &Container, port: u16) -> bool {
    service_setting(c, port, "IGNORE").is_some_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !(v.is_empty() || v == "0" || v == "false" || v == "no")
    })
}

/// How a container named the service of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    /// The `viking.stack` and `viking.job` labels: viking launched it.
    Labels,
    /// A registrator convention (`from` says which), or the image name; `rewritten` says how
    /// a `SERVICE_*` value that was not a valid name was made into one.
    Convention {
        from: String,
        rewritten: Option<String>,
    },
}

/// The service a port belongs to and how it was claimed, or why it has none.
fn service_of(c: &Container, port: u16) -> Result<(ServiceId, Claim), String> {
    // HQ's labels are our own contract: taken as they are, never rewritten.
    let strict_stack = c
        .labels
        .get(schema::labels::STACK)
        .map(|s| StackName::new(s).map_err(|e| format!("label viking.stack: {e}; fix the label")));
    let strict_job = c
        .labels
        .get(schema::labels::JOB)
        .map(|j| JobName::new(j).map_err(|e| format!("label viking.job: {e}; fix the label")));
    // The registrator conventions are foreign names: made valid the way Docker users expect.
    let setting_name = service_setting_name(c, port, "NAME");
    let (loose_stack, loose_job) = match service_setting(c, port, "NAME") {
        Some(name) => match name.split_once('/') {
            Some((stack, job)) => (Some(stack.to_owned()), job.to_owned()),
            None => (None, name.to_owned()),
        },
        None => (None, image_job(&c.image)),
    };
    let stack = match strict_stack {
        Some(s) => s?,
        None => {
            let raw = loose_stack.unwrap_or_else(|| "default".to_owned());
            StackName::new(sanitize(&raw)).map_err(|_| {
                format!("stack {raw:?} cannot be made a valid name; set the label viking.stack")
            })?
        }
    };
    let job = match strict_job {
        Some(j) => j?,
        None => JobName::new(sanitize(&loose_job)).map_err(|_| {
            format!(
                "job name {loose_job:?} (from SERVICE_NAME or the image) cannot be made a valid \
                 name; set the label viking.job or SERVICE_NAME"
            )
        })?,
    };
    let service = ServiceId { stack, job };
    if c.labels.contains_key(schema::labels::STACK) && c.labels.contains_key(schema::labels::JOB) {
        return Ok((service, Claim::Labels));
    }
    let claim = match setting_name {
        Some(from) => {
            let asked = service_setting(c, port, "NAME").unwrap_or_default();
            let got = format!("{}/{}", service.stack, service.job);
            let same = asked == got || (!asked.contains('/') && asked == service.job.as_str());
            Claim::Convention {
                rewritten: (!same).then(|| {
                    format!(
                        "{from} {asked:?} is not a valid name; registered as {got} (names are \
                         DNS labels: lower-case letters, digits and '-'); set {from} to that to \
                         silence this"
                    )
                }),
                from,
            }
        }
        None => Claim::Convention {
            from: format!("its image name ({})", c.image),
            rewritten: None,
        },
    };
    Ok((service, claim))
}

/// Where `SERVICE_<port>_<what>` or `SERVICE_<what>` came from, as a user would name it
/// (`label SERVICE_NAME`, `env SERVICE_80_NAME`), if set.
fn service_setting_name(c: &Container, port: u16, what: &str) -> Option<String> {
    [format!("SERVICE_{port}_{what}"), format!("SERVICE_{what}")]
        .into_iter()
        .find_map(|name| {
            if c.labels.contains_key(&name) {
                Some(format!("label {name}"))
            } else if c.env.contains_key(&name) {
                Some(format!("env {name}"))
            } else {
                None
            }
        })
}

/// The image's last path segment without tag or digest: `reg:5000/team/api:1.2` -> `api`.
fn image_job(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last).to_owned()
}

/// Lower-cases and turns every run of characters outside `[a-z0-9]` into one `-`, trimmed,
/// at most 63 characters: `My_Service.v2` -> `my-service-v2`. Empty if nothing is left.
pub fn sanitize(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for ch in raw.chars().flat_map(char::to_lowercase) {
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            out.push(ch);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    while out.ends_with('-') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        Container {
            id: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            name: "mongo-1".into(),
            image: "registry.example:5000/team/Mongo_DB:4.4".into(),
            labels: BTreeMap::new(),
            env: BTreeMap::new(),
            ports: vec![Port {
                port: 27017,
                proto: Proto::Tcp,
                published: vec![(None, 32768)],
            }],
            ip: Some("172.17.0.5".parse().unwrap()),
            addrs: vec!["172.17.0.5".parse().unwrap()],
            running: true,
            paused: false,
            health: Health::None,
            started_at: "2026-11-22T10:00:00.123Z".into(),
            netns_cookie: None,
        }
    }

    fn settings() -> Settings {
        Settings {
            host: HostId::new("node-a").unwrap(),
            addr: "10.0.0.1".parse().unwrap(),
            internal: false,
        }
    }

    fn names(c: &Container) -> Vec<String> {
        plan(c, &settings(), &Deployed::nothing())
            .registrations
            .iter()
            .map(|r| r.service_port.to_string())
            .collect()
    }

    #[test]
    fn published_port_is_registered_at_the_host_address() {
        let p = plan(&container(), &settings(), &Deployed::nothing());
        assert!(p.problems.is_empty());
        let [r] = p.registrations.as_slice() else {
            panic!("{p:?}")
        };
        assert_eq!(r.service_port.to_string(), "default/mongo-db:27017/tcp");
        assert_eq!(r.instance.to_string(), "node-a:0123456789ab:27017");
        assert_eq!((r.record.addr.as_str(), r.record.port), ("10.0.0.1", 32768));
        assert_eq!(r.record.container_name, "mongo-1");
        assert_eq!(r.record.registered_at, "2026-11-22T10:00:00.123Z");
    }

    #[test]
    fn internal_uses_the_container_address_and_port() {
        let mut s = settings();
        s.internal = true;
        let mut c = container();
        c.ports.push(Port {
            port: 53,
            proto: Proto::Udp,
            published: vec![],
        });
        let p = plan(&c, &s, &Deployed::nothing());
        let got: Vec<_> = p
            .registrations
            .iter()
            .map(|r| format!("{} {}:{}", r.service_port, r.record.addr, r.record.port))
            .collect();
        assert_eq!(
            got,
            [
                "default/mongo-db:27017/tcp 172.17.0.5:27017",
                "default/mongo-db:53/udp 172.17.0.5:53"
            ]
        );
        c.ip = None;
        let p = plan(&c, &s, &Deployed::nothing());
        assert!(p.registrations.is_empty());
        assert!(p.problems[0].contains("no address of its own"), "{p:?}");
    }

    #[test]
    fn unpublished_ports_are_skipped_quietly_and_loopback_ones_with_a_reason() {
        let mut c = container();
        c.ports[0].published.clear();
        assert_eq!(plan(&c, &settings(), &Deployed::nothing()), Plan::default());
        c.ports[0].published = vec![(Some("127.0.0.1".parse().unwrap()), 4000)];
        let p = plan(&c, &settings(), &Deployed::nothing());
        assert!(p.registrations.is_empty());
        assert!(p.problems[0].contains("loopback"), "{p:?}");
        c.ports[0].published = vec![(Some("10.9.9.9".parse().unwrap()), 4000)];
        let p = plan(&c, &settings(), &Deployed::nothing());
        assert_eq!(p.registrations[0].record.addr, "10.9.9.9");
    }

    #[test]
    fn labels_name_the_service_and_beat_everything_else() {
        let mut c = container();
        c.labels.insert("viking.stack".into(), "shared".into());
        c.labels.insert("viking.job".into(), "mongo".into());
        c.env.insert("SERVICE_NAME".into(), "other".into());
        assert_eq!(names(&c), ["shared/mongo:27017/tcp"]);
        c.labels.insert("viking.job".into(), "Bad_Name".into());
        let p = plan(&c, &settings(), &Deployed::nothing());
        assert!(p.registrations.is_empty());
        assert!(p.problems[0].contains("label viking.job"), "{p:?}");
    }

    #[test]
    fn service_name_conventions_label_beats_env_port_beats_generic() {
        let mut c = container();
        c.env.insert("SERVICE_NAME".into(), "from-env".into());
        assert_eq!(names(&c), ["default/from-env:27017/tcp"]);
        c.labels.insert("SERVICE_NAME".into(), "from-label".into());
        assert_eq!(names(&c), ["default/from-label:27017/tcp"]);
        c.env
            .insert("SERVICE_27017_NAME".into(), "shared/Port_Specific".into());
        assert_eq!(names(&c), ["shared/port-specific:27017/tcp"]);
    }

    fn deployed(stacks: &[(&str, &[&str])]) -> Deployed {
        Deployed::Known(
            stacks
                .iter()
                .map(|(s, jobs)| {
                    (
                        StackName::new(*s).unwrap(),
                        jobs.iter().map(|j| JobName::new(*j).unwrap()).collect(),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn a_service_name_claim_on_a_deployed_stack_is_refused_naming_the_container() {
        let shared = deployed(&[("shared", &["web"])]);
        let mut c = container();
        c.env.insert("SERVICE_NAME".into(), "shared/web".into());
        let p = plan(&c, &settings(), &shared);
        assert!(p.registrations.is_empty(), "{p:?}");
        assert!(
            p.problems[0].starts_with(
                "container mongo-1 port 27017/tcp: it claims shared/web through env SERVICE_NAME, \
                 but stack shared is deployed by viking"
            ),
            "{p:?}"
        );
        // Any name under a deployed stack, not only its jobs'; and a label setting too.
        c.env.clear();
        c.labels
            .insert("SERVICE_27017_NAME".into(), "shared/other".into());
        let p = plan(&c, &settings(), &shared);
        assert!(
            p.problems[0].contains("through label SERVICE_27017_NAME"),
            "{p:?}"
        );
        // What viking launches (its labels) is registered; so is a name outside the stack.
        let mut launched = container();
        launched
            .labels
            .insert("viking.stack".into(), "shared".into());
        launched.labels.insert("viking.job".into(), "web".into());
        assert_eq!(plan(&launched, &settings(), &shared).registrations.len(), 1);
        c.labels
            .insert("SERVICE_27017_NAME".into(), "team/web".into());
        assert_eq!(names(&c), ["team/web:27017/tcp"]);
        assert_eq!(plan(&c, &settings(), &shared).registrations.len(), 1);
    }

    #[test]
    fn conventions_wait_until_the_deployed_stacks_are_known_labels_do_not() {
        let mut c = container();
        c.env.insert("SERVICE_NAME".into(), "shared/web".into());
        let p = plan(&c, &settings(), &Deployed::Unknown);
        assert!(p.registrations.is_empty() && p.problems.is_empty(), "{p:?}");
        assert_eq!(p.waiting, 1);
        c.labels.insert("viking.stack".into(), "shared".into());
        c.labels.insert("viking.job".into(), "web".into());
        let p = plan(&c, &settings(), &Deployed::Unknown);
        assert_eq!((p.registrations.len(), p.waiting), (1, 0));
    }

    #[test]
    fn a_service_name_made_valid_is_registered_with_a_note_saying_so() {
        let mut c = container();
        c.env.insert("SERVICE_NAME".into(), "A B".into());
        let p = plan(&c, &settings(), &Deployed::nothing());
        assert_eq!(
            p.registrations[0].service_port.to_string(),
            "default/a-b:27017/tcp"
        );
        assert_eq!(
            p.notes,
            [
                "container mongo-1: env SERVICE_NAME \"A B\" is not a valid name; registered as \
              default/a-b (names are DNS labels: lower-case letters, digits and '-'); set env \
              SERVICE_NAME to that to silence this"
            ]
        );
        c.env.insert("SERVICE_NAME".into(), "team/web".into());
        assert!(plan(&c, &settings(), &Deployed::nothing()).notes.is_empty());
        c.env.insert("SERVICE_NAME".into(), "web".into());
        assert!(plan(&c, &settings(), &Deployed::nothing()).notes.is_empty());
    }

    #[test]
    fn ignore_generic_and_per_port() {
        let mut c = container();
        c.ports.push(Port {
            port: 8080,
            proto: Proto::Tcp,
            published: vec![(None, 32769)],
        });
        c.env.insert("SERVICE_8080_IGNORE".into(), "true".into());
        assert_eq!(names(&c), ["default/mongo-db:27017/tcp"]);
        c.labels.insert("SERVICE_IGNORE".into(), "1".into());
        assert!(names(&c).is_empty());
        c.labels.insert("SERVICE_IGNORE".into(), "false".into());
        assert_eq!(names(&c), ["default/mongo-db:27017/tcp"]);
    }

    #[test]
    fn not_serving_containers_have_no_endpoints() {
        for (change, why) in [
            (
                (|c: &mut Container| c.running = false) as fn(&mut Container),
                "not running",
            ),
            (|c| c.paused = true, "paused"),
            (
                |c| c.health = Health::Starting,
                "health check still starting",
            ),
            (|c| c.health = Health::Unhealthy, "unhealthy"),
        ] {
            let mut c = container();
            change(&mut c);
            assert_eq!(not_serving(&c), Some(why));
            assert_eq!(plan(&c, &settings(), &Deployed::nothing()), Plan::default());
        }
        let mut c = container();
        c.health = Health::Healthy;
        assert_eq!(names(&c).len(), 1);
    }

    #[test]
    fn invalid_names_are_problems_not_panics() {
        let mut c = container();
        c.image = "___:latest".into();
        let p = plan(&c, &settings(), &Deployed::nothing());
        assert!(p.registrations.is_empty());
        assert!(
            p.problems[0].contains("cannot be made a valid name"),
            "{p:?}"
        );
    }

    #[test]
    fn sanitize_and_image_job() {
        assert_eq!(sanitize("My_Service.v2"), "my-service-v2");
        assert_eq!(sanitize("--a--b--"), "a-b");
        assert_eq!(sanitize("日本"), "");
        assert_eq!(sanitize(&"x".repeat(70)).len(), 63);
        assert_eq!(sanitize(&format!("{}-y", "x".repeat(62))), "x".repeat(62));
        assert_eq!(image_job("reg:5000/team/api:1.2"), "api");
        assert_eq!(image_job("redis"), "redis");
        assert_eq!(image_job("redis@sha256:abc"), "redis");
    }
}
