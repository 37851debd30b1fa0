//! flowd's configuration: Python assignments (`KEY = value`, read with `exec`), of
//! strings, numbers, booleans and lists or tuples of them (README "Plugins
//! Reference" and "Backends Reference" of flowd, scitags/settings.py for the
//! defaults). Every key is mapped or reported.

use anyhow::{bail, Result};

use super::{activity_ok, experiment_ok, host_port, policy, rule, Imported};

/// A Python literal as flowd's configuration uses them.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    Str(String),
    Int(i64),
    Bool(bool),
    None,
    List(Vec<Py>),
}

impl Py {
    fn str(&self) -> Option<&str> {
        match self {
            Py::Str(s) => Some(s),
            _ => None,
        }
    }
    fn int(&self) -> Option<i64> {
        match self {
            Py::Int(i) => Some(*i),
            Py::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
    fn truthy(&self) -> bool {
        match self {
            Py::Str(s) => !s.is_empty(),
            Py::Int(i) => *i != 0,
            Py::Bool(b) => *b,
            Py::None => false,
            Py::List(l) => !l.is_empty(),
        }
    }
    /// A list of strings; a bare string is a list of one (a tuple missing its comma,
    /// `('192.168.0.0/16')`, is a string in Python, as flowd's README writes it).
    fn strs(&self) -> Vec<String> {
        match self {
            Py::List(l) => l
                .iter()
                .filter_map(|p| p.str().map(str::to_owned))
                .collect(),
            Py::Str(s) => vec![s.clone()],
            _ => Vec::new(),
        }
    }
}

/// flowd's settings.py defaults the mapping needs.
const NP_API_FILE: &str = "/var/run/flowd";
const FIREFLY_PORT: i64 = 10514;
const STUN_SERVERS: [&str; 2] = ["stun.l.google.com:19305", "stun.services.mozilla.org:3478"];

/// The ranges Python's `ip_address.is_private` holds for the peers flowd's netstat
/// and netlink plugins skip, besides the configured internal networks.
const PRIVATE: [&str; 8] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
];

/// Parses `KEY = literal` lines; `#` starts a comment outside strings.
pub fn parse(text: &str) -> Result<Vec<(String, Py)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: not `KEY = value`", n + 1);
        };
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("line {}: `{key}` is not a name", n + 1);
        }
        let mut p = Parser(value.trim().as_bytes(), 0);
        let v = p
            .value()
            .map_err(|e| anyhow::anyhow!("line {}: {key}: {e}", n + 1))?;
        p.ws();
        if p.1 < p.0.len() && p.0[p.1] != b'#' {
            bail!("line {}: {key}: unexpected text after the value", n + 1);
        }
        out.push((key.to_owned(), v));
    }
    Ok(out)
}

struct Parser<'a>(&'a [u8], usize);

impl Parser<'_> {
    fn ws(&mut self) {
        while self.1 < self.0.len() && self.0[self.1].is_ascii_whitespace() {
            self.1 += 1;
        }
    }
    fn value(&mut self) -> Result<Py, String> {
        self.ws();
        let Some(&c) = self.0.get(self.1) else {
            return Err("no value".into());
        };
        match c {
            b'\'' | b'"' => {
                let start = self.1 + 1;
                let end = self.0[start..]
                    .iter()
                    .position(|&b| b == c)
                    .ok_or("unterminated string")?;
                self.1 = start + end + 1;
                Ok(Py::Str(
                    String::from_utf8_lossy(&self.0[start..start + end]).into_owned(),
                ))
            }
            b'(' | b'[' => {
                let close = if c == b'(' { b')' } else { b']' };
                self.1 += 1;
                let mut items = Vec::new();
                let mut comma = false;
                loop {
                    self.ws();
                    match self.0.get(self.1) {
                        Some(&b) if b == close => {
                            self.1 += 1;
                            break;
                        }
                        None => return Err("unterminated list".into()),
                        _ => {}
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.0.get(self.1) {
                        Some(b',') => {
                            comma = true;
                            self.1 += 1;
                        }
                        Some(&b) if b == close => {}
                        _ => return Err("expected `,`".into()),
                    }
                }
                // `('x')` is a parenthesised string, not a tuple.
                if c == b'(' && items.len() == 1 && !comma {
                    return Ok(items.pop().expect("one item"));
                }
                Ok(Py::List(items))
            }
            _ => {
                let start = self.1;
                while self.1 < self.0.len()
                    && (self.0[self.1].is_ascii_alphanumeric() || b"_-+.".contains(&self.0[self.1]))
                {
                    self.1 += 1;
                }
                let word = std::str::from_utf8(&self.0[start..self.1]).unwrap_or("");
                match word {
                    "True" => Ok(Py::Bool(true)),
                    "False" => Ok(Py::Bool(false)),
                    "None" => Ok(Py::None),
                    w => w
                        .parse()
                        .map(Py::Int)
                        .map_err(|_| format!("`{w}` is not a literal flowd-rs can read")),
                }
            }
        }
    }
}

