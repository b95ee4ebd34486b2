//! The pure half of discovery: from the configured worker tables and what DNS answered, the worker
//! list the fleet is built from; parsing a workers file's text; folding new DNS answers into the old.
//! No IO here: lookups and file reads live in [`super`], so this is tested with made-up answers.

use crate::config::WorkerConfig;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

/// The scheme prefix that makes a worker URL stand for every address its host resolves to.
pub const DNS_PREFIX: &str = "dns+";

/// Most workers discovery adds to the fleet (file entries and resolved addresses together): a DNS
/// answer or a file must not grow the fleet, its probes and metric labels without bound.
pub const MAX_DISCOVERED: usize = 1024;

/// A name to resolve: the host and port of a `dns+http://NAME:PORT` worker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsName {
    /// The host name as written.
    pub host: String,
    /// The port (80 when the URL has none).
    pub port: u16,
}

impl std::fmt::Display for DnsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What DNS answered last for each name: its addresses, sorted and without repeats.
pub type Resolved = BTreeMap<DnsName, Vec<IpAddr>>;

/// The plain URL behind a `dns+` worker URL and the name to resolve; `None` for any other URL.
fn dns_target(url: &str) -> Option<(url::Url, DnsName)> {
    let plain = url.strip_prefix(DNS_PREFIX)?;
    let parsed = url::Url::parse(plain).ok()?;
    let host = parsed.host_str()?.to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    Some((parsed, DnsName { host, port }))
}

/// Every name the `dns+` workers of `workers` ask to resolve.
pub fn dns_names<'a>(workers: impl IntoIterator<Item = &'a WorkerConfig>) -> BTreeSet<DnsName> {
    workers.into_iter().filter_map(|w| dns_target(&w.url)).map(|(_, name)| name).collect()
}

/// The worker list the fleet is built from: each plain worker as it is, each `dns+` worker once per
/// address its name resolved to (none while it has no answer), in order.
///
/// An expanded worker is the configured table with the URL's host replaced by the address and the name
/// `BASE/ADDRESS`, where BASE is the configured name or `host:port` (so names stay unique and say
/// where they came from). A URL or name already in the list is not added twice (the first wins: two
/// names resolving to one pod give one worker). At most [`MAX_DISCOVERED`] expanded workers.
pub fn expand(workers: &[WorkerConfig], resolved: &Resolved) -> Vec<WorkerConfig> {
    let mut out: Vec<WorkerConfig> = Vec::with_capacity(workers.len());
    let mut urls: HashSet<String> = HashSet::new();
    let mut names: HashSet<String> = HashSet::new();
    let mut expanded = 0usize;
    for w in workers {
        let Some((plain, name)) = dns_target(&w.url) else {
            urls.insert(w.url.clone());
            names.insert(w.display_name());
            out.push(w.clone());
            continue;
        };
        let base = w.name.clone().unwrap_or_else(|| name.to_string());
        for ip in resolved.get(&name).map(Vec::as_slice).unwrap_or_default() {
            if expanded >= MAX_DISCOVERED {
                break;
            }
            let mut url = plain.clone();
            if url.set_ip_host(*ip).is_err() {
                continue;
            }
            let (url, name) = (url.to_string(), format!("{base}/{ip}"));
            if urls.contains(&url) || names.contains(&name) {
                continue;
            }
            urls.insert(url.clone());
            names.insert(name.clone());
            out.push(WorkerConfig { url, name: Some(name), ..w.clone() });
            expanded += 1;
        }
    }
    out
}

/// The next [`Resolved`] from the old one and this round's answers: names no longer asked for are
/// dropped; a name whose lookup failed keeps its old addresses (a DNS hiccup must not empty the fleet;
/// a name that is really gone answers with no address, or its workers fail their probes).
pub fn next_resolved(
    old: &Resolved,
    names: &BTreeSet<DnsName>,
    answers: Vec<(DnsName, Result<Vec<IpAddr>, String>)>,
) -> Resolved {
    let mut next = Resolved::new();
    for (name, answer) in answers {
        if !names.contains(&name) {
            continue;
        }
        match answer {
            Ok(mut ips) => {
                ips.sort();
                ips.dedup();
                next.insert(name, ips);
            }
            Err(_) => {
                if let Some(ips) = old.get(&name) {
                    next.insert(name, ips.clone());
                }
            }
        }
    }
    next
}

/// Addresses that appeared and disappeared between two answers for one name, for the log.
pub fn diff(old: &[IpAddr], new: &[IpAddr]) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let added = new.iter().filter(|ip| !old.contains(ip)).copied().collect();
    let removed = old.iter().filter(|ip| !new.contains(ip)).copied().collect();
    (added, removed)
}

/// A workers file as TOML: `[[workers]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    #[serde(default)]
    workers: Vec<WorkerConfig>,
}

/// A workers file as JSON: a list of worker tables, or `{"workers": [...]}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonFile {
    List(Vec<WorkerConfig>),
    Tables(Tables),
}

