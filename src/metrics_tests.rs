use super::*;

use std::collections::BTreeMap;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tag(exp: u16, name: Option<&str>, act: u8, flows: u64, packets: u64, bytes: u64) -> TagTotals {
    TagTotals {
        experiment: exp,
        experiment_name: name.map(Into::into),
        activity: act,
        activity_name: name.map(|_| "datachallenge".to_string()),
        flows,
        packets,
        bytes,
    }
}

fn snapshot(scale: u64) -> Snapshot {
    Snapshot {
        flows_tracked: 40,
        tags: vec![
            tag(2, Some("atlas"), 3, 7, 100 * scale, 150_000 * scale),
            tag(300, None, 1, 1, 5 * scale, 900 * scale),
        ],
        outcomes: [
            "marked",
            "unmarked",
            "skipped_mtu",
            "not_ipv6",
            "not_tcp_udp",
            "malformed",
            "skipped_header",
        ]
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), i as u64 * scale))
        .collect(),
        map_entries: 8,
        map_capacity: 65536,
        map_unindexed: Some(9),
        ringbuf_drops: scale,
        reconcile_added: 2 * scale,
        reconcile_ended: 3 * scale,
        policy_reloads_ok: 4,
        policy_reloads_failed: 1,
        map_full: 5 * scale,
        dump_errors: 6 * scale,
        kernel_overridden: 7 * scale,
        fireflies: None,
        announcements: None,
        facts_denied: vec![("owner", 0), ("exe", scale), ("cgroup", 0)],
        recursion_misses: vec![("flowd_tcp_state", 8 * scale), ("flowd_sockops", 0)],
        state_cb_events: 9 * scale,
        dumps_requested: 10 * scale,
        dump_source_fallbacks: 11 * scale,
        verify_walks: crate::flows::VerifyCounters {
            verified: 12 * scale,
            mismatched: 13 * scale,
            inconclusive: 14 * scale,
            failed: 15 * scale,
            excused_parts: 16 * scale,
        },
        control: ControlConnections {
            open: 2,
            refused: 3 * scale,
            closed_idle: scale,
        },
        per_flow: None,
    }
}

fn metrics(source: Arc<Published>) -> Arc<Metrics> {
    Arc::new(Metrics::new(
        BuildInfo {
            version: "0.1.0".into(),
            strategy: "flow-label".into(),
        },
        source,
    ))
}

/// One plain HTTP/1.1 request on loopback; (status line, headers+body).
async fn http_get(addr: SocketAddr, path: &str, accept: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (status, rest) = out.split_once("\r\n").unwrap();
    (status.to_string(), rest.to_string())
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").unwrap().1
}

/// Sample value keyed by metric name and sorted labels.
fn values(text: &str) -> BTreeMap<String, f64> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut out = BTreeMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let v = match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            Value::Histogram(h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), v);
    }
    out
}

