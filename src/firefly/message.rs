//! One firefly on the wire: the JSON object of the SciTags firefly schema v1, with the
//! optional RFC 5424 syslog header in front (README, "Fireflies").
//!
//! Pure: everything the datagram says is in [`Firefly`], so the bytes can be pinned
//! by tests and checked against the published schema.

use std::net::SocketAddr;
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::model::socket::{FlowKey, Protocol};
use crate::model::tag::Tag;

/// Where a flow is in its life, as the firefly says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Start,
    Ongoing,
    End,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Start => "start",
            State::Ongoing => "ongoing",
            State::End => "end",
        }
    }
}

/// Bytes of the flow so far, from the kernel's tcp_info (TCP only): `sent` is
/// tcpi_bytes_acked, `received` tcpi_bytes_received. Both count sequence space, so a
/// SYN or FIN is one byte (a closed connection that sent N bytes reports N + 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub received: u64,
    pub sent: u64,
}

/// Everything one firefly reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firefly {
    pub state: State,
    pub key: FlowKey,
    pub tag: Tag,
    pub start: SystemTime,
    /// When the message is built ("current-time").
    pub now: SystemTime,
    /// Required by the schema when `state` is end.
    pub end: Option<SystemTime>,
    pub usage: Option<Usage>,
    /// The process that owns the socket (its comm), when known.
    pub application: Option<String>,
}

/// The datagram must fit an ordinary MTU (spec: under ~1400 bytes); the longest fixed
/// part with two full IPv6 addresses and a syslog header is under 700 bytes, so only
/// the free-text application name can push it over, and it is cut to this.
const APPLICATION_MAX: usize = 128;

/// RFC 3339, UTC, microseconds, "+00:00" as in the schema's samples.
pub fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Micros, false)
}

#[derive(Serialize)]
struct Wire<'a> {
    version: u8,
    #[serde(rename = "flow-lifecycle")]
    lifecycle: Lifecycle,
    #[serde(rename = "flow-id")]
    flow_id: FlowId,
    context: Context<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    /// flowd-go's enrichment object (tcp_info, congestion control), pre-rendered.
    #[serde(skip_serializing_if = "Option::is_none")]
    netlink: Option<&'a serde_json::value::RawValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Lifecycle {
    state: State,
    start_time: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_time: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FlowId {
    afi: &'static str,
    src_ip: String,
    dst_ip: String,
    protocol: &'static str,
    src_port: u16,
    dst_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Context<'a> {
    experiment_id: u16,
    activity_id: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    application: Option<&'a str>,
}

impl Firefly {
    /// The JSON object. The flow is described as this host sends it: source is the
    /// local end (spec: "as seen by the host that sends the packets").
    pub fn json(&self) -> Vec<u8> {
        self.json_with(None)
    }

    /// The JSON object with `netlink` (a JSON object's text, see `crate::enrich`)
    /// added; text that is not JSON is left out.
    pub fn json_with(&self, netlink: Option<&str>) -> Vec<u8> {
        let netlink: Option<&serde_json::value::RawValue> =
            netlink.and_then(|n| serde_json::from_str(n).ok());
        let (local, remote): (SocketAddr, SocketAddr) = (self.key.local(), self.key.remote());
        let wire = Wire {
            version: 1,
            lifecycle: Lifecycle {
                state: self.state,
                start_time: rfc3339(self.start),
                current_time: rfc3339(self.now),
                end_time: self.end.map(rfc3339),
            },
            flow_id: FlowId {
                afi: if local.is_ipv6() { "ipv6" } else { "ipv4" },
                src_ip: local.ip().to_string(),
                dst_ip: remote.ip().to_string(),
                protocol: match self.key.proto {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                },
                src_port: local.port(),
                dst_port: remote.port(),
            },
            context: Context {
                experiment_id: self.tag.experiment,
                activity_id: self.tag.activity,
                application: self.application.as_deref().map(truncate_application),
            },
            usage: self.usage,
            netlink,
        };
        serde_json::to_vec(&wire).expect("a firefly always serializes")
    }