/// Parses a workers file's text: JSON when `json` (the file name ends in `.json`), else TOML.
pub fn parse_workers_file(text: &str, json: bool) -> Result<Vec<WorkerConfig>, String> {
    if json {
        match serde_json::from_str::<JsonFile>(text) {
            Ok(JsonFile::List(list)) => Ok(list),
            Ok(JsonFile::Tables(t)) => Ok(t.workers),
            Err(e) => Err(format!("not a JSON list of worker tables ({e})")),
        }
    } else {
        toml::from_str::<Tables>(text).map(|t| t.workers).map_err(|e| e.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn name(host: &str, port: u16) -> DnsName {
        DnsName { host: host.into(), port }
    }

    #[test]
    fn a_dns_worker_becomes_one_worker_per_address_and_plain_workers_stay() {
        let mut pods = WorkerConfig::from_url("dns+http://vllm.ns.svc:8000/");
        pods.max_concurrency = 4;
        let named = WorkerConfig { name: Some("big".into()), ..WorkerConfig::from_url("dns+http://big:9000") };
        let workers = vec![WorkerConfig::from_url("http://static:1"), pods, named];
        let resolved = Resolved::from([
            (name("vllm.ns.svc", 8000), vec![ip4(1), ip4(2)]),
            (name("big", 9000), vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]),
        ]);
        assert_eq!(dns_names(&workers), resolved.keys().cloned().collect());
        let out = expand(&workers, &resolved);
        let got: Vec<(String, String, u32)> =
            out.iter().map(|w| (w.url.clone(), w.display_name(), w.max_concurrency)).collect();
        assert_eq!(
            got,
            vec![
                ("http://static:1".into(), "static:1".into(), 0),
                ("http://10.0.0.1:8000/".into(), "vllm.ns.svc:8000/10.0.0.1".into(), 4),
                ("http://10.0.0.2:8000/".into(), "vllm.ns.svc:8000/10.0.0.2".into(), 4),
                ("http://[::1]:9000/".into(), "big/::1".into(), 0),
            ]
        );
        crate::config::validate_workers(&out, "workers").expect("expanded workers are valid workers");
    }

    #[test]
    fn an_unresolved_name_gives_no_worker_and_duplicates_are_dropped() {
        let workers = vec![
            WorkerConfig::from_url("http://10.0.0.1:8000/"),
            WorkerConfig::from_url("dns+http://a:8000"),
            WorkerConfig::from_url("dns+http://b:8000"),
            WorkerConfig::from_url("dns+http://gone:8000"),
        ];
        let resolved =
            Resolved::from([(name("a", 8000), vec![ip4(1), ip4(2)]), (name("b", 8000), vec![ip4(2), ip4(3)])]);
        let urls: Vec<String> = expand(&workers, &resolved).into_iter().map(|w| w.url).collect();
        assert_eq!(urls, ["http://10.0.0.1:8000/", "http://10.0.0.2:8000/", "http://10.0.0.3:8000/"]);
    }

    #[test]
    fn expansion_is_bounded() {
        let workers = vec![WorkerConfig::from_url("dns+http://many:80")];
        let ips: Vec<IpAddr> =
            (0..=u16::MAX).take(MAX_DISCOVERED + 10).map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(i)))).collect();
        let resolved = Resolved::from([(name("many", 80), ips)]);
        assert_eq!(expand(&workers, &resolved).len(), MAX_DISCOVERED);
    }

    #[test]
    fn a_failed_lookup_keeps_the_old_answer_and_a_name_no_longer_asked_is_dropped() {
        let old = Resolved::from([(name("a", 1), vec![ip4(1)]), (name("old", 1), vec![ip4(9)])]);
        let names = BTreeSet::from([name("a", 1), name("b", 1), name("c", 1)]);
        let answers = vec![
            (name("a", 1), Err("SERVFAIL".to_string())),
            (name("b", 1), Ok(vec![ip4(3), ip4(2), ip4(3)])),
            (name("c", 1), Err("no answer yet".to_string())),
            (name("old", 1), Ok(vec![ip4(9)])),
        ];
        let next = next_resolved(&old, &names, answers);
        assert_eq!(next, Resolved::from([(name("a", 1), vec![ip4(1)]), (name("b", 1), vec![ip4(2), ip4(3)])]));
        assert_eq!(diff(&[ip4(1), ip4(2)], &[ip4(2), ip4(3)]), (vec![ip4(3)], vec![ip4(1)]));
    }

    #[test]
    fn workers_files_parse_as_toml_or_json() {
        let toml = "[[workers]]\nurl = \"http://a:1\"\nweight = 2\n\n[[workers]]\nurl = \"dns+http://b:2\"\n";
        let got = parse_workers_file(toml, false).expect("toml");
        assert_eq!((got.len(), got[0].weight, got[1].url.as_str()), (2, 2, "dns+http://b:2"));
        let list = parse_workers_file(r#"[{"url": "http://a:1", "name": "x"}]"#, true).expect("json list");
        assert_eq!(list[0].display_name(), "x");
        let table = parse_workers_file(r#"{"workers": [{"url": "http://a:1"}]}"#, true).expect("json table");
        assert_eq!(table.len(), 1);
        assert!(parse_workers_file("", false).expect("an empty file is no workers").is_empty());
        assert!(parse_workers_file("[[workers]]\nurl = 1\n", false).is_err());
        assert!(parse_workers_file("[[workers]]\nurl = \"http://a:1\"\nspeed = 9\n", false).is_err());
        assert!(parse_workers_file(r#"[{"name": "no url"}]"#, true).is_err());
    }
}
