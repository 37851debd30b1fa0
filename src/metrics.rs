//! Prometheus exposition: what the daemon counts, served on `GET /metrics`.
//!
//! Most values are read at scrape time from a [`MetricsSource`] the daemon provides
//! (a custom prometheus-client collector turns one [`Snapshot`] into all series), so
//! nothing is counted twice: the BPF per-CPU counters are already cumulative totals,
//! and copying them into `inc()`-only counters would need last-seen bookkeeping in
//! the hot path. The one value that is not a total, the sock_diag poll duration, is a
//! histogram the daemon feeds with [`Metrics::observe_poll`].
//!
//! The endpoint listens on 127.0.0.1:9617 by default ([`crate::config::DEFAULT_METRICS_LISTEN`]): loopback
//! only, because flow counts per experiment are not for the whole network; bind a
//! routable address deliberately in the configuration to let a remote Prometheus in.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use self::per_flow::{FlowSeries, PerFlow};
use crate::api::view::{AnnouncementCounters, ControlConnections};
use crate::api::view::{FireflyStatus, TagTotals};

/// Upper bounds of the sock_diag poll duration histogram, in seconds.
pub const POLL_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
mod per_flow;

/// Scrapes served at once; more wait for a slot (backpressure, not an error).
const MAX_CONNECTIONS: usize = 16;

/// Everything the daemon reports at one scrape. Counters are cumulative since the
/// daemon started; a value that goes down (a BPF map recreated) is treated as a reset
/// and added on top of what was already exposed, so exposed counters never go down.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Flows in the flow table.
    pub flows_tracked: u64,
    /// Per tag: `flows` now holding it (gauge), `packets`/`bytes` marked (counters,
    /// the BPF `flowd_tag_counters` totals). The same rows `status` reports.
    pub tags: Vec<TagTotals>,
    /// Packets per marker outcome, every name of `marker::maps::OUTCOMES` (zeros
    /// included, so the series exist from the first scrape).
    pub outcomes: Vec<(String, u64)>,
    pub map_entries: u64,
    pub map_capacity: u64,
    /// Marks the flow index lacks (`None`: no index); read by the scrape.
    pub map_unindexed: Option<u64>,
    /// Tracker ring buffer records lost.
    pub ringbuf_drops: u64,
    /// Sockets sock_diag found that the tracker had missed (`added`), and tracked
    /// flows sock_diag no longer lists (`ended`).
    pub reconcile_added: u64,
    pub reconcile_ended: u64,
    pub policy_reloads_ok: u64,
    pub policy_reloads_failed: u64,
    /// Tags that found the marker map full (their flow left unmarked).
    pub map_full: u64,
    /// sock_diag dumps that failed (nothing reconciled that round).
    pub dump_errors: u64,
    /// Kernel first-packet marks that userspace's decision replaced.
    pub kernel_overridden: u64,
    /// Present when fireflies are on.
    pub fireflies: Option<FireflyStatus>,
    /// Present when an announcement input is on.
    pub announcements: Option<AnnouncementCounters>,
    /// Reads of socket owners' facts /proc refused, by fact (owner, exe, cgroup):
    /// the daemon lacks a capability, and rules on that fact cannot match.
    pub facts_denied: Vec<(&'static str, u64)>,
    /// Per tracker program (function name), runs the kernel skipped because the
    /// program was already running on that CPU: events lost without a ring drop.
    /// Empty where the kernel does not count them.
    pub recursion_misses: Vec<(&'static str, u64)>,
    /// TCP state changes the sockops STATE_CB reported in place of a skipped
    /// tracepoint run.
    pub state_cb_events: u64,
    /// Full sock_diag dumps the tracker asked for after a loss it counted.
    pub dumps_requested: u64,
    /// Full dumps whose socket-iterator walk failed and that sock_diag made again.
    pub dump_source_fallbacks: u64,
    /// Verify walks in place of periodic full dumps, by outcome.
    pub verify_walks: crate::flows::VerifyCounters,
    pub control: ControlConnections,
    /// Present when `metrics.per_flow` is on.
    pub per_flow: Option<Arc<PerFlow>>,
}

/// Gives the current [`Snapshot`]; called once per scrape, on a blocking thread.
pub trait MetricsSource: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
}

impl<F: Fn() -> Snapshot + Send + Sync + 'static> MetricsSource for F {
    fn snapshot(&self) -> Snapshot {
        self()
    }
}

