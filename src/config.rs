//! The daemon's configuration file (`--config`, TOML), with every default in one place.
//!
//! Unknown keys are rejected, and every error names the file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::bpf::marker::types::flowd_strategy_bit;

/// Where `flowd-rs` looks when `--config` is not given; a missing default file means
/// "all defaults", a missing file named on the command line is an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flowd-rs/flowd-rs.toml";
pub const DEFAULT_STATE_DIR: &str = "/run/flowd-rs";
pub const DEFAULT_MAP_CAPACITY: u32 = 65_536;
pub const DEFAULT_POLICY_DIR: &str = "/etc/flowd-rs/policies.d";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Runtime state: the control socket and the record of what is attached where.
    pub state_dir: PathBuf,
    pub marker: MarkerConfig,
    pub control: ControlConfig,
    pub policy: PolicyConfig,
    pub discovery: DiscoveryConfig,
    pub metrics: MetricsConfig,
    pub fireflies: FireflyConfig,
    pub announcements: AnnouncementConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            marker: MarkerConfig::default(),
            control: ControlConfig::default(),
            policy: PolicyConfig::default(),
            discovery: DiscoveryConfig::default(),
            metrics: MetricsConfig::default(),
            fireflies: FireflyConfig::default(),
            announcements: AnnouncementConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnouncementConfig {
    /// UDP addresses on which applications' fireflies are heard (XRootD's pmark
    /// sends them to the local host); empty: none. A start or ongoing firefly tags
    /// its flow, overriding the policy; an end withdraws it.
    pub firefly_listen: Vec<std::net::SocketAddr>,
    /// Sources whose fireflies are heard; loopback by default. An announcement
    /// changes how this host's traffic is marked: widen with care.
    pub firefly_allow: Vec<ipnet::IpNet>,
    /// A named pipe created at start taking the peers' flow events, one per line:
    /// `start|end tcp|udp SRC SPORT DST DPORT EXPERIMENT ACTIVITY`.
    pub pipe: Option<PathBuf>,
    /// flowd-go's HTTP API (`POST /flow`), e.g. "127.0.0.1:7777" (flowd-go's
    /// default); absent: off. Anyone who can connect can retag this host's flows:
    /// keep it on loopback.
    pub http_listen: Option<std::net::SocketAddr>,
    /// How long an announcement waits for discovery to find its flow, seconds.
    pub grace_secs: u64,
    /// Local users (names or uids) whose fireflies are heard besides root's; each
    /// may name only flows of its own sockets. The sender is identified by the
    /// owner of its UDP socket (sock_diag); other local users are refused.
    pub allow_users: Vec<String>,
    /// Groups (names or gids) whose members are heard as `allow_users` are.
    pub allow_groups: Vec<String>,
    /// At most this many announcements are held; more are dropped and counted
    /// (`dropped_full` in status, `flowd_announcements_dropped_total`).
    pub max_held: usize,
    /// The inputs whose flows get this daemon's fireflies (when `fireflies.enabled`),
    /// as flowd-go sends one for every flow event its plugins receive. An
    /// application that announces through the pipe sends none itself; one that
    /// announces by firefly already sent its own, so `firefly` is left out by default.
    pub fireflies_for: Vec<AnnounceInput>,
}

/// An announcement input, as named in `announcements.fireflies_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnounceInput {
    Pipe,
    Firefly,
    Http,
}

impl Default for AnnouncementConfig {
    fn default() -> Self {
        AnnouncementConfig {
            firefly_listen: Vec::new(),
            firefly_allow: vec![
                "127.0.0.0/8".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ],
            pipe: None,
            http_listen: None,
            grace_secs: 30,
            allow_users: Vec::new(),
            allow_groups: Vec::new(),
            max_held: 16_384,
            fireflies_for: vec![AnnounceInput::Pipe, AnnounceInput::Http],
        }
    }
}

impl AnnouncementConfig {
    pub fn enabled(&self) -> bool {
        !self.firefly_listen.is_empty() || self.pipe.is_some() || self.http_listen.is_some()
    }
}

