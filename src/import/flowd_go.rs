//! flowd-go's YAML configuration (cmd/conf.go and each plugin's, backend's and
//! enricher's conf.go in flowd-go): every key is mapped or reported. A value that
//! only restates what flowd-rs does anyway (`removeQdisc: true`, `debugMode: false`)
//! counts as mapped.

use anyhow::{Context, Result};
use serde_norway::Value;

use super::{activity_ok, experiment_ok, host_port, policy, rule, Imported};

/// flowd-go's defaults, where the mapping depends on them.
const WORK_DIR: &str = "/var/cache/flowd-go";
const ENRICH_PERIOD_MS: i64 = 1000;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Imports flowd-go's YAML `text`.
pub fn import(text: &str) -> Result<Imported> {
    let doc: Value = serde_norway::from_str(text).context("not flowd-go's YAML")?;
    let mut imp = Imported::default();
    let top = entries(&doc, "", &mut imp);
    // Read first: relative pipe paths and the ongoing interval depend on them.
    let work_dir = top
        .iter()
        .find(|(k, _)| k == "workDir")
        .and_then(|(_, v)| string(v))
        .unwrap_or_else(|| WORK_DIR.to_owned());
    let period_ms = top
        .iter()
        .find(|(k, _)| k == "enrichers")
        .and_then(|(_, v)| v.get("period"))
        .and_then(int)
        .unwrap_or(ENRICH_PERIOD_MS);
    let mut backends_seen = (false, false);
    let firefly_plugin = top
        .iter()
        .any(|(k, v)| k == "plugins" && v.get("firefly").is_some());
    for (k, v) in top {
        match k.as_str() {
            "pidPath" => imp.unmapped(
                "pidPath",
                "no PID file: systemd tracks the daemon, and a lock in state_dir keeps one per namespace",
            ),
            "workDir" => imp.unmapped(
                "workDir",
                "no working directory (relative paths of this file were resolved against it)",
            ),
            "plugins" => plugins(v, &work_dir, &mut imp),
            "backends" => backends_seen = backends(v, period_ms, &mut imp),
            "enrichers" => enrichers(v, &mut imp),
            other => unknown(other, &mut imp),
        }
    }
    if !backends_seen.0 {
        imp.unmapped(
            "backends.marker (absent)",
            "flowd-go does not mark without it; flowd-rs always marks the flows its policies and announcements tag",
        );
    }
    if firefly_plugin && imp.get("fireflies", "enabled").is_some() {
        imp.note(
            "announcements.fireflies_for keeps its default (pipe, http): flowd-go also sends its own fireflies for flows announced by firefly; add \"firefly\" for that (the application sent one already)",
        );
    }
    if !backends_seen.1 {
        // flowd-go exports nothing without the backend; flowd-rs's default is on.
        imp.set("metrics", "enabled", false);
    }
    Ok(imp)
}