/// Imports flowd's configuration `text`.
pub fn import(text: &str) -> Result<Imported> {
    let keys = parse(text)?;
    let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let mut imp = Imported::default();
    let plugin = get("PLUGIN").and_then(Py::str).unwrap_or("").to_owned();
    let backends: Vec<String> = get("BACKEND")
        .and_then(Py::str)
        .unwrap_or("udp_firefly")
        .split(',')
        .map(|b| b.trim().to_owned())
        .filter(|b| !b.is_empty())
        .collect();
    let has = |b: &str| backends.iter().any(|x| x == b);
    let ebpf = has("ebpf_el8") || has("ebpf_el9");
    for (key, v) in &keys {
        let k = key.as_str();
        match k {
            "PLUGIN" => match v.str().unwrap_or("") {
                "np_api" => imp.set("announcements", "pipe", NP_API_FILE),
                "firefly" => {
                    let host = get("FIREFLY_LISTENER_HOST").and_then(Py::str).unwrap_or("0.0.0.0");
                    let port = get("FIREFLY_LISTENER_PORT").and_then(Py::int).unwrap_or(FIREFLY_PORT);
                    let listen = host_port(host, port);
                    imp.note(format!(
                        "announcements.firefly_listen = {listen}: fireflies are still heard only from announcements.firefly_allow (loopback by default); widen it knowingly"
                    ));
                    imp.set("announcements", "firefly_listen", vec![listen]);
                }
                "netstat" | "netlink" => scan_policy(&plugin, &get, &mut imp),
                "iperf" => imp.unmapped(k, "the iperf plugin's random tags have no equivalent: a policy tags a flow with one tag"),
                p => imp.unmapped(k, format!("unknown plugin `{p}`")),
            },
            "BACKEND" => {
                for b in &backends {
                    match b.as_str() {
                        "udp_firefly" | "prometheus" | "ebpf_el8" | "ebpf_el9" => {}
                        "dummy" => {}
                        other => imp.unmapped(format!("BACKEND {other}"), "unknown backend"),
                    }
                }
            }
            // Read by PLUGIN.
            "FIREFLY_LISTENER_HOST" | "FIREFLY_LISTENER_PORT" | "NETSTAT_EXPERIMENT"
            | "NETSTAT_ACTIVITY" | "NETSTAT_INTERNAL_NETWORKS" | "NETLINK_EXPERIMENT"
            | "NETLINK_ACTIVITY" | "NETLINK_INTERNAL_NETWORKS" => {}
            "FLOW_MAP_API" => imp.unmapped(
                k,
                "flowd-rs bundles the registry; `flowd-rs registry update --url URL --output FILE` fetches one for policy.registry",
            ),
            "NETSTAT_TIMEOUT" | "NETLINK_TIMEOUT" => imp.unmapped(
                k,
                "no polling period: the tracker reports sockets as they open (discovery.reconcile_interval_ms is a safety net)",
            ),
            "IPERF_FLOW_ID" | "IPERF_INTERNAL_NETWORKS" => {
                imp.unmapped(k, "the iperf plugin has no equivalent")
            }
            "IP_DISCOVERY_ENABLED" if !v.truthy() => {}
            "IP_DISCOVERY_ENABLED" => {
                // flowd's settings.py servers, which it asks when discovery is on.
                let mut t = toml::Table::new();
                t.insert("servers".into(), STUN_SERVERS.to_vec().into());
                imp.set("fireflies", "stun", t);
            }
            "UDP_FIREFLY_DST" => match v.str() {
                Some(d) if !d.is_empty() && !d.starts_with('<') => {
                    imp.set("fireflies", "collectors", vec![host_port(d, FIREFLY_PORT)])
                }
                _ => imp.unmapped(k, "not a host name or address"),
            },
            "UDP_FIREFLY_IP4_SRC" | "UDP_FIREFLY_IP6_SRC" => match v.str() {
                Some(a) if !a.is_empty() => {
                    let any = if k.contains("IP4") { "0.0.0.0/0" } else { "::/0" };
                    let mut map = match imp.get("fireflies", "public_addresses") {
                        Some(toml::Value::Table(t)) => t.clone(),
                        _ => toml::Table::new(),
                    };
                    map.insert(any.into(), a.into());
                    imp.set("fireflies", "public_addresses", map);
                }
                // An empty string: flowd's sample leaves it unset in effect.
                _ => {}
            },
            "UDP_FIREFLY_NETLINK" | "UDP_FIREFLY_WITH_NETLINK" if !v.truthy() => {}
            "UDP_FIREFLY_NETLINK" | "UDP_FIREFLY_WITH_NETLINK" => imp.unmapped(
                k,
                "flowd-rs puts TCP facts in ongoing fireflies only (fireflies.enrich with fireflies.ongoing_interval_s)",
            ),
            "NETWORK_INTERFACE" if ebpf => {
                let ifaces = v.strs();
                imp.set("marker", "interfaces", ifaces);
            }
            "PROMETHEUS_SRV_PORT" if has("prometheus") => {}
            "PROMETHEUS_SS_PATH" => imp.unmapped(k, "flowd-rs reads sock_diag itself, without ss"),
            _ => imp.unmapped(k, "not a key flowd reads (or its backend or plugin is not enabled)"),
        }
    }
    if plugin.is_empty() {
        imp.unmapped(
            "PLUGIN (absent)",
            "flowd needs one; nothing announces or tags flows",
        );
    }
    if has("udp_firefly") {
        imp.set("fireflies", "enabled", true);
    }
    if has("prometheus") {
        // flowd's client listens on every address.
        let port = get("PROMETHEUS_SRV_PORT").and_then(Py::int).unwrap_or(9000);
        imp.set("metrics", "enabled", true);
        imp.set("metrics", "listen", format!("0.0.0.0:{port}"));
        imp.set("metrics", "per_flow", true);
        imp.note(format!(
            "metrics.listen = 0.0.0.0:{port} as flowd's exporter; flowd-rs's default is loopback"
        ));
    } else {
        imp.set("metrics", "enabled", false);
    }
    if !ebpf {
        imp.unmapped(
            "BACKEND (no ebpf_el8/ebpf_el9)",
            "flowd does not mark without it; flowd-rs always marks the flows its policies and announcements tag",
        );
    }
    Ok(imp)
}