/// The UDP port SciTags assigns to firefly collectors (and the remote host's
/// receiver).
pub const FIREFLY_PORT: u16 = 10514;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FireflyConfig {
    /// Send a firefly (UDP, JSON) at the start and end of every tagged flow, IPv4 and
    /// IPv6. Off by default: it sends packets to hosts besides the flow's own.
    pub enabled: bool,
    /// Collectors that receive every firefly, as `address:port` or `name:port`
    /// (`global.scitags.org:10514`). Names are resolved in the background, at start
    /// and every `resolve_interval_s`, never on the send path: the daemon needs no
    /// DNS to start, and a failed lookup keeps the addresses last resolved.
    pub collectors: Vec<Collector>,
    /// How often collector names are resolved again, seconds (>= 1).
    pub resolve_interval_s: u64,
    /// Source addresses rewritten in fireflies (a host behind NAT reports the
    /// address the far side sees): private prefix -> public address, e.g.
    /// `{ "10.0.0.0/8" = "192.0.2.7" }`. The longest matching prefix wins; the
    /// public address must be of the prefix's family.
    pub public_addresses: std::collections::BTreeMap<String, std::net::IpAddr>,
    /// Also send each firefly to the flow's remote host, on `remote_port` (the
    /// convention: the far site may listen for its peers' fireflies).
    pub to_remote: bool,
    pub remote_port: u16,
    /// Put an RFC 5424 syslog header in front of the JSON (what syslog-based
    /// collectors expect); `false` sends the bare JSON object.
    pub syslog_header: bool,
    /// Also send an `ongoing` firefly for every announced flow this often, seconds;
    /// 0 never. A timer of its own, independent of the reconcile interval.
    pub ongoing_interval_s: u64,
    /// Add the flow's TCP facts (tcp_info, congestion control) to `ongoing`
    /// fireflies as flowd-go's enrichment does (its `netlink` object): `lean` or
    /// `full`; absent, none.
    pub enrich: Option<EnrichMode>,
    /// Discover this host's public addresses with STUN (`[fireflies.stun]`), for
    /// the sources `public_addresses` does not map (that map wins).
    pub stun: StunConfig,
}

/// `[fireflies.stun]`: STUN servers asked for the address this host's traffic
/// leaves NAT with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StunConfig {
    /// `address:port` or `name:port`, tried in order per address family until one
    /// answers; empty (the default): no discovery. Nothing is asked of anyone by
    /// default: a STUN server learns this host's address.
    pub servers: Vec<Collector>,
    /// How often the servers are asked again, seconds (>= 1). A round with no answer
    /// keeps the last result.
    pub refresh_interval_s: u64,
}

impl Default for StunConfig {
    fn default() -> Self {
        StunConfig {
            servers: Vec::new(),
            refresh_interval_s: 300,
        }
    }
}

impl Default for FireflyConfig {
    fn default() -> Self {
        FireflyConfig {
            enabled: false,
            collectors: Vec::new(),
            to_remote: true,
            remote_port: FIREFLY_PORT,
            syslog_header: true,
            ongoing_interval_s: 0,
            enrich: None,
            resolve_interval_s: 300,
            public_addresses: Default::default(),
            stun: StunConfig::default(),
        }
    }
}

impl FireflyConfig {
    /// `public_addresses` parsed, longest prefix first.
    pub fn address_map(&self) -> Result<Vec<(ipnet::IpNet, std::net::IpAddr)>, String> {
        let mut map = Vec::with_capacity(self.public_addresses.len());
        for (prefix, public) in &self.public_addresses {
            let net: ipnet::IpNet = prefix
                .parse()
                .or_else(|_| prefix.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("`{prefix}` is not a prefix (10.0.0.0/8) nor an address"))?;
            if net.addr().is_ipv4() != public.is_ipv4() {
                return Err(format!(
                    "`{prefix}` maps to {public}, of the other address family"
                ));
            }
            map.push((net.trunc(), *public));
        }
        map.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        Ok(map)
    }
}

/// Which TCP facts enriched `ongoing` fireflies carry (`fireflies.enrich`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrichMode {
    /// flowd-go's `lean`: what fits a datagram beside the rest of the firefly.
    Lean,
    /// Every `tcp_info` field.
    Full,
}