    /// The datagram: the JSON, behind an RFC 5424 header when `syslog_host` is given
    /// (priority 134 = local0.info, version 1, app flowd-rs, msgid firefly-json).
    pub fn datagram(&self, syslog_host: Option<&str>) -> Vec<u8> {
        self.datagram_with(syslog_host, None)
    }

    /// The datagram with flowd-go's `netlink` enrichment object (see
    /// [`Self::json_with`]).
    pub fn datagram_with(&self, syslog_host: Option<&str>, netlink: Option<&str>) -> Vec<u8> {
        let json = self.json_with(netlink);
        match syslog_host {
            None => json,
            Some(host) => {
                let mut out = format!(
                    "<134>1 {} {} flowd-rs - firefly-json - ",
                    rfc3339(self.now),
                    syslog_hostname(host)
                )
                .into_bytes();
                out.extend_from_slice(&json);
                out
            }
        }
    }
}

fn truncate_application(s: &str) -> &str {
    if s.len() <= APPLICATION_MAX {
        return s;
    }
    let mut end = APPLICATION_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// RFC 5424 HOSTNAME: 1..255 printable US-ASCII characters, "-" when unknown.
fn syslog_hostname(host: &str) -> String {
    let clean: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if clean.is_empty() {
        "-".into()
    } else {
        clean
    }
}

/// What a received firefly says about a flow: enough to mark it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub state: State,
    /// Source as local end, as the sender saw the flow.
    pub key: FlowKey,
    pub tag: Tag,
}

/// Why a received datagram is not a usable firefly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("no JSON object in the datagram")]
    NoJson,
    #[error("not a firefly: {0}")]
    Json(String),
    #[error("firefly version {0}: only version 1 is understood")]
    Version(u64),
    #[error("flow-id: {0}")]
    FlowId(String),
    #[error("context: {0}")]
    Tag(#[from] crate::model::tag::TagError),
}

#[derive(Deserialize)]
struct InWire {
    version: u64,
    #[serde(rename = "flow-lifecycle")]
    lifecycle: InLifecycle,
    #[serde(rename = "flow-id")]
    flow_id: InFlowId,
    context: InContext,
}

#[derive(Deserialize)]
struct InLifecycle {
    state: State,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct InFlowId {
    afi: String,
    src_ip: std::net::IpAddr,
    dst_ip: std::net::IpAddr,
    protocol: String,
    src_port: u16,
    dst_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct InContext {
    experiment_id: u16,
    activity_id: u8,
}

/// Reads a firefly datagram, with or without a syslog header (the JSON object
/// starts at the first `{`; no header field contains one). Unknown members are
/// ignored: senders add enrichment of their own.
pub fn parse(datagram: &[u8]) -> Result<Received, ParseError> {
    let start = datagram
        .iter()
        .position(|&b| b == b'{')
        .ok_or(ParseError::NoJson)?;
    let w: InWire =
        serde_json::from_slice(&datagram[start..]).map_err(|e| ParseError::Json(e.to_string()))?;
    if w.version != 1 {
        return Err(ParseError::Version(w.version));
    }
    let f = w.flow_id;
    let proto = match f.protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        p => return Err(ParseError::FlowId(format!("protocol {p:?} (tcp or udp)"))),
    };
    let family_ok = match f.afi.as_str() {
        "ipv4" => f.src_ip.is_ipv4() && f.dst_ip.is_ipv4(),
        "ipv6" => f.src_ip.is_ipv6() && f.dst_ip.is_ipv6(),
        a => return Err(ParseError::FlowId(format!("afi {a:?} (ipv4 or ipv6)"))),
    };
    if !family_ok {
        return Err(ParseError::FlowId(format!(
            "addresses {} and {} are not {}",
            f.src_ip, f.dst_ip, f.afi
        )));
    }
    if f.src_port == 0 || f.dst_port == 0 {
        return Err(ParseError::FlowId("port 0".into()));
    }
    Ok(Received {
        state: w.lifecycle.state,
        key: FlowKey::new(
            proto,
            SocketAddr::new(f.src_ip, f.src_port),
            SocketAddr::new(f.dst_ip, f.dst_port),
        ),
        tag: Tag::new(w.context.experiment_id, w.context.activity_id)?,
    })
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