/// A snapshot the daemon publishes (e.g. after each poll) for scrapes to read, when
/// the facts live in a task rather than behind something a closure can read.
#[derive(Debug, Default)]
pub struct Published(Mutex<Snapshot>);

impl Published {
    pub fn set(&self, s: Snapshot) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

impl MetricsSource for Published {
    fn snapshot(&self) -> Snapshot {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl<T: MetricsSource> MetricsSource for Arc<T> {
    fn snapshot(&self) -> Snapshot {
        (**self).snapshot()
    }
}

/// Fixed at start: `flowd_build_info{version,strategy} 1`.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    pub version: String,
    pub strategy: String,
}

/// The registry and the one metric fed directly.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    poll_duration: Histogram,
}

impl Metrics {
    pub fn new(build: BuildInfo, source: impl MetricsSource) -> Metrics {
        let mut registry = Registry::default();
        let poll_duration = Histogram::new(POLL_BUCKETS);
        registry.register(
            "flowd_sockdiag_poll_duration_seconds",
            "Time one sock_diag dump of all sockets took",
            poll_duration.clone(),
        );
        registry.register_collector(Box::new(SnapshotCollector {
            source: Box::new(source),
            build,
            totals: Mutex::new(Monotonic::default()),
        }));
        Metrics {
            registry,
            poll_duration,
        }
    }

    /// Records one sock_diag poll.
    pub fn observe_poll(&self, d: Duration) {
        self.poll_duration.observe(d.as_secs_f64());
    }

    /// The Prometheus text format (0.0.4), what Prometheus asks for by default.
    pub fn encode_prometheus(&self) -> Result<String, fmt::Error> {
        let mut s = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry)?;
        Ok(s)
    }

    /// The OpenMetrics text format (1.0.0), for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> Result<String, fmt::Error> {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)?;
        Ok(s)
    }
}

/// Keeps exposed counters monotonic across resets of their source.
#[derive(Debug, Default)]
struct Monotonic {
    /// Per series: (last raw value read, sum of the values lost to resets).
    seen: HashMap<String, (u64, u64)>,
}

impl Monotonic {
    fn total(&mut self, series: String, raw: u64) -> u64 {
        let (last, base) = self.seen.entry(series).or_insert((0, 0));
        if raw < *last {
            *base += *last;
        }
        *last = raw;
        *base + raw
    }
}

struct SnapshotCollector {
    source: Box<dyn MetricsSource>,
    build: BuildInfo,
    totals: Mutex<Monotonic>,
}

impl fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotCollector")
            .field("build", &self.build)
            .finish_non_exhaustive()
    }
}