/// A firefly collector: an address, or a host name resolved by the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collector {
    Addr(std::net::SocketAddr),
    Name { host: String, port: u16 },
}

impl FromStr for Collector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<std::net::SocketAddr>() {
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(format!(
                    "{a} is not a destination (needs an address and a port)"
                ));
            }
            return Ok(Collector::Addr(a));
        }
        let bad = || format!("`{s}` is not `address:port` nor `host.name:port`");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if port == 0 || !name_ok {
            return Err(bad());
        }
        Ok(Collector::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Collector::Addr(a) => write!(f, "{a}"),
            Collector::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl<'de> Deserialize<'de> for Collector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Loopback by default: per-experiment flow counts are not for the whole network.
    pub listen: std::net::SocketAddr,
    /// Also export `flow_tcp_*` series for every tagged TCP flow (flowd-go's names
    /// and labels), refreshed at each reconcile dump. Off by default: a series set
    /// per flow.
    pub per_flow: bool,
    /// At most this many flows get series; the rest are counted
    /// (`flowd_metrics_flows_left_out_total`).
    pub per_flow_max: usize,
}

/// Where `/metrics` listens unless configured otherwise. 9617 is in the exporters'
/// range (9100-9999); not yet checked against, nor registered in, the Prometheus
/// "default port allocations" wiki page.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9617";

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN.parse().expect("valid default"),
            per_flow: false,
            per_flow_max: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// One TOML file per experiment; a missing directory means "mark nothing" (with a warning).
    pub dir: PathBuf,
    /// A SciTags registry JSON file replacing the bundled snapshot.
    pub registry: Option<PathBuf>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: PathBuf::from(DEFAULT_POLICY_DIR),
            registry: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    pub tracker: TrackerSetting,
    /// Ring buffer between the tracker and the daemon, bytes (power of two, >= 4096).
    /// 4 MiB holds ~30 000 events: a burst of several thousand connections while the
    /// daemon is busy elsewhere; every socket of the host passes through it.
    pub ring_buffer_bytes: u32,
    /// Track connected UDP sockets with the tracker (a tp_btf on sys_exit).
    pub udp: bool,
    /// How often a full sock_diag dump reconciles the flow table, milliseconds,
    /// when the tracker does not see every socket change; otherwise the shortest
    /// gap between two dumps the tracker asks for after a loss.
    pub reconcile_interval_ms: u64,
    /// While the tracker sees every change (TCP state tracepoint, and UDP connect
    /// and release when `udp`), a full dump runs at start, after a loss the tracker
    /// counted (ring drop, skipped nested run) and else every this many seconds.
    /// 0: every `reconcile_interval_ms` regardless.
    pub full_dump_interval_s: u64,
    /// Where full dumps come from: `auto` (the BPF socket iterator when its
    /// programs load and the kernel has bpf_get_socket_cookie in iterators, 5.12;
    /// else sock_diag), `iterator` (refuse to start without it) or `sock_diag`.
    /// sock_diag also redoes any dump whose iterator walk failed.
    pub dump_source: DumpSourceSetting,
    /// Between those full dumps (interval, not after a loss), walk the sockets
    /// with the iterator folding them into digests instead of records, and
    /// compare with the table's (`verify walk`, about the cost of the kernel's walk
    /// alone). A difference brings a full dump at once. Used while the tracker sees
    /// every change, the socket iterator is the dump source and the table lacks
    /// nothing a dump would fill in; every 10th periodic reconcile is a full dump
    /// regardless (tcp_info for displays).
    pub verify_walks: bool,
    /// Where cgroup2 is mounted; found in /proc/self/mountinfo when absent.
    pub cgroup2: Option<PathBuf>,
    /// Also keep the sockets of other network namespaces (containers) that the
    /// host-wide tracker reports, for display only: they are never marked and never
    /// reconciled. Off, the table holds the daemon's namespace, as `ss` shows it,
    /// and the tracker's programs drop other namespaces' sockets before the ring
    /// buffer (a busy container then costs the daemon nothing).
    pub all_namespaces: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            tracker: TrackerSetting::Full,
            ring_buffer_bytes: 4 << 20,
            udp: true,
            reconcile_interval_ms: 5_000,
            full_dump_interval_s: 60,
            dump_source: DumpSourceSetting::Auto,
            verify_walks: true,
            cgroup2: None,
            all_namespaces: false,
        }
    }
}

