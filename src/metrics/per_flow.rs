//! Per-flow TCP series (`metrics.per_flow`), named and labelled as flowd-go's
//! Prometheus backend names them (`flow_tcp_*`, labels `act`, `exp`, `src`, `dst`,
//! `flow` = `<sport:dport>`, `flavour` = `netlink`), so its dashboards read ours.
//! Opt-in and capped (`metrics.per_flow_max`): every series is a label set that a
//! busy host could multiply by thousands.

use std::fmt;
use std::net::IpAddr;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::model::socket::TcpStats;

/// One tagged TCP flow, as the last reconcile dump saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSeries {
    pub experiment: u16,
    pub activity: u8,
    /// Local end first, as the flow's fireflies describe it.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub tcp: TcpStats,
}

/// The exported flows and how many tagged flows the cap left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerFlow {
    pub series: Vec<FlowSeries>,
    /// Tagged flows left out since the daemon started (each counted once).
    pub left_out_total: u64,
}

type Field = fn(&TcpStats) -> u64;

/// flowd-go's names for the facts the dump carries. flowd-go declares its byte and
/// segment counts as gauges with a `_total` suffix; kept so, for its dashboards.
const FAMILIES: &[(&str, &str, Field)] = &[
    ("flow_tcp_rtt", "Round-trip time [us]", |t| t.rtt_us.into()),
    ("flow_tcp_rtt_var", "Round-trip time variance [us]", |t| {
        t.rttvar_us.into()
    }),
    (
        "flow_tcp_cwnd",
        "Sending congestion window [segments]",
        |t| t.snd_cwnd.into(),
    ),
    (
        "flow_tcp_retrans",
        "Retransmitted segments (tcpi_total_retrans)",
        |t| t.total_retrans.into(),
    ),
    (
        "flow_tcp_bytes_acked_total",
        "Bytes acknowledged by the peer (tcpi_bytes_acked)",
        |t| t.bytes_acked,
    ),
    (
        "flow_tcp_bytes_received_total",
        "Bytes received (tcpi_bytes_received)",
        |t| t.bytes_received,
    ),
    ("flow_tcp_segs_out_total", "Segments sent", |t| {
        t.segs_out.into()
    }),
    ("flow_tcp_segs_in_total", "Segments received", |t| {
        t.segs_in.into()
    }),
];

pub fn encode(enc: &mut DescriptorEncoder, p: &PerFlow) -> fmt::Result {
    let labels: Vec<[(&str, String); 6]> = p
        .series
        .iter()
        .map(|s| {
            [
                ("act", s.activity.to_string()),
                ("exp", s.experiment.to_string()),
                ("src", s.src.to_string()),
                ("dst", s.dst.to_string()),
                ("flow", format!("<{}:{}>", s.sport, s.dport)),
                ("flavour", "netlink".to_string()),
            ]
        })
        .collect();
    for (name, help, field) in FAMILIES {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (s, l) in p.series.iter().zip(&labels) {
            ConstGauge::new(field(&s.tcp) as i64).encode(m.encode_family(l)?)?;
        }
    }
    Ok(())
}