fn plugins(v: &Value, work_dir: &str, imp: &mut Imported) {
    for (k, v) in entries(v, "plugins", imp) {
        let path = format!("plugins.{k}");
        match k.as_str() {
            "namedPipe" => {
                let mut pipe = "np".to_owned();
                for (k, v) in entries(v, &path, imp) {
                    let key = format!("{path}.{k}");
                    match k.as_str() {
                        "pipePath" => pipe = string(v).unwrap_or(pipe),
                        "maxReaders" | "buffSize" => imp.unmapped(
                            key,
                            "flowd-rs reads the pipe with one reader, a line at a time",
                        ),
                        other => unknown(&format!("{path}.{other}"), imp),
                    }
                }
                let pipe = if pipe.starts_with('/') {
                    pipe
                } else {
                    format!("{}/{pipe}", work_dir.trim_end_matches('/'))
                };
                imp.set("announcements", "pipe", pipe);
            }
            "firefly" => {
                let (mut addr, mut port) = ("127.0.0.1".to_owned(), 10514);
                for (k, v) in entries(v, &path, imp) {
                    let key = format!("{path}.{k}");
                    match k.as_str() {
                        "bindAddress" => addr = string(v).unwrap_or(addr),
                        "bindPort" => port = int(v).unwrap_or(port),
                        // flowd-rs reads fireflies with or without the header.
                        "hasSyslogHeader" => {}
                        "deadline" if int(v) == Some(0) => {}
                        "deadline" => {
                            imp.unmapped(key, "the listener blocks, as flowd-go's does with 0")
                        }
                        "bufferSize" => {
                            imp.unmapped(key, "flowd-rs reads each datagram whole (up to 64 KiB)")
                        }
                        other => unknown(&format!("{path}.{other}"), imp),
                    }
                }
                let Some(addr) = bind_ip(&addr, &format!("{path}.bindAddress"), imp) else {
                    continue;
                };
                let listen = host_port(&addr, port);
                if !is_loopback(&addr) {
                    imp.note(format!(
                        "announcements.firefly_listen = {listen}: fireflies are still heard only from announcements.firefly_allow (loopback by default); widen it knowingly"
                    ));
                }
                imp.set("announcements", "firefly_listen", vec![listen]);
            }
            "api" => {
                let (mut addr, mut port) = ("127.0.0.1".to_owned(), 7777);
                for (k, v) in entries(v, &path, imp) {
                    match k.as_str() {
                        "bindAddress" => addr = string(v).unwrap_or(addr),
                        "bindPort" => port = int(v).unwrap_or(port),
                        other => unknown(&format!("{path}.{other}"), imp),
                    }
                }
                if let Some(addr) = bind_ip(&addr, &format!("{path}.bindAddress"), imp) {
                    imp.set("announcements", "http_listen", host_port(&addr, port));
                }
            }
            "perfsonar" => {
                let (mut exp, mut act) = (0, 0);
                for (k, v) in entries(v, &path, imp) {
                    // Its conf.go reads experimentId; its sample config says experimentID.
                    match k.as_str() {
                        "experimentId" | "experimentID" => exp = int(v).unwrap_or(exp),
                        "activityId" | "activityID" => act = int(v).unwrap_or(act),
                        other => unknown(&format!("{path}.{other}"), imp),
                    }
                }
                if experiment_ok(exp) && activity_ok(act) {
                    // No match field: the rule matches every socket, as the plugin
                    // marks every packet.
                    let r = rule([
                        ("name", "perfsonar-all".into()),
                        ("activity", act.into()),
                        ("priority", (-100).into()),
                    ]);
                    imp.policies.push(policy(
                        exp,
                        "flowd-go's perfsonar plugin: every flow",
                        vec![r],
                    ));
                } else {
                    imp.unmapped(
                        path,
                        format!("experiment {exp} / activity {act} is not a SciTags tag (experiment 1-511, activity 0-63): no policy written"),
                    );
                }
            }
            "iperf3" => iperf3(v, &path, imp),
            other => unknown(&format!("plugins.{other}"), imp),
        }
    }
}