/// Where the reconcile's full dumps come from (`discovery.dump_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DumpSourceSetting {
    Auto,
    Iterator,
    SockDiag,
}

/// Which eBPF socket tracker programs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerSetting {
    /// Tracepoints and cgroup programs (sockops, UDP hooks).
    Full,
    /// Tracepoints only (no cgroup2 needed).
    TracepointOnly,
    /// No tracker: sock_diag polling alone finds sockets, within one interval.
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarkerConfig {
    /// Interfaces to mark on; empty means every interface with a global IPv6 address.
    pub interfaces: Vec<String>,
    pub strategy: Strategy,
    pub attach: AttachMode,
    /// Flows the marker map holds; a full map is reported and counted, never silent.
    pub map_capacity: u32,
    /// Decide the kernel-decidable rules in the kernel (sockops at connect, the TC
    /// program on a SYN-ACK or connected-UDP miss), so matched flows are marked from
    /// their first packet. `false` leaves every decision to userspace, after the
    /// tracker reports the socket (the first packets then go out unmarked).
    pub in_kernel_decisions: bool,
    /// Remember each local socket's flow and mark in the socket itself, so its next
    /// packets skip the flow-map lookup (the TC program's main cost). `false` looks
    /// every packet up in the map.
    pub socket_cache: bool,
    /// Keep a second copy of the marks in a table the TC program reads without a
    /// hash-map call (buckets of four, two 72-byte slots per flow of `map_capacity`),
    /// so a packet that must be looked up (a flow's first, or one with no local
    /// socket) costs less than with the map alone. x86_64 only.
    pub flow_index: bool,
    /// Where the marker's links and maps are pinned (a bpf filesystem), one
    /// directory per network namespace below it, so that a restart or an upgrade
    /// adopts the running marker instead of leaving a gap. `""` turns pinning off:
    /// every exit then detaches, and the next start attaches afresh.
    pub pin_dir: PathBuf,
    /// Remove the marker (links, filters, pins) on every exit instead of leaving
    /// it marking for the next start; `flowd-rs run --detach-on-exit` does the same.
    pub detach_on_exit: bool,
}

/// Default `marker.pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowd-rs";

impl Default for MarkerConfig {
    fn default() -> Self {
        MarkerConfig {
            interfaces: Vec::new(),
            strategy: Strategy::LABEL,
            attach: AttachMode::Auto,
            map_capacity: DEFAULT_MAP_CAPACITY,
            in_kernel_decisions: true,
            socket_cache: true,
            flow_index: true,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            detach_on_exit: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The control socket; default `<state_dir>/control.sock`.
    pub socket: Option<PathBuf>,
    /// Group allowed to use the control socket besides root (mode 0660).
    pub group: Option<String>,
    /// Connections one user other than root may hold open at once.
    pub max_connections_per_user: usize,
    /// A connection without a request for this long is closed, seconds.
    pub idle_timeout_secs: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: None,
            group: None,
            max_connections_per_user: 16,
            idle_timeout_secs: 60,
        }
    }
}