async fn with_server<F: Future<Output = ()>>(m: Arc<Metrics>, test: impl FnOnce(SocketAddr) -> F) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, m, async {
        let _ = stopped.await;
    }));
    test(addr).await;
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn scrape_over_http_exposes_every_series_with_its_labels() {
    let source = Arc::new(Published::default());
    source.set(snapshot(1));
    let m = metrics(source);
    m.observe_poll(Duration::from_millis(3));
    with_server(m, |addr| async move {
        let (status, resp) = http_get(addr, "/metrics", "text/plain").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(resp
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"));
        let v = values(body(&resp));
        let expect = [
            ("flowd_build_info{strategy=flow-label,version=0.1.0}", 1.0),
            ("flowd_flows_tracked{}", 40.0),
            (
                "flowd_flows_tagged{activity=datachallenge,experiment=atlas}",
                7.0,
            ),
            ("flowd_flows_tagged{activity=1,experiment=300}", 1.0),
            (
                "flowd_marked_packets_total{activity=datachallenge,experiment=atlas}",
                100.0,
            ),
            (
                "flowd_marked_bytes_total{activity=datachallenge,experiment=atlas}",
                150_000.0,
            ),
            ("flowd_marked_bytes_total{activity=1,experiment=300}", 900.0),
            ("flowd_packets_total{outcome=marked}", 0.0),
            ("flowd_packets_total{outcome=skipped_header}", 6.0),
            ("flowd_marker_map_entries{}", 8.0),
            ("flowd_marker_map_capacity{}", 65536.0),
            ("flowd_marker_index_unindexed{}", 9.0),
            ("flowd_ringbuf_drops_total{}", 1.0),
            (
                "flowd_tracker_recursion_misses_total{program=flowd_tcp_state}",
                8.0,
            ),
            (
                "flowd_tracker_recursion_misses_total{program=flowd_sockops}",
                0.0,
            ),
            ("flowd_tracker_state_cb_events_total{}", 9.0),
            ("flowd_reconcile_dumps_requested_total{}", 10.0),
            ("flowd_reconcile_iterator_fallbacks_total{}", 11.0),
            ("flowd_reconcile_verify_walks_total{outcome=verified}", 12.0),
            ("flowd_reconcile_verify_walks_total{outcome=mismatch}", 13.0),
            (
                "flowd_reconcile_verify_walks_total{outcome=inconclusive}",
                14.0,
            ),
            ("flowd_reconcile_verify_walks_total{outcome=failed}", 15.0),
            ("flowd_reconcile_corrections_total{kind=added}", 2.0),
            ("flowd_reconcile_corrections_total{kind=ended}", 3.0),
            ("flowd_policy_reloads_total{result=ok}", 4.0),
            ("flowd_policy_reloads_total{result=failed}", 1.0),
            ("flowd_sockdiag_poll_duration_seconds{}", 1.0),
        ];
        for (k, want) in expect {
            assert_eq!(v.get(k), Some(&want), "{k} in {v:#?}");
        }
        let outcomes = v
            .keys()
            .filter(|k| k.starts_with("flowd_packets_total{"))
            .count();
        assert_eq!(outcomes, 7);
    })
    .await;
}

#[tokio::test]
async fn counters_follow_the_snapshot_without_double_counting_and_never_go_down() {
    let source = Arc::new(Published::default());
    source.set(snapshot(1));
    let m = metrics(source.clone());
    let key = "flowd_marked_packets_total{activity=datachallenge,experiment=atlas}";
    let read = |m: &Metrics| values(&m.encode_prometheus().unwrap());
    assert_eq!(read(&m)[key], 100.0);
    // Scraping again with the same totals does not add anything.
    assert_eq!(read(&m)[key], 100.0);
    source.set(snapshot(3));
    assert_eq!(read(&m)[key], 300.0);
    assert_eq!(read(&m)["flowd_ringbuf_drops_total{}"], 3.0);
    // The source restarts from a lower value (BPF map recreated): keep counting up.
    source.set(snapshot(1));
    assert_eq!(read(&m)[key], 400.0);
    source.set(snapshot(2));
    assert_eq!(read(&m)[key], 500.0);
    // Gauges follow the snapshot as is.
    assert_eq!(read(&m)["flowd_flows_tracked{}"], 40.0);
}

#[test]
fn firefly_series_exist_only_when_fireflies_are_on() {
    let source = Arc::new(Published::default());
    source.set(snapshot(1));
    let m = metrics(source.clone());
    let text = m.encode_prometheus().unwrap();
    assert!(!text.contains("firefl"), "{text}");
    source.set(Snapshot {
        fireflies: Some(FireflyStatus {
            announced: 3,
            starts_waiting: 1,
            sent_start: 10,
            sent_ongoing: 0,
            sent_end: 7,
            queue_full: 2,
            send_errors: 1,
            enrich_errors: 0,
            collector_lookups_ok: 4,
            collector_lookups_failed: 5,
            stun_ok: 6,
            stun_failed: 8,
        }),
        ..snapshot(1)
    });
    let v = values(&m.encode_prometheus().unwrap());
    for (k, want) in [
        ("flowd_fireflies_announced{}", 3.0),
        ("flowd_fireflies_starts_waiting{}", 1.0),
        ("flowd_fireflies_sent_total{state=start}", 10.0),
        ("flowd_fireflies_sent_total{state=ongoing}", 0.0),
        ("flowd_fireflies_sent_total{state=end}", 7.0),
        ("flowd_fireflies_lost_total{reason=queue_full}", 2.0),
        ("flowd_fireflies_lost_total{reason=send_error}", 1.0),
        ("flowd_fireflies_collector_lookups_total{result=ok}", 4.0),
        (
            "flowd_fireflies_collector_lookups_total{result=failed}",
            5.0,
        ),
        ("flowd_fireflies_stun_requests_total{result=ok}", 6.0),
        ("flowd_fireflies_stun_requests_total{result=failed}", 8.0),
    ] {
        assert_eq!(v.get(k), Some(&want), "{k} in {v:#?}");
    }
}

#[test]
fn map_full_dump_errors_and_kernel_overrides_are_counters() {
    let source = Arc::new(Published::default());
    source.set(snapshot(1));
    let v = values(&metrics(source).encode_prometheus().unwrap());
    for (k, want) in [
        ("flowd_marker_map_full_total{}", 5.0),
        ("flowd_sockdiag_dump_errors_total{}", 6.0),
        ("flowd_kernel_overrides_total{}", 7.0),
        ("flowd_control_connections{}", 2.0),
        (
            "flowd_control_connections_closed_total{reason=refused}",
            3.0,
        ),
        ("flowd_control_connections_closed_total{reason=idle}", 1.0),
    ] {
        assert_eq!(v.get(k), Some(&want), "{k} in {v:#?}");
    }
}

#[test]
fn announcement_series_exist_only_when_an_input_is_on() {
    let source = Arc::new(Published::default());
    source.set(snapshot(1));
    let m = metrics(source.clone());
    assert!(!m.encode_prometheus().unwrap().contains("announce"));
    source.set(Snapshot {
        announcements: Some(AnnouncementCounters {
            received_firefly: 4,
            received_pipe: 9,
            received_http: 0,
            withdrawn: 3,
            expired: 2,
            held: 6,
            dropped_full: 7,
            refused: 8,
            foreign_flow: 1,
            unseen: 5,
        }),
        ..snapshot(1)
    });
    let v = values(&m.encode_prometheus().unwrap());
    for (k, want) in [
        ("flowd_announcements_held{}", 6.0),
        ("flowd_announcements_received_total{input=firefly}", 4.0),
        ("flowd_announcements_received_total{input=pipe}", 9.0),
        ("flowd_announcements_ended_total{reason=withdrawn}", 3.0),
        ("flowd_announcements_ended_total{reason=expired}", 2.0),
        ("flowd_announcements_unseen_total{}", 5.0),
        ("flowd_announcements_dropped_total{reason=full}", 7.0),
        ("flowd_announcements_dropped_total{reason=refused}", 8.0),
        (
            "flowd_announcements_dropped_total{reason=foreign_flow}",
            1.0,
        ),
    ] {
        assert_eq!(v.get(k), Some(&want), "{k} in {v:#?}");
    }
}

#[tokio::test]
async fn other_paths_are_404_and_openmetrics_is_negotiated() {
    let source = Arc::new(Published::default());
    source.set(snapshot(1));
    with_server(metrics(source), |addr| async move {
        let (status, _) = http_get(addr, "/", "*/*").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, resp) = http_get(
            addr,
            "/metrics",
            "application/openmetrics-text; version=1.0.0",
        )
        .await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(resp.contains("application/openmetrics-text"));
        assert!(body(&resp).ends_with("# EOF\n"));
        assert!(body(&resp).contains(
            "flowd_marked_packets_total{experiment=\"atlas\",activity=\"datachallenge\"} 100"
        ));
    })
    .await;
}