/// The netstat and netlink plugins tag every established TCP connection whose peer
/// is not private nor in the internal networks with one experiment and activity.
fn scan_policy<'a>(plugin: &str, get: &impl Fn(&str) -> Option<&'a Py>, imp: &mut Imported) {
    let up = plugin.to_ascii_uppercase();
    let exp = get(&format!("{up}_EXPERIMENT")).and_then(Py::int);
    let act = get(&format!("{up}_ACTIVITY")).and_then(Py::int);
    let (Some(exp), Some(act)) = (exp, act) else {
        imp.unmapped(
            format!("{up}_EXPERIMENT/{up}_ACTIVITY"),
            "missing (flowd refuses to start without them): no policy written",
        );
        return;
    };
    if !experiment_ok(exp) || !activity_ok(act) {
        imp.unmapped(
            format!("{up}_EXPERIMENT/{up}_ACTIVITY"),
            format!("experiment {exp} / activity {act} is not a SciTags tag: no policy written"),
        );
        return;
    }
    let mut remote: Vec<String> = vec!["0.0.0.0/0".into(), "::/0".into()];
    let internal = get(&format!("{up}_INTERNAL_NETWORKS"))
        .map(Py::strs)
        .unwrap_or_default();
    for net in PRIVATE.iter().map(|s| s.to_string()).chain(internal) {
        let excluded = format!("!{net}");
        if !remote.contains(&excluded) {
            remote.push(excluded);
        }
    }
    let r = rule([
        ("name", format!("{plugin}-external").into()),
        ("activity", act.into()),
        ("protocol", "tcp".into()),
        ("remote_cidrs", remote.into()),
    ]);
    imp.policies.push(policy(
        exp,
        &format!(
            "flowd's {plugin} plugin: TCP flows to peers outside the private and internal networks"
        ),
        vec![r],
    ));
}