impl Config {
    /// Loads `path`; `explicit` says whether the user named it (then it must exist).
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(e) => anyhow::bail!("cannot read config {}: {e}", path.display()),
        };
        Config::parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
    }

    /// Parses config text; the error reads `line:col: message`.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| located(text, &e))?;
        // An interface named twice is one interface: attaching twice would fail
        // with the kernel's bare "File exists".
        let mut seen = std::collections::HashSet::new();
        cfg.marker.interfaces.retain(|i| seen.insert(i.clone()));
        if cfg.control.max_connections_per_user == 0 || cfg.control.idle_timeout_secs == 0 {
            return Err(
                "control.max_connections_per_user and control.idle_timeout_secs must be at least 1"
                    .into(),
            );
        }
        if cfg.announcements.max_held == 0 {
            return Err("announcements.max_held must be at least 1".into());
        }
        if cfg.marker.map_capacity == 0 {
            return Err("marker.map_capacity must be at least 1".into());
        }
        if cfg.discovery.reconcile_interval_ms < 100 {
            return Err("discovery.reconcile_interval_ms must be at least 100".into());
        }
        let ff = &cfg.fireflies;
        if ff.enabled && ff.collectors.is_empty() && !ff.to_remote {
            return Err(
                "fireflies.enabled = true, but there is nowhere to send them: \
                 list fireflies.collectors or set fireflies.to_remote = true"
                    .into(),
            );
        }
        if ff.to_remote && ff.remote_port == 0 {
            return Err("fireflies.remote_port must not be 0".into());
        }
        if let Err(e) = ff.address_map() {
            return Err(format!("fireflies.public_addresses: {e}"));
        }
        if ff.stun.refresh_interval_s == 0 {
            return Err("fireflies.stun.refresh_interval_s must be at least 1".into());
        }
        if ff.resolve_interval_s == 0 {
            return Err("fireflies.resolve_interval_s must be at least 1".into());
        }
        Ok(cfg)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.control
            .socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("control.sock"))
    }
}

/// `line:col: message` from a toml error, 1-based, as editors expect.
fn located(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!("{line}:{col}: {msg}")
        }
        None => msg.to_string(),
    }
}

pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Which marks the TC program writes; bits as in bpf/flowd.h (FLOWD_STRATEGY_*).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Strategy(u32);

impl Strategy {
    pub const LABEL: Strategy = Strategy(flowd_strategy_bit::FLOWD_STRATEGY_LABEL.0);
    pub const HOP_BY_HOP: Strategy = Strategy(flowd_strategy_bit::FLOWD_STRATEGY_HOP_BY_HOP.0);
    pub const DESTINATION: Strategy = Strategy(flowd_strategy_bit::FLOWD_STRATEGY_DESTINATION.0);

    pub fn bits(self) -> u32 {
        self.0
    }
    pub fn contains(self, other: Strategy) -> bool {
        self.0 & other.0 == other.0
    }
    /// The option headers written besides (or instead of) the label, for displays.
    pub fn headers(self) -> Option<&'static str> {
        match (
            self.contains(Strategy::HOP_BY_HOP),
            self.contains(Strategy::DESTINATION),
        ) {
            (true, true) => Some("hop-by-hop+destination"),
            (true, false) => Some("hop-by-hop"),
            (false, true) => Some("destination"),
            (false, false) => None,
        }
    }
}

const STRATEGY_PARTS: [(&str, Strategy); 3] = [
    ("label", Strategy::LABEL),
    ("hop-by-hop", Strategy::HOP_BY_HOP),
    ("destination", Strategy::DESTINATION),
];

impl FromStr for Strategy {
    type Err = String;
    /// `label`, `hop-by-hop`, `destination`, or several joined by `+`
    /// (`hop-by-hop+destination`, `label+hop-by-hop`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut bits = 0;
        for part in s.split('+') {
            let part = part.trim();
            let (_, st) = STRATEGY_PARTS
                .iter()
                .find(|(n, _)| *n == part)
                .ok_or_else(|| {
                    format!(
                        "unknown marking strategy `{part}`: use label, hop-by-hop, destination, \
                         or several joined by `+` (e.g. hop-by-hop+destination)"
                    )
                })?;
            bits |= st.0;
        }
        Ok(Strategy(bits))
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = STRATEGY_PARTS
            .iter()
            .filter(|(_, st)| self.contains(*st))
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join("+"))
    }
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Strategy({self})")
    }
}