#[test]
fn closures_are_sources() {
    let m = Metrics::new(
        BuildInfo {
            version: "x".into(),
            strategy: "hop-by-hop".into(),
        },
        || Snapshot {
            flows_tracked: 9,
            ..Default::default()
        },
    );
    assert!(m
        .encode_prometheus()
        .unwrap()
        .contains("flowd_flows_tracked 9\n"));
}

/// Every series the daemon can export, fireflies on: what a dashboard may name.
fn everything() -> String {
    let source = Arc::new(Published::default());
    source.set(Snapshot {
        fireflies: Some(FireflyStatus {
            announced: 1,
            starts_waiting: 0,
            sent_start: 1,
            sent_ongoing: 0,
            sent_end: 1,
            queue_full: 0,
            send_errors: 0,
            enrich_errors: 0,
            collector_lookups_ok: 1,
            collector_lookups_failed: 0,
            stun_ok: 0,
            stun_failed: 0,
        }),
        announcements: Some(AnnouncementCounters::default()),
        ..snapshot(1)
    });
    let m = metrics(source);
    m.observe_poll(Duration::from_millis(3));
    m.encode_prometheus().unwrap()
}

#[test]
fn refused_proc_reads_are_counted_per_fact() {
    let v = values(&everything());
    assert_eq!(
        v.get("flowd_fact_denied_total{fact=exe}"),
        Some(&1.0),
        "{v:#?}"
    );
    assert_eq!(
        v.get("flowd_fact_denied_total{fact=owner}"),
        Some(&0.0),
        "{v:#?}"
    );
}

/// Splits `text` into the words of a PromQL expression (names, labels).
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn every_query_of_the_packaged_dashboard_names_series_the_daemon_exports() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../packaging/grafana-dashboard.json")).unwrap();
    let text = everything();
    // Exported sample names and, per name, the label names its series carry.
    let mut exported: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let labels = exported.entry(line[..name_end].to_string()).or_default();
        if let Some(rest) = line[name_end..].strip_prefix('{') {
            for pair in rest[..rest.find('}').unwrap()].split(',') {
                labels.insert(pair.split('=').next().unwrap().to_string());
            }
        }
    }
    let mut exprs: Vec<String> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str().filter(|q| q.contains("flowd_")) {
            exprs.push(q.to_string());
        }
    }
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let mut named = std::collections::BTreeSet::new();
    for e in &exprs {
        let metrics: Vec<&str> = words(e)
            .into_iter()
            .filter(|w| w.starts_with("flowd_"))
            .collect();
        assert!(!metrics.is_empty(), "query names no flowd_ series: {e}");
        for m in &metrics {
            assert!(
                exported.contains_key(*m),
                "`{m}` (in `{e}`) is not exported:\n{text}"
            );
            named.insert(m.to_string());
        }
        // Labels grouped by must be labels of the series queried.
        for group in e.split("by (").skip(1) {
            for label in words(&group[..group.find(')').unwrap()]) {
                if label == "instance" || label == "le" {
                    continue;
                }
                assert!(
                    metrics.iter().any(|m| exported[*m].contains(label)),
                    "label `{label}` of `{e}` is on none of {metrics:?}"
                );
            }
        }
    }
    // And the dashboard watches every family worth an alert.
    for must in [
        "flowd_packets_total",
        "flowd_ringbuf_drops_total",
        "flowd_fact_denied_total",
        "flowd_policy_reloads_total",
        "flowd_marker_map_entries",
    ] {
        assert!(named.contains(must), "{must} missing from the dashboard");
    }
}