fn iperf3(v: &Value, path: &str, imp: &mut Imported) {
    let mut ports = [0i64; 4];
    let (mut exps, mut acts) = (vec![0, 1, 2], vec![0, 1, 2]);
    let mut cgroup = None;
    for (k, v) in entries(v, path, imp) {
        let key = format!("{path}.{k}");
        match k.as_str() {
            "minSourcePort" => ports[0] = int(v).unwrap_or(0),
            "maxSourcePort" => ports[1] = int(v).unwrap_or(0),
            "minDestinationPort" => ports[2] = int(v).unwrap_or(0),
            "maxDestinationPort" => ports[3] = int(v).unwrap_or(0),
            "cgroupPath" => {
                let p = string(v).unwrap_or_default();
                let rel = p
                    .strip_prefix(CGROUP_ROOT)
                    .unwrap_or(&p)
                    .trim_end_matches('/');
                if !rel.is_empty() {
                    cgroup = Some(rel.to_owned());
                }
            }
            "programPath" if string(v).is_some_and(|s| s.is_empty()) => {}
            "debugMode" if v.as_bool() == Some(false) => {}
            "programPath" | "debugMode" => {
                imp.unmapped(key, "flowd-rs runs its own programs, built in")
            }
            "randomIDs" if v.as_bool() == Some(false) => {}
            "randomIDs" => {
                imp.unmapped(key, "a policy tags a flow with one tag, never a random one")
            }
            "experimentIDs" => exps = ints(v),
            "activityIDs" => acts = ints(v),
            other => unknown(&format!("{path}.{other}"), imp),
        }
    }
    let (Some(&exp), Some(&act)) = (exps.first(), acts.first()) else {
        imp.unmapped(path, "no experiment and activity ids: no policy written");
        return;
    };
    if exps.len() > 1 || acts.len() > 1 {
        imp.unmapped(
            format!("{path}.experimentIDs/activityIDs"),
            format!("only the first pair ({exp}, {act}) is imported: a policy rule has one tag"),
        );
    }
    if !experiment_ok(exp) || !activity_ok(act) {
        imp.unmapped(
            path,
            format!("experiment {exp} / activity {act} is not a SciTags tag (experiment 1-511, activity 0-63): no policy written"),
        );
        return;
    }
    let mut r = rule([
        ("name", "iperf3".into()),
        ("activity", act.into()),
        ("protocol", "tcp".into()),
    ]);
    // flowd-go's bounds: 0 is "not enforced", so a range with one bound is open.
    for (field, lo, hi) in [
        ("local_ports", ports[0], ports[1]),
        ("remote_ports", ports[2], ports[3]),
    ] {
        if lo != 0 || hi != 0 {
            let lo = lo.max(1);
            let hi = if hi == 0 { 65535 } else { hi };
            r.insert(field.into(), vec![format!("{lo}-{hi}")].into());
        }
    }
    if let Some(c) = cgroup {
        r.insert("cgroup".into(), vec![c].into());
    }
    imp.policies
        .push(policy(exp, "flowd-go's iperf3 plugin", vec![r]));
}

/// Returns whether the marker and the prometheus backends were configured.
fn backends(v: &Value, period_ms: i64, imp: &mut Imported) -> (bool, bool) {
    let mut seen = (false, false);
    for (k, v) in entries(v, "backends", imp) {
        let path = format!("backends.{k}");
        match k.as_str() {
            "marker" => {
                seen.0 = true;
                marker(v, &path, imp);
            }
            "firefly" => firefly(v, &path, period_ms, imp),
            "prometheus" => {
                seen.1 = true;
                let (mut addr, mut port) = ("127.0.0.1".to_owned(), 8080);
                for (k, v) in entries(v, &path, imp) {
                    let key = format!("{path}.{k}");
                    match k.as_str() {
                        "bindAddress" => addr = string(v).unwrap_or(addr),
                        "netlinkPort" => port = int(v).unwrap_or(port),
                        "skopsPort" => imp.unmapped(
                            key,
                            "one /metrics serves every series (no sk_ops enricher, its flow_tcp_* come from sock_diag)",
                        ),
                        "log" if v.as_bool() == Some(false) => {}
                        "log" => imp.unmapped(key, "scrapes are not logged"),
                        other => unknown(&format!("{path}.{other}"), imp),
                    }
                }
                imp.set("metrics", "enabled", true);
                if let Some(addr) = bind_ip(&addr, &format!("{path}.bindAddress"), imp) {
                    imp.set("metrics", "listen", host_port(&addr, port));
                }
                imp.set("metrics", "per_flow", true);
            }
            other => unknown(&format!("backends.{other}"), imp),
        }
    }
    seen
}