/// Label values of a tag: names where the registry knows them, ids otherwise.
fn tag_labels(t: &TagTotals) -> [(&'static str, String); 2] {
    [
        (
            "experiment",
            t.experiment_name
                .clone()
                .unwrap_or_else(|| t.experiment.to_string()),
        ),
        (
            "activity",
            t.activity_name
                .clone()
                .unwrap_or_else(|| t.activity.to_string()),
        ),
    ]
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v as i64).encode(m)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = self.source.snapshot();
        let mut mono = self.totals.lock().unwrap_or_else(|e| e.into_inner());

        let mut m = enc.encode_descriptor(
            "flowd_build_info",
            "Build and marking strategy of the running daemon (always 1).",
            None,
            MetricType::Gauge,
        )?;
        let labels = [
            ("version", self.build.version.as_str()),
            ("strategy", self.build.strategy.as_str()),
        ];
        ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;

        gauge(
            &mut enc,
            "flowd_flows_tracked",
            "Flows in the flow table.",
            s.flows_tracked,
        )?;
        let mut m = enc.encode_descriptor(
            "flowd_flows_tagged",
            "Flows currently carrying a tag.",
            None,
            MetricType::Gauge,
        )?;
        for t in &s.tags {
            ConstGauge::new(t.flows as i64).encode(m.encode_family(&tag_labels(t))?)?;
        }

        // Counter names get `_total` from the encoder.
        for (name, help, pick) in [
            (
                "flowd_marked_packets",
                "Packets the marker tagged.",
                (|t: &TagTotals| t.packets) as fn(&TagTotals) -> u64,
            ),
            (
                "flowd_marked_bytes",
                "Bytes of the packets the marker tagged.",
                |t: &TagTotals| t.bytes,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for t in &s.tags {
                let l = tag_labels(t);
                let v = mono.total(
                    format!("{name}{{{}/{}}}", t.experiment, t.activity),
                    pick(t),
                );
                ConstCounter::new(v).encode(m.encode_family(&l)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "flowd_packets",
            "Packets the marker saw, by outcome.",
            None,
            MetricType::Counter,
        )?;
        for (outcome, v) in &s.outcomes {
            let v = mono.total(format!("outcome/{outcome}"), *v);
            ConstCounter::new(v).encode(m.encode_family(&[("outcome", outcome.as_str())])?)?;
        }

        gauge(
            &mut enc,
            "flowd_marker_map_entries",
            "Flows in the marker's BPF map.",
            s.map_entries,
        )?;
        gauge(
            &mut enc,
            "flowd_marker_map_capacity",
            "Size of the marker's BPF map.",
            s.map_capacity,
        )?;
        if let Some(n) = s.map_unindexed {
            gauge(
                &mut enc,
                "flowd_marker_index_unindexed",
                "Marks the flow index lacks (a full bucket, or decided in the kernel and not yet met by userspace): their packets take the hash-map lookup.",
                n,
            )?;
        }

        for (name, help, v) in [
            (
                "flowd_ringbuf_drops",
                "Tracker ring buffer records lost.",
                s.ringbuf_drops,
            ),
            (
                "flowd_marker_map_full",
                "Tags that found the marker map full: the flow was left unmarked (raise marker.map_capacity).",
                s.map_full,
            ),
            (
                "flowd_sockdiag_dump_errors",
                "sock_diag dumps that failed (nothing reconciled that round).",
                s.dump_errors,
            ),
            (
                "flowd_kernel_overrides",
                "First-packet marks the kernel decided that userspace's decision replaced.",
                s.kernel_overridden,
            ),
            (
                "flowd_tracker_state_cb_events",
                "TCP state changes the sockops STATE_CB reported because the kernel skipped the tracepoint program's nested run.",
                s.state_cb_events,
            ),
            (
                "flowd_reconcile_dumps_requested",
                "Full sock_diag dumps run early because the tracker counted a loss (a ring drop, or a skipped run STATE_CB did not cover).",
                s.dumps_requested,
            ),
            (
                "flowd_reconcile_iterator_fallbacks",
                "Full dumps whose BPF socket iterator walk failed (read error, a socket without a cookie) and that sock_diag made again.",
                s.dump_source_fallbacks,
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(mono.total(name.into(), v)).encode(m)?;
        }

        for (name, help, key, pairs) in [
            (
                "flowd_reconcile_corrections",
                "Corrections sock_diag made to the tracker's view.",
                "kind",
                [("added", s.reconcile_added), ("ended", s.reconcile_ended)],
            ),
            (
                "flowd_policy_reloads",
                "Policy reloads, by result.",
                "result",
                [
                    ("ok", s.policy_reloads_ok),
                    ("failed", s.policy_reloads_failed),
                ],
            ),
        ] {
            labelled_counters(&mut enc, &mut mono, name, help, key, &pairs)?;
        }
        let v = &s.verify_walks;
        labelled_counters(
            &mut enc,
            &mut mono,
            "flowd_reconcile_verify_walks",
            "Periodic reconciles made as a verify walk (the kernel folds the namespace's connections into digests compared with the flow table's), by outcome: verified, mismatch (a full dump follows), inconclusive (flows a dump must complete), failed.",
            "outcome",
            &[
                ("verified", v.verified),
                ("mismatch", v.mismatched),
                ("inconclusive", v.inconclusive),
                ("failed", v.failed),
            ],
        )?;
        if !s.facts_denied.is_empty() {
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_fact_denied",
                "Reads of a socket owner's facts /proc refused (the daemon lacks CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH), by fact.",
                "fact",
                &s.facts_denied,
            )?;
        }
        if !s.recursion_misses.is_empty() {
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_tracker_recursion_misses",
                "Tracker program runs the kernel skipped because the program was already running on that CPU (a nested softirq): events lost without a ring-buffer drop, corrected by the next dump.",
                "program",
                &s.recursion_misses,
            )?;
        }
        if let Some(ff) = &s.fireflies {
            gauge(
                &mut enc,
                "flowd_fireflies_announced",
                "Flows announced by a start firefly and not yet ended.",
                ff.announced as u64,
            )?;
            gauge(
                &mut enc,
                "flowd_fireflies_starts_waiting",
                "Start fireflies waiting for room in the send queue (a burst outran the sender).",
                ff.starts_waiting as u64,
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_fireflies_sent",
                "Firefly datagrams sent, by flow state.",
                "state",
                &[
                    ("start", ff.sent_start),
                    ("ongoing", ff.sent_ongoing),
                    ("end", ff.sent_end),
                ],
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_fireflies_lost",
                "Fireflies not sent: the queue was full, or the kernel refused the datagram.",
                "reason",
                &[
                    ("queue_full", ff.queue_full),
                    ("send_error", ff.send_errors),
                ],
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_fireflies_collector_lookups",
                "Lookups of collector host names, by result (a failure keeps the last address).",
                "result",
                &[
                    ("ok", ff.collector_lookups_ok),
                    ("failed", ff.collector_lookups_failed),
                ],
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_fireflies_stun_requests",
                "STUN Binding requests for the public address, by result (no answer keeps the last address).",
                "result",
                &[("ok", ff.stun_ok), ("failed", ff.stun_failed)],
            )?;
        }
        if let Some(p) = &s.per_flow {
            let v = mono.total("flowd_metrics_flows_left_out".into(), p.left_out_total);
            let m = enc.encode_descriptor(
                "flowd_metrics_flows_left_out",
                "Tagged flows given no flow_tcp_* series because metrics.per_flow_max was reached.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
            per_flow::encode(&mut enc, p)?;
        }
        gauge(
            &mut enc,
            "flowd_control_connections",
            "Control socket connections open now.",
            s.control.open as u64,
        )?;
        labelled_counters(
            &mut enc,
            &mut mono,
            "flowd_control_connections_closed",
            "Control socket connections refused over control.max_connections_per_user, or closed after control.idle_timeout_secs without a request.",
            "reason",
            &[
                ("refused", s.control.refused),
                ("idle", s.control.closed_idle),
            ],
        )?;
        if let Some(a) = &s.announcements {
            gauge(
                &mut enc,
                "flowd_announcements_held",
                "Announcements in force (matched to a live flow, or waiting for one).",
                a.held as u64,
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_announcements_received",
                "Announcements received, by input.",
                "input",
                &[
                    ("firefly", a.received_firefly),
                    ("pipe", a.received_pipe),
                    ("http", a.received_http),
                ],
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_announcements_ended",
                "Announcements that ended without their flow ending: withdrawn by an `end`, or expired (no live flow matched within the grace time).",
                "reason",
                &[("withdrawn", a.withdrawn), ("expired", a.expired)],
            )?;
            labelled_counters(
                &mut enc,
                &mut mono,
                "flowd_announcements_dropped",
                "Announcements not applied: over announcements.max_held, from a local sender not allowed to announce, or naming another user's flow.",
                "reason",
                &[
                    ("full", a.dropped_full),
                    ("refused", a.refused),
                    ("foreign_flow", a.foreign_flow),
                ],
            )?;
            let v = mono.total("flowd_announcements_unseen".into(), a.unseen);
            let m = enc.encode_descriptor(
                "flowd_announcements_unseen",
                "Announced flows no local socket was found for, sent start and end fireflies of their own.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        Ok(())
    }
}

/// One counter family with one label, a series per (label value, count).
fn labelled_counters(
    enc: &mut DescriptorEncoder,
    mono: &mut Monotonic,
    name: &str,
    help: &str,
    key: &str,
    pairs: &[(&str, u64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in pairs {
        let v = mono.total(format!("{name}/{value}"), *n);
        ConstCounter::new(v).encode(m.encode_family(&[(key, *value)])?)?;
    }
    Ok(())
}

/// Binds `listen` and serves `/metrics` until `shutdown` completes.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics endpoint on {listen} (metrics.listen)"))?;
    serve_on(listener, metrics, shutdown).await
}

/// Serves `/metrics` on an already bound listener until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().context("metrics listener address")?;
    info!(listen = %addr, "metrics endpoint listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: wait rather than spin.
                    warn!(error = %e, "metrics endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, metrics.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "metrics connection ended");
            }
            drop(permit);
        });
    }
    info!(listen = %addr, "metrics endpoint stopped");
    Ok(())
}

async fn answer(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        Ok(r)
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into());
    }
    let openmetrics = req
        .headers()
        .get(ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    // The source may read BPF maps (syscalls): keep that off the async threads.
    let encoded = tokio::task::spawn_blocking(move || {
        if openmetrics {
            metrics.encode_openmetrics()
        } else {
            metrics.encode_prometheus()
        }
    })
    .await;
    match encoded {
        Ok(Ok(body)) if openmetrics => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Ok(Ok(body)) => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body,
        ),
        _ => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            "encoding metrics failed\n".into(),
        ),
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
