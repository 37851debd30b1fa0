//! How the daemon's state looks from outside: builds the typed views of
//! [`crate::inspect::view`] (the stable, documented shapes of the control protocol)
//! from flows and decisions.

use crate::flows::Flow;
use crate::inspect::view::{FlowEventView, FlowView, TagTotals, TcpView};
use crate::marker::maps::TagCount;
use crate::marking::Decision;
use crate::model::socket::{Direction, SockState};
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

/// What the marker writes besides the label, for display.
#[derive(Debug, Clone, Copy, Default)]
pub struct MarkerShape {
    pub header: Option<&'static str>,
}

/// The view of one flow; `events` only when asked for one flow.
pub fn flow(
    f: &Flow,
    d: Option<&Decision>,
    reg: &Registry,
    shape: MarkerShape,
    user: Option<String>,
    counts: Option<(u64, u64)>,
    with_events: bool,
) -> FlowView {
    let names = d.map(|d| reg.name_of(d.tag.experiment, d.tag.activity));
    let mut events = Vec::new();
    if with_events {
        let by = match (f.seen_by.tracker, f.seen_by.sockdiag) {
            (true, true) => "the tracker, confirmed by sock_diag",
            (true, false) => "the tracker",
            _ => "a sock_diag dump",
        };
        events.push(FlowEventView {
            at_secs_ago: f.first_seen.elapsed().as_secs_f64(),
            what: format!("seen by {by}"),
        });
        if let (Some(d), Some(n)) = (d, &names) {
            events.push(FlowEventView {
                at_secs_ago: d.tagged_at.elapsed().as_secs_f64(),
                what: format!("tagged {n} by {}", d.rule),
            });
        }
    }
    FlowView {
        cookie: f.cookie,
        proto: f.key.proto.as_str().to_string(),
        local: f.key.local(),
        remote: f.key.remote(),
        state: state_name(f.state).to_string(),
        direction: direction_name(f.direction).to_string(),
        netns: f.netns,
        pid: f.owner.pid,
        comm: f.owner.comm.map(|c| c.to_string()),
        uid: f.owner.uid,
        user,
        experiment: d.map(|d| d.tag.experiment),
        experiment_name: names.as_ref().map(|n| n.experiment.clone()),
        activity: d.map(|d| d.tag.activity),
        activity_name: names.as_ref().map(|n| n.activity.clone()),
        label: d.and_then(|d| d.label()),
        header: d.filter(|d| d.in_map).and(shape.header).map(str::to_string),
        rule: d.map(|d| d.rule.to_string()),
        first_packet_exact: d.map(|d| d.first_packet_exact),
        packets: counts.map_or(0, |c| c.0),
        bytes: counts.map_or(0, |c| c.1),
        age_secs: f.first_seen.elapsed().as_secs_f64(),
        tcp: f.tcp.map(|t| TcpView {
            rtt_us: t.rtt_us,
            rttvar_us: t.rttvar_us,
            snd_cwnd: t.snd_cwnd,
            total_retrans: t.total_retrans,
            bytes_acked: t.bytes_acked,
            bytes_received: t.bytes_received,
            segs_out: t.segs_out,
            segs_in: t.segs_in,
        }),
        events,
    }
}

/// An empty row for a tag, named from the registry.
pub fn tag_row(experiment: u16, activity: u8, reg: &Registry) -> TagTotals {
    let n = reg.name_of(experiment, activity);
    TagTotals {
        experiment,
        experiment_name: Some(n.experiment),
        activity,
        activity_name: Some(n.activity),
        ..Default::default()
    }
}

/// Puts the marker's cumulative per-tag counts into `rows`, adding a row for a tag no
/// live flow holds any more (its counts stay visible), and keeps rows in tag order.
pub fn add_tag_counts(rows: &mut Vec<TagTotals>, per_tag: &[TagCount], reg: &Registry) {
    for t in per_tag {
        match rows
            .iter_mut()
            .find(|r| (r.experiment, r.activity) == (t.experiment, t.activity))
        {
            Some(r) => {
                r.packets = t.packets;
                r.bytes = t.bytes;
            }
            None => rows.push(TagTotals {
                packets: t.packets,
                bytes: t.bytes,
                ..tag_row(t.experiment, t.activity, reg)
            }),
        }
    }
    rows.sort_by_key(|r| (r.experiment, r.activity));
}

/// Serializes an iterator's items as a sequence, each built only when written.
pub struct SeqOf<I>(std::cell::Cell<Option<I>>);

impl<I> SeqOf<I> {
    pub fn new(items: I) -> Self {
        SeqOf(std::cell::Cell::new(Some(items)))
    }
}

impl<I, T> serde::Serialize for SeqOf<I>
where
    I: Iterator<Item = T>,
    T: serde::Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.take().into_iter().flatten())
    }
}