fn marker(v: &Value, path: &str, imp: &mut Imported) {
    let mut ifaces = vec!["lo".to_owned()];
    let mut discover = false;
    for (k, v) in entries(v, path, imp) {
        let key = format!("{path}.{k}");
        match k.as_str() {
            "targetInterfaces" => ifaces = strings(v),
            "discoverInterfaces" => discover = v.as_bool().unwrap_or(false),
            // flowd-rs leaves every interface as it found it.
            "removeQdisc" if v.as_bool() == Some(true) => {}
            "removeQdisc" => imp.unmapped(key, "flowd-rs always removes what it attached when it stops"),
            "programPath" if string(v).is_some_and(|s| s.is_empty()) => {}
            "debugMode" if v.as_bool() == Some(false) => {}
            "programPath" | "debugMode" => imp.unmapped(key, "flowd-rs runs its own programs, built in"),
            "markingStrategy" => {
                let s = string(v).unwrap_or_default();
                match strategy(&s) {
                    Some(st) => imp.set("marker", "strategy", st),
                    None => imp.unmapped(key, format!("unknown strategy `{s}`")),
                }
            }
            "matchAll" if v.as_bool() == Some(false) => {}
            // The perfsonar plugin's policy (a rule without match fields) does it.
            "matchAll" => imp.unmapped(
                key,
                "a policy rule with no match field tags every flow (plugins.perfsonar imports as one)",
            ),
            other => unknown(&format!("{path}.{other}"), imp),
        }
    }
    // flowd-rs's empty list is flowd-go's discovery: every interface with a global IPv6.
    let ifaces: Vec<String> = if discover { Vec::new() } else { ifaces };
    imp.set("marker", "interfaces", ifaces);
}

/// flowd-go's strategy names (case-insensitive) as flowd-rs spells them.
fn strategy(s: &str) -> Option<&'static str> {
    Some(match s.to_ascii_lowercase().as_str() {
        "label" => "label",
        "hopbyhop" => "hop-by-hop",
        "destination" => "destination",
        "hopbyhopdestination" => "hop-by-hop+destination",
        _ => return None,
    })
}

fn firefly(v: &Value, path: &str, period_ms: i64, imp: &mut Imported) {
    imp.set("fireflies", "enabled", true);
    let (mut to_collector, mut addr, mut port) = (false, "127.0.0.1".to_owned(), 10514);
    let (mut enrich, mut mode) = (false, "lean".to_owned());
    for (k, v) in entries(v, path, imp) {
        let key = format!("{path}.{k}");
        match k.as_str() {
            "destinationPort" => {
                if let Some(p) = int(v) {
                    imp.set("fireflies", "remote_port", p);
                }
            }
            "prependSyslog" => imp.set("fireflies", "syslog_header", v.as_bool().unwrap_or(true)),
            "sendToCollector" => to_collector = v.as_bool().unwrap_or(false),
            "collectorAddress" => addr = string(v).unwrap_or(addr),
            "collectorPort" => port = int(v).unwrap_or(port),
            "enrich" => enrich = v.as_bool().unwrap_or(false),
            "enrichmentMode" => mode = string(v).unwrap_or(mode),
            "stun" => stun(v, &key, imp),
            other => unknown(&format!("{path}.{other}"), imp),
        }
    }
    if to_collector {
        imp.set("fireflies", "collectors", vec![host_port(&addr, port)]);
    }
    if enrich {
        // flowd-go sends an enriched ongoing firefly each enrichers.period (ms);
        // flowd-rs's interval is in whole seconds.
        let secs = ((period_ms + 500) / 1000).max(1);
        if secs * 1000 != period_ms {
            imp.note(format!(
                "fireflies.ongoing_interval_s = {secs}: enrichers.period {period_ms} ms rounded to whole seconds"
            ));
        }
        imp.set("fireflies", "ongoing_interval_s", secs);
        let m = match mode.as_str() {
            "lean" => "lean",
            "compatible" => {
                imp.unmapped(
                    format!("{path}.enrichmentMode"),
                    "`compatible` (flowd's flat layout) is not rendered; imported as `full`",
                );
                "full"
            }
            _ => "full",
        };
        imp.set("fireflies", "enrich", m);
    }
}

