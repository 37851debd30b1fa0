//! How flows look to the outside (control socket, `inspect`): one JSON object per
//! flow with stable field names, and the filter scripts and `inspect` apply.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::discovery::types::{Direction, SockState};
use crate::flows::Flow;
use crate::marking::Decision;
use crate::policy::Registry;

pub fn state_name(s: SockState) -> &'static str {
    use SockState::*;
    match s {
        Established => "established",
        SynSent => "syn-sent",
        SynRecv => "syn-recv",
        FinWait1 => "fin-wait-1",
        FinWait2 => "fin-wait-2",
        TimeWait => "time-wait",
        Close => "close",
        CloseWait => "close-wait",
        LastAck => "last-ack",
        Listen => "listen",
        Closing => "closing",
        NewSynRecv => "new-syn-recv",
    }
}

pub fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
        Direction::Unknown => "unknown",
    }
}

/// The view of one flow (field names documented in the README, "Control protocol").
pub fn flow(
    f: &Flow,
    d: Option<&Decision>,
    reg: &Registry,
    user: impl Fn(u32) -> Option<String>,
) -> Value {
    let names = d.map(|d| reg.name_of(d.tag.experiment, d.tag.activity));
    json!({
        "cookie": f.cookie,
        "proto": f.key.proto.as_str(),
        "local": f.key.local,
        "remote": f.key.remote,
        "state": state_name(f.state),
        "direction": direction_name(f.direction),
        "netns": f.netns,
        "pid": f.owner.pid,
        "comm": f.owner.comm,
        "uid": f.owner.uid,
        "user": f.owner.uid.and_then(&user),
        "experiment": d.map(|d| d.tag.experiment),
        "experiment_name": names.as_ref().map(|n| n.experiment.clone()),
        "activity": d.map(|d| d.tag.activity),
        "activity_name": names.as_ref().map(|n| n.activity.clone()),
        "label": d.and_then(|d| d.label()),
        "rule": d.map(|d| d.rule.to_string()),
        "first_packet_exact": d.is_some_and(|d| d.first_packet_exact),
        "age_secs": f.first_seen.elapsed().as_secs_f64(),
        "tcp": f.tcp.map(|t| json!({
            "rtt_us": t.rtt_us, "rttvar_us": t.rttvar_us, "snd_cwnd": t.snd_cwnd,
            "total_retrans": t.total_retrans, "bytes_acked": t.bytes_acked,
            "bytes_received": t.bytes_received, "segs_out": t.segs_out, "segs_in": t.segs_in,
        })),
    })
}

/// Which flows a `flows` request wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowFilter {
    /// Experiment name or id.
    pub experiment: Option<String>,
    /// User name or uid.
    pub user: Option<String>,
    /// Substring of the process name.
    pub process: Option<String>,
    /// An address or CIDR matching either end.
    pub address: Option<String>,
    pub tagged_only: bool,
}

impl FlowFilter {
    pub fn matches(&self, v: &Value) -> bool {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        if self.tagged_only && n("experiment").is_none() {
            return false;
        }
        if let Some(e) = &self.experiment {
            let by_id = e
                .parse::<u64>()
                .ok()
                .is_some_and(|id| n("experiment") == Some(id));
            let by_name = s("experiment_name").is_some_and(|x| x.eq_ignore_ascii_case(e));
            if !by_id && !by_name {
                return false;
            }
        }
        if let Some(u) = &self.user {
            let by_id = u.parse::<u64>().ok().is_some_and(|id| n("uid") == Some(id));
            if !by_id && s("user").as_deref() != Some(u.as_str()) {
                return false;
            }
        }
        if let Some(p) = &self.process {
            if !s("comm").is_some_and(|c| c.contains(p.as_str())) {
                return false;
            }
        }
        if let Some(a) = &self.address {
            let net: Option<ipnet::IpNet> = a
                .parse()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(ipnet::IpNet::from));
            let Some(net) = net else { return false };
            let hit = |k: &str| {
                s(k).and_then(|x| x.parse::<std::net::SocketAddr>().ok())
                    .is_some_and(|sa| net.contains(&sa.ip()))
            };
            if !hit("local") && !hit("remote") {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Value {
        json!({"experiment": 2, "experiment_name": "atlas", "uid": 1000, "user": "xrootd",
               "comm": "xrootd", "local": "[fd00::1]:1094", "remote": "10.0.0.7:40000"})
    }

    #[test]
    fn filter_matches_each_field() {
        let f = |x: FlowFilter| x.matches(&v());
        assert!(f(FlowFilter::default()));
        assert!(f(FlowFilter {
            experiment: Some("ATLAS".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            experiment: Some("2".into()),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            experiment: Some("cms".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            user: Some("1000".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            user: Some("xrootd".into()),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            user: Some("root".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            process: Some("xroot".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            address: Some("10.0.0.0/8".into()),
            ..Default::default()
        }));
        assert!(f(FlowFilter {
            address: Some("fd00::1".into()),
            ..Default::default()
        }));
        assert!(!f(FlowFilter {
            address: Some("192.168.0.0/16".into()),
            ..Default::default()
        }));
        assert!(!FlowFilter {
            tagged_only: true,
            ..Default::default()
        }
        .matches(&json!({"experiment": null})));
    }
}