impl<'de> Deserialize<'de> for Strategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the TC program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX where the kernel has it (>= 6.6), else a clsact qdisc filter.
    Auto,
    /// TCX links only; fail on older kernels.
    Tcx,
    /// A clsact qdisc filter (the pre-6.6 way), even where TCX exists.
    Clsact,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.marker.strategy, Strategy::LABEL);
        assert_eq!(c.marker.map_capacity, 65_536);
        assert!(c.marker.in_kernel_decisions);
        assert!(c.marker.socket_cache);
        assert!(c.marker.flow_index);
        assert_eq!(
            c.control_socket(),
            PathBuf::from("/run/flowd-rs/control.sock")
        );
    }

    #[test]
    fn dump_source_takes_its_three_values_and_refuses_others() {
        assert_eq!(
            Config::default().discovery.dump_source,
            DumpSourceSetting::Auto
        );
        for (text, want) in [
            ("auto", DumpSourceSetting::Auto),
            ("iterator", DumpSourceSetting::Iterator),
            ("sock_diag", DumpSourceSetting::SockDiag),
        ] {
            let c = Config::parse(&format!("[discovery]\ndump_source = \"{text}\"\n")).unwrap();
            assert_eq!(c.discovery.dump_source, want);
        }
        let e = Config::parse("[discovery]\ndump_source = \"netlink\"\n").unwrap_err();
        assert!(e.contains("dump_source") || e.contains("netlink"), "{e}");
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            "state_dir = \"/tmp/x\"\n[marker]\ninterfaces = [\"eth0\"]\n\
             strategy = \"hop-by-hop+destination\"\nattach = \"clsact\"\nmap_capacity = 10\n\
             [control]\nsocket = \"/tmp/s\"\ngroup = \"flowd\"\n",
        )
        .unwrap();
        assert_eq!(c.marker.interfaces, ["eth0"]);
        assert_eq!(c.marker.strategy.bits(), 0x6);
        assert_eq!(c.marker.strategy.headers(), Some("hop-by-hop+destination"));
        assert_eq!(Strategy::LABEL.headers(), None);
        assert_eq!(c.marker.attach, AttachMode::Clsact);
        assert_eq!(c.control_socket(), PathBuf::from("/tmp/s"));
        let twice = Config::parse("[marker]\ninterfaces = [\"eth0\", \"eth1\", \"eth0\"]\n");
        assert_eq!(
            twice.unwrap().marker.interfaces,
            ["eth0", "eth1"],
            "listed twice, attached once"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_line_and_column() {
        let e =
            Config::parse("[marker]\nstrategy = \"label\"\ninterface = [\"eth0\"]\n").unwrap_err();
        assert!(e.starts_with("3:1: unknown field `interface`"), "{e}");
        assert!(e.contains("expected one of `interfaces`"), "{e}");
    }

    #[test]
    fn bad_strategy_names_the_value_and_line() {
        let e = Config::parse("[marker]\nstrategy = \"flow-label\"\n").unwrap_err();
        assert!(
            e.starts_with("2:12: unknown marking strategy `flow-label`"),
            "{e}"
        );
    }

    #[test]
    fn fireflies_parse_and_nowhere_to_send_is_refused() {
        let c = Config::parse(
            "[fireflies]\nenabled = true\ncollectors = [\"[fd00::9]:10514\", \"10.0.0.9:9999\"]\n\
             to_remote = false\nsyslog_header = false\nongoing_interval_s = 60\n",
        )
        .unwrap();
        assert_eq!(
            c.fireflies.collectors[0],
            Collector::Addr("[fd00::9]:10514".parse().unwrap())
        );
        assert_eq!(
            c.fireflies.collectors[1],
            Collector::Addr("10.0.0.9:9999".parse().unwrap())
        );
        assert!(!c.fireflies.to_remote && !c.fireflies.syslog_header);
        assert_eq!(c.fireflies.ongoing_interval_s, 60);
        assert_eq!(c.fireflies.enrich, None, "off unless asked");
        let c = Config::parse("[fireflies]\nenrich = \"full\"\n").unwrap();
        assert_eq!(c.fireflies.enrich, Some(EnrichMode::Full));
        let e = Config::parse("[fireflies]\nenrich = \"compatible\"\n").unwrap_err();
        assert!(e.starts_with("2:10: unknown variant `compatible`"), "{e}");

        let e = Config::parse("[fireflies]\nenabled = true\nto_remote = false\n").unwrap_err();
        assert!(e.contains("nowhere to send"), "{e}");
        let e = Config::parse("[fireflies]\ncollectors = [\"[::]:10514\"]\n").unwrap_err();
        assert!(
            e.starts_with("2:14: [::]:10514 is not a destination"),
            "{e}"
        );
        // Host names are taken (as flowd-go's collectorAddress), lower-cased.
        let c =
            Config::parse("[fireflies]\ncollectors = [\"Global.SciTags.org:10514\"]\n").unwrap();
        assert_eq!(
            c.fireflies.collectors,
            [Collector::Name {
                host: "global.scitags.org".into(),
                port: 10514
            }]
        );
        assert_eq!(
            c.fireflies.collectors[0].to_string(),
            "global.scitags.org:10514"
        );
        for bad in [
            "collector.example",
            "collector.example:0",
            "a..b:1",
            "a b:1",
            ":1",
        ] {
            let e = Config::parse(&format!("[fireflies]\ncollectors = [\"{bad}\"]\n")).unwrap_err();
            assert!(e.starts_with("2:14:") && e.contains("is not"), "{bad}: {e}");
        }
    }

    #[test]
    fn public_addresses_parse_longest_prefix_first_and_families_must_agree() {
        let c = Config::parse(
            "[fireflies.public_addresses]\n\"10.0.0.0/8\" = \"192.0.2.7\"\n\
             \"10.1.0.0/16\" = \"192.0.2.8\"\n\"fd00::1\" = \"2001:db8::1\"\n",
        )
        .unwrap();
        let map = c.fireflies.address_map().unwrap();
        let shown: Vec<String> = map.iter().map(|(n, a)| format!("{n}={a}")).collect();
        assert_eq!(
            shown,
            [
                "fd00::1/128=2001:db8::1",
                "10.1.0.0/16=192.0.2.8",
                "10.0.0.0/8=192.0.2.7"
            ]
        );
        let e = Config::parse("[fireflies.public_addresses]\n\"10.0.0.0/8\" = \"2001:db8::1\"\n")
            .unwrap_err();
        assert!(e.contains("other address family"), "{e}");
        let e =
            Config::parse("[fireflies.public_addresses]\n\"nat\" = \"192.0.2.1\"\n").unwrap_err();
        assert!(e.contains("`nat` is not a prefix"), "{e}");
    }

    #[test]
    fn announcements_default_to_off_and_loopback_only() {
        let c = Config::default().announcements;
        assert!(!c.enabled());
        assert_eq!(c.grace_secs, 30);
        assert!(c.firefly_allow.iter().all(|n| n.addr().is_loopback()));
        let c = Config::parse(
            "[announcements]\nfirefly_listen = [\"127.0.0.1:10514\"]\npipe = \"/run/flowd\"\n\
             firefly_allow = [\"10.0.0.0/8\"]\n",
        )
        .unwrap()
        .announcements;
        assert!(c.enabled());
        assert_eq!(c.pipe, Some(PathBuf::from("/run/flowd")));
        assert_eq!(
            c.fireflies_for,
            [AnnounceInput::Pipe, AnnounceInput::Http],
            "the default"
        );
        let c = Config::parse("[announcements]\nfireflies_for = [\"pipe\", \"firefly\"]\n")
            .unwrap()
            .announcements;
        assert_eq!(
            c.fireflies_for,
            [AnnounceInput::Pipe, AnnounceInput::Firefly]
        );
        let e = Config::parse("[announcements]\nfireflies_for = [\"ftp\"]\n").unwrap_err();
        assert!(e.starts_with("2:18: unknown variant `ftp`"), "{e}");
        let e = Config::parse("[announcements]\nfirefly_allow = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(e.starts_with("2:18:"), "{e}");
    }

    #[test]
    fn zero_capacity_is_rejected() {
        assert!(Config::parse("[marker]\nmap_capacity = 0\n").is_err());
    }

    #[test]
    fn strategy_round_trips_through_text() {
        for s in [
            "label",
            "hop-by-hop",
            "destination",
            "hop-by-hop+destination",
            "label+hop-by-hop",
        ] {
            assert_eq!(s.parse::<Strategy>().unwrap().to_string(), s);
        }
    }
}

#[cfg(test)]
mod packaged {
    use super::*;

    #[test]
    fn the_packaged_config_parses_to_the_defaults() {
        let text = include_str!("../packaging/flowd-rs.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
    }
}
