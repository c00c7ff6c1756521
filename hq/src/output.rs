//! What `viking`'s listings print: typed rows, shown as a tab-separated table for people or
//! as one JSON array (`--output json`) for programs, both from the same row.

pub use runtime::output::{Format, json};
use serde::Serialize;

/// A row of a listing.
pub trait Row: Serialize {
    /// Column names of the text table; empty: no header line.
    const HEADER: &'static [&'static str];
    /// The row's cells, in the header's order.
    fn cells(&self) -> Vec<String>;
}

/// The listing as text (a header, then one tab-separated line a row) or as a JSON array.
pub fn render<R: Row>(rows: &[R], format: Format) -> String {
    match format {
        Format::Json => json(&rows),
        Format::Text => {
            let mut out = String::new();
            if !R::HEADER.is_empty() {
                out.push_str(&R::HEADER.join("\t"));
                out.push('\n');
            }
            for row in rows {
                out.push_str(&row.cells().join("\t"));
                out.push('\n');
            }
            out
        }
    }
}

/// A list cell: comma-separated, `-` when empty.
pub fn list<S: AsRef<str>>(items: &[S]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(",")
}

/// `viking ps`: one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRow {
    /// `stack/job`.
    pub service: String,
    pub image: String,
    pub scale: u32,
    /// The aliases of its links.
    pub links: Vec<String>,
    /// `PORT/PROTO=AMBASSADOR_PORT` for each of its ports that has one.
    pub ambassador_ports: Vec<String>,
    pub live_endpoints: usize,
    /// Instances running (of `scale`).
    pub running: usize,
    /// Each instance: where it runs and how it is.
    pub instances: Vec<crate::grid::InstanceRow>,
}

impl Row for JobRow {
    const HEADER: &'static [&'static str] =
        &["SERVICE", "IMAGE", "RUNNING", "LIVE", "PORTS", "LINKS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.image.clone(),
            format!("{}/{}", self.running, self.scale),
            self.live_endpoints.to_string(),
            self.ambassador_ports.join(","),
            self.links.join(","),
        ]
    }
}

/// `viking stacks`: one deployed stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackRow {
    pub name: String,
    /// Jobs in start order.
    pub order: Vec<String>,
    pub deployed_at: String,
    pub source_digest: String,
}

impl Row for StackRow {
    const HEADER: &'static [&'static str] = &["STACK", "JOBS", "DEPLOYED"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.order.join(","),
            self.deployed_at.clone(),
        ]
    }
}

/// `viking host ls`: one host: a member (`viking host add`), or one whose launcher runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostRow {
    pub host: String,
    pub addr: String,
    /// Whether `viking host add` made it a member (what locknet admits).
    pub member: bool,
    pub roles: Vec<String>,
    /// The agents whose keys are there (their lease is held).
    pub alive: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `ready`, `draining` or `lost` (no launcher).
    pub state: String,
    pub cpus_milli: u64,
    pub cpus_reserved_milli: u64,
    pub memory: u64,
    pub memory_reserved: u64,
    pub instances: usize,
}

impl Row for HostRow {
    const HEADER: &'static [&'static str] = &[
        "HOST",
        "ADDR",
        "ROLES",
        "ALIVE",
        "STATE",
        "CPUS",
        "MEMORY",
        "INSTANCES",
        "LABELS",
    ];
    fn cells(&self) -> Vec<String> {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        vec![
            self.host.clone(),
            if self.addr.is_empty() {
                "-".to_owned()
            } else {
                self.addr.clone()
            },
            list(&self.roles),
            list(&self.alive),
            self.state.clone(),
            format!(
                "{}/{}",
                grid::place::cores(self.cpus_reserved_milli),
                grid::place::cores(self.cpus_milli)
            ),
            format!(
                "{}/{}",
                schema::format_memory(self.memory_reserved),
                schema::format_memory(self.memory)
            ),
            self.instances.to_string(),
            list(&labels),
        ]
    }
}

/// `viking ports`: one allocated ambassador port.
impl Row for portalloc::Allocation {
    const HEADER: &'static [&'static str] = &[];
    fn cells(&self) -> Vec<String> {
        vec![self.port.to_string(), self.service_port.clone()]
    }
}

/// The link graph: each `stack/job` and the `stack/job`s it links to.
pub type Edges = std::collections::BTreeMap<String, Vec<String>>;

/// The graph as a tree, one `├──`/`└──` line a link.
pub fn graph_tree(edges: &Edges) -> String {
    let mut out = String::new();
    for (from, tos) in edges {
        out.push_str(from);
        out.push('\n');
        for (i, to) in tos.iter().enumerate() {
            let branch = if i + 1 == tos.len() {
                "└──"
            } else {
                "├──"
            };
            out.push_str(&format!("{branch} {to}\n"));
        }
    }
    out
}

/// The graph in Graphviz's DOT language.
pub fn graph_dot(edges: &Edges) -> String {
    let mut out = String::from("digraph viking {\n");
    for (from, tos) in edges {
        out.push_str(&format!("  \"{from}\";\n"));
        for to in tos {
            out.push_str(&format!("  \"{from}\" -> \"{to}\";\n"));
        }
    }
    out.push_str("}\n");
    out
}

/// `s` as one word for a POSIX shell: as it is when that is safe, else single-quoted.
pub fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-=./:,@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> JobRow {
        JobRow {
            service: "app/web".into(),
            image: "busybox".into(),
            scale: 2,
            links: vec!["db".into()],
            ambassador_ports: vec![],
            live_endpoints: 1,
            running: 1,
            instances: vec![],
        }
    }

    #[test]
    fn text_has_a_header_and_a_tab_separated_line_per_row() {
        assert_eq!(
            render(&[row()], Format::Text),
            "SERVICE\tIMAGE\tRUNNING\tLIVE\tPORTS\tLINKS\napp/web\tbusybox\t1/2\t1\t\tdb\n"
        );
    }

    #[test]
    fn json_is_an_array_of_the_same_rows() {
        let value: serde_json::Value =
            serde_json::from_str(&render(&[row()], Format::Json)).unwrap();
        assert_eq!(value[0]["service"], "app/web");
        assert_eq!(value[0]["live_endpoints"], 1);
        assert_eq!(value[0]["ambassador_ports"], serde_json::json!([]));
    }

    #[test]
    fn a_listing_without_header_prints_rows_only() {
        let a = portalloc::Allocation {
            service_port: "s/j:80/tcp".into(),
            port: 20000,
            consistent: true,
        };
        assert_eq!(render(&[a], Format::Text), "20000\ts/j:80/tcp\n");
    }

    #[test]
    fn the_graph_prints_as_a_tree_and_as_dot() {
        let mut edges = Edges::new();
        edges.insert(
            "app/web".into(),
            vec!["shared/db".into(), "shared/mq".into()],
        );
        edges.insert("shared/db".into(), vec![]);
        assert_eq!(
            graph_tree(&edges),
            "app/web\n├── shared/db\n└── shared/mq\nshared/db\n"
        );
        assert_eq!(
            graph_dot(&edges),
            "digraph viking {\n  \"app/web\";\n  \"app/web\" -> \"shared/db\";\n  \"app/web\" -> \"shared/mq\";\n  \"shared/db\";\n}\n"
        );
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("A=tcp://1.2.3.4:80"), "A=tcp://1.2.3.4:80");
        assert_eq!(shell_quote("A=it's"), "'A=it'\\''s'");
    }
}