/// flowd-go's STUN servers when its `stun` section names none (internal/stun).
const STUN_SERVERS: [&str; 5] = [
    "stun.l.google.com:3478",
    "stun1.l.google.com:3478",
    "stun2.l.google.com:3478",
    "stun3.l.google.com:3478",
    "stun4.l.google.com:3478",
];

fn stun(v: &Value, path: &str, imp: &mut Imported) {
    let mut servers = None;
    for (k, v) in entries(v, path, imp) {
        let key = format!("{path}.{k}");
        match k.as_str() {
            "manualMapping" => {
                let mut map = toml::Table::new();
                for (from, to) in entries(v, &key, imp) {
                    match string(to) {
                        Some(to) => {
                            map.insert(from, to.into());
                        }
                        None => imp.unmapped(format!("{key}.{from}"), "not an address"),
                    }
                }
                if !map.is_empty() {
                    imp.set("fireflies", "public_addresses", map);
                }
            }
            "stunServers" => {
                let mut ok = Vec::new();
                for s in strings(v) {
                    match s.parse::<crate::config::Collector>() {
                        Ok(_) => ok.push(s),
                        Err(e) => imp.unmapped(format!("{key}: {s}"), e),
                    }
                }
                servers = Some(ok);
            }
            other => unknown(&format!("{path}.{other}"), imp),
        }
    }
    let servers = servers.unwrap_or_else(|| {
        imp.note(format!(
            "fireflies.stun.servers: flowd-go's defaults ({}), as its stun section names none",
            STUN_SERVERS.join(", ")
        ));
        STUN_SERVERS.iter().map(|s| s.to_string()).collect()
    });
    if !servers.is_empty() {
        let mut t = toml::Table::new();
        t.insert("servers".into(), servers.into());
        imp.set("fireflies", "stun", t);
    }
}

fn enrichers(v: &Value, imp: &mut Imported) {
    for (k, v) in entries(v, "enrichers", imp) {
        let path = format!("enrichers.{k}");
        match k.as_str() {
            // Used by backends.firefly.enrich.
            "period" => {}
            "netlink" => {
                for (k, v) in entries(v, &path, imp) {
                    let key = format!("{path}.{k}");
                    match k.as_str() {
                        "protocol" if int(v) == Some(6) => {}
                        "protocol" | "ext" | "state" => imp.unmapped(
                            key,
                            "flowd-rs asks sock_diag for tcp_info and congestion control of each tagged TCP flow",
                        ),
                        other => unknown(&format!("{path}.{other}"), imp),
                    }
                }
            }
            "skops" => imp.unmapped(
                path,
                "no sk_ops enricher: enrichment comes from sock_diag (fireflies.enrich)",
            ),
            other => unknown(&format!("enrichers.{other}"), imp),
        }
    }
}

fn unknown(key: &str, imp: &mut Imported) {
    imp.unmapped(
        key.trim_start_matches('.'),
        "not a flowd-go key (flowd-go ignores it too)",
    );
}

/// A mapping's entries in file order; `null` (a key with nothing under it) is empty.
fn entries<'a>(v: &'a Value, path: &str, imp: &mut Imported) -> Vec<(String, &'a Value)> {
    match v {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| (string(k).unwrap_or_else(|| format!("{k:?}")), v))
            .collect(),
        Value::Null => Vec::new(),
        _ => {
            imp.unmapped(path, "expected a mapping");
            Vec::new()
        }
    }
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(int).collect())
        .unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(string).collect())
        .unwrap_or_default()
}

/// A bind address as flowd-rs takes it (an IP address); `localhost` is loopback.
fn bind_ip(addr: &str, key: &str, imp: &mut Imported) -> Option<String> {
    if addr == "localhost" {
        return Some("127.0.0.1".into());
    }
    if addr.parse::<std::net::IpAddr>().is_ok() {
        return Some(addr.to_owned());
    }
    imp.unmapped(
        key,
        format!("`{addr}` is not an IP address (flowd-rs binds to addresses, not names)"),
    );
    None
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>()
        .is_ok_and(|a| a.is_loopback())
        || addr == "localhost"
}
