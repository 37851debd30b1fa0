//! The whole engine, without BPF: discovery events in, marks out to a recording
//! [`MarkStore`], control requests answered from what it holds.

use std::sync::Mutex;

use super::*;
use crate::config::AnnounceInput;
use crate::marker::maps::{Counters, MapError};
use crate::model::socket::{Direction, FlowKey, Protocol, SockState, SocketObservation, Source};
use crate::model::tag::Tag;

const NETNS: u64 = 4026531840;

/// The marker map as a plain table: key -> (tag, entropy). `capacity` makes it
/// fill up like the BPF map does.
struct RecordingStore {
    marks: Mutex<HashMap<FlowKey, (Tag, u8)>>,
    capacity: usize,
}

impl RecordingStore {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(RecordingStore {
            marks: Mutex::new(HashMap::new()),
            capacity,
        })
    }
    fn get(&self, key: &FlowKey) -> Option<(Tag, u8)> {
        self.marks.lock().unwrap().get(key).copied()
    }
    fn len(&self) -> usize {
        self.marks.lock().unwrap().len()
    }
}

impl MarkSink for RecordingStore {
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError> {
        let mut m = self.marks.lock().unwrap();
        if !m.contains_key(key) && m.len() >= self.capacity {
            return Err(MapError::Full {
                capacity: self.capacity as u32,
                flow: format!("{key:?}"),
            });
        }
        m.insert(*key, (tag, entropy));
        Ok(())
    }
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError> {
        Ok(self.marks.lock().unwrap().remove(key).is_some())
    }
    fn entropy(&self, _key: &FlowKey) -> u8 {
        0b10101
    }
}

impl MarkStore for RecordingStore {
    fn capacity(&self) -> u32 {
        self.capacity as u32
    }
    fn counters(&self) -> Result<Counters, MapError> {
        Ok(Counters::default())
    }
    fn flow_counts(&self) -> Result<HashMap<FlowKey, (u64, u64)>, MapError> {
        Ok(HashMap::new())
    }
    fn flow_count(&self, _key: &FlowKey) -> Result<Option<(u64, u64)>, MapError> {
        Ok(None)
    }
    fn install_policy(&self, _k: &KernelPolicy) -> Result<(), MapError> {
        Ok(())
    }
    fn disable_kernel_decisions(&self) {}
}

fn write_policy(dir: &Path, activity: &str) {
    std::fs::write(
        dir.join("atlas.toml"),
        format!(
            "experiment = \"atlas\"\n[[rule]]\nname = \"xrootd\"\nactivity = \"{activity}\"\nremote_ports = [1094]\n"
        ),
    )
    .unwrap();
}

fn engine(dir: &Path, store: Arc<RecordingStore>) -> Engine {
    let registry = Registry::bundled();
    let policy = load_policy(dir, &registry).unwrap();
    Engine::new(
        NETNS,
        policy,
        dir,
        registry,
        store,
        Arc::new(DaemonInfo {
            version: "test",
            pid: 1,
            strategy: "label".into(),
            header: None,
            attached: Vec::new(),
            kernel_features: Vec::new(),
            fallbacks: Vec::new(),
        }),
        Arc::new(TrackerStatus::default()),
    )
}

fn key(local_port: u16, remote_port: u16) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        format!("[fd00::1]:{local_port}").parse().unwrap(),
        format!("[fd00::2]:{remote_port}").parse().unwrap(),
    )
}

fn observed(cookie: u64, key: FlowKey, state: SockState) -> Discovery {
    Discovery::Observed(
        SocketObservation {
            key,
            cookie,
            netns: NETNS,
            state,
            direction: Direction::Outbound,
            inode: 1000 + cookie,
            uid: Some(1000),
            pid: None,
            comm: None,
            cgroup_id: None,
            tcp: None,
            tcp_bytes: None,
            source: Source::Tracker,
        },
        Instant::now(),
    )
}

fn atlas(activity: u8) -> Tag {
    Tag::new(2, activity).unwrap()
}

#[test]
fn a_matching_connection_is_marked_until_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let store = RecordingStore::new(16);
    let mut e = engine(dir.path(), store.clone());
    let k = key(40000, 1094);
    e.on_discovery(observed(1, k, SockState::Established));
    let (tag, entropy) = store.get(&k).expect("marked");
    assert_eq!(tag, Tag::new(2, 17).unwrap(), "atlas / Analysis Input");
    assert_eq!(entropy, 0b10101, "the store's entropy, drawn once");
    // Another port matches no rule: nothing written for it.
    e.on_discovery(observed(2, key(40001, 22), SockState::Established));
    assert_eq!(store.len(), 1);
    e.on_discovery(observed(1, k, SockState::Close));
    assert_eq!(store.get(&k), None, "the mark ends with the socket");
}

#[test]
fn a_reload_retags_live_flows_and_keeps_their_entropy() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let store = RecordingStore::new(16);
    let mut e = engine(dir.path(), store.clone());
    let k = key(40000, 1094);
    e.on_discovery(observed(1, k, SockState::Established));
    let (_, entropy) = store.get(&k).unwrap();
    write_policy(dir.path(), "Data Consolidation");
    e.reload().unwrap();
    assert_eq!(store.get(&k), Some((atlas(4), entropy)));
    // A broken file is refused whole: the live mark stays as it was.
    std::fs::write(dir.path().join("atlas.toml"), "experiment = \"nope\"\n").unwrap();
    assert!(e.reload().is_err());
    assert_eq!(store.get(&k), Some((atlas(4), entropy)));
    assert_eq!((e.reloads_ok, e.reloads_failed), (1, 1));
}

/// A reload whose directory read stalls (a hung network filesystem) leaves the
/// engine answering; the reload answers when the read completes, and a reload asked
/// for meanwhile reads the directory once more after it.
#[test]
fn a_stalled_reload_does_not_stop_the_engine_answering() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let mut e = engine(dir.path(), RecordingStore::new(16));
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate_rx);
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reads.clone();
    e.reloads.load = Arc::new(move |dir: &Path, registry: &Registry| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        gate.lock().unwrap().recv().unwrap();
        load_policy(dir, registry)
    });
    let (_discovery_tx, discovery) = mpsc::channel(1);
    let (commands_tx, commands) = mpsc::channel(8);
    let (_announced_tx, announced) = mpsc::channel(1);
    // The engine on a thread and runtime of its own, as in the daemon: were it
    // to block, this test's runtime would still time it out.
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let engine =
        std::thread::spawn(move || runtime().block_on(e.run(discovery, commands, announced)));
    runtime().block_on(async move {
        // try_send: the channel has room, and a sync helper returns the answer's
        // receiver without awaiting it.
        let call = |request| {
            let (reply, answer) = oneshot::channel();
            commands_tx
                .try_send(Command::Control(ControlCall {
                    request,
                    peer_uid: Some(0),
                    reply,
                }))
                .unwrap();
            answer
        };
        let hang = Duration::from_secs(10);
        let mut first = call(Request::Reload {});
        let status = call(Request::Status {});
        let status = tokio::time::timeout(hang, status).await;
        assert!(status.is_ok(), "status waited for the stalled reload");
        assert!(first.try_recv().is_err(), "answered before the read ended");
        let second = call(Request::Reload {});
        gate_tx.send(()).unwrap();
        let v1 = tokio::time::timeout(hang, first).await.unwrap().unwrap();
        write_policy(dir.path(), "Data Consolidation");
        gate_tx.send(()).unwrap();
        let v2 = tokio::time::timeout(hang, second).await.unwrap().unwrap();
        let version = |v: Result<Box<RawValue>, String>| {
            serde_json::from_str::<serde_json::Value>(v.unwrap().get()).unwrap()["policy_version"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_ne!(version(v1), version(v2), "the second read saw the new file");
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop(commands_tx);
        drop((_discovery_tx, _announced_tx));
    });
    engine.join().unwrap();
}

#[test]
fn a_full_map_is_counted_and_the_other_marks_stay() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let store = RecordingStore::new(1);
    let mut e = engine(dir.path(), store.clone());
    e.on_discovery(observed(1, key(40000, 1094), SockState::Established));
    e.on_discovery(observed(2, key(40001, 1094), SockState::Established));
    assert!(store.get(&key(40000, 1094)).is_some());
    assert_eq!(store.get(&key(40001, 1094)), None);
    let status = e.status();
    assert_eq!(status.map_full_total, 1);
    assert_eq!(e.snapshot().map_full, 1);
}

#[test]
fn the_flows_request_names_the_rule_that_tagged_each_flow() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let store = RecordingStore::new(16);
    let mut e = engine(dir.path(), store);
    e.on_discovery(observed(7, key(40000, 1094), SockState::Established));
    let reply = e
        .answer(Request::Flows {
            filter: None,
            limit: None,
            after: None,
        })
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(reply.get()).unwrap();
    let flows = v["flows"].as_array().expect("flows array");
    assert_eq!(flows.len(), 1, "{v}");
    assert_eq!(flows[0]["cookie"], 7);
    assert_eq!(flows[0]["rule"], "atlas.toml:xrootd");
    assert_eq!(flows[0]["experiment"], 2);
    assert_eq!(flows[0]["activity"], 17);
}

/// A paged listing gives every flow once, in cookie order, `limit` at a time, and
/// says where the next page starts until the last.
#[test]
fn a_paged_flows_listing_returns_every_flow_once_in_cookie_order() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let mut e = engine(dir.path(), RecordingStore::new(64));
    for c in [9u64, 3, 12, 5, 1, 7, 20] {
        e.on_discovery(observed(
            c,
            key(40000 + c as u16, 1094),
            SockState::Established,
        ));
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let reply = e
            .answer(Request::Flows {
                filter: None,
                limit: Some(3),
                after,
            })
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(reply.get()).unwrap();
        pages += 1;
        let page: Vec<u64> = v["flows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["cookie"].as_u64().unwrap())
            .collect();
        assert!(page.len() <= 3, "{v}");
        seen.extend(page);
        match v["next"].as_u64() {
            Some(n) => after = Some(n),
            None => {
                assert!(v["next"].is_null(), "the last page says so: {v}");
                break;
            }
        }
    }
    assert_eq!(seen, vec![1, 3, 5, 7, 9, 12, 20]);
    assert_eq!(pages, 3);
}

#[test]
fn a_flows_request_with_a_bad_address_filter_is_an_error_not_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine(dir.path(), RecordingStore::new(16));
    let filter = crate::api::filter::FlowFilter {
        address: Some("garbage/99".into()),
        ..Default::default()
    };
    let err = e
        .answer(Request::Flows {
            filter: Some(filter),
            limit: None,
            after: None,
        })
        .unwrap_err();
    assert!(
        err.contains("`garbage/99` is neither an IP address"),
        "{err}"
    );
}

/// Fireflies for announced flows: a pipe announcement gets this daemon's start and,
/// once withdrawn, its end (flowd-go's behaviour); a firefly announcement is left to
/// the application that sent it, unless `fireflies_for` names that input too.
#[test]
fn pipe_announced_flows_get_our_fireflies_firefly_announced_ones_do_not() {
    use crate::firefly::{Firefly, FireflyCounters, State};
    use crate::model::announcement::{Announcement, Origin};

    let run = |origin: Origin, fireflies_for: &[AnnounceInput]| -> Vec<(State, Tag)> {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel::<Firefly>(16);
        let mut e = engine(dir.path(), RecordingStore::new(16))
            .with_announcements(
                Announcements::new(Duration::from_secs(30)).with_fireflies_for(fireflies_for),
            )
            .with_fireflies(Fireflies::new(
                tx,
                Arc::new(FireflyCounters::default()),
                None,
            ));
        let k = key(40000, 1094);
        e.on_discovery(observed(1, k, SockState::Established));
        let tag = Tag::new(3, 12).unwrap();
        // Announced as the application sees it: source first, either orientation.
        e.announce(Announcement {
            key: k.reversed(),
            tag: Some(tag),
            origin: origin.clone(),
            only_for_uid: None,
        });
        e.announce(Announcement {
            key: k,
            tag: None,
            origin,
            only_for_uid: None,
        });
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            assert_eq!(f.key, k, "the firefly names the flow as the table has it");
            out.push((f.state, f.tag));
        }
        out
    };
    let t = Tag::new(3, 12).unwrap();
    assert_eq!(
        run(Origin::Pipe, &[AnnounceInput::Pipe]),
        [(State::Start, t), (State::End, t)]
    );
    let app: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
    assert_eq!(run(Origin::Firefly(app), &[AnnounceInput::Pipe]), []);
    assert_eq!(
        run(
            Origin::Firefly(app),
            &[AnnounceInput::Pipe, AnnounceInput::Firefly]
        ),
        [(State::Start, t), (State::End, t)]
    );
    assert_eq!(run(Origin::Pipe, &[]), [], "configurable per input");
}

/// Per-flow series: flowd-go's `flow_tcp_*` names and labels for tagged TCP flows,
/// at most `per_flow_max` of them, the others counted once each.
#[test]
fn per_flow_series_carry_flowd_go_names_and_labels_up_to_the_cap() {
    use crate::metrics::{BuildInfo, Metrics};
    use crate::model::socket::TcpStats;

    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let mut e = engine(dir.path(), RecordingStore::new(16)).with_per_flow_metrics(1);
    let with_tcp = |cookie: u64, local_port: u16, rtt_us: u32| {
        let Discovery::Observed(mut obs, at) =
            observed(cookie, key(local_port, 1094), SockState::Established)
        else {
            unreachable!()
        };
        obs.tcp = Some(TcpStats {
            rtt_us,
            snd_cwnd: 10,
            bytes_acked: 5000,
            ..TcpStats::default()
        });
        Discovery::Observed(obs, at)
    };
    e.on_discovery(with_tcp(1, 40000, 1234));
    e.on_discovery(with_tcp(2, 40001, 999));
    // Untagged: never a series, never counted.
    e.on_discovery(observed(3, key(40002, 22), SockState::Established));
    e.refresh_per_flow();
    e.refresh_per_flow();
    let snap = e.snapshot();
    let p = snap.per_flow.clone().expect("on");
    assert_eq!(p.series.len(), 1);
    assert_eq!(p.left_out_total, 1, "the flow over the cap, counted once");
    let m = Metrics::new(
        BuildInfo {
            version: "t".into(),
            strategy: "label".into(),
        },
        move || snap.clone(),
    );
    let text = m.encode_prometheus().unwrap();
    let exported = p.series[0].sport;
    let rtt = if exported == 40000 { 1234 } else { 999 };
    let line = format!(
        "flow_tcp_rtt{{act=\"17\",exp=\"2\",src=\"fd00::1\",dst=\"fd00::2\",flow=\"<{exported}:1094>\",flavour=\"netlink\"}} {rtt}"
    );
    assert!(text.contains(&line), "{line} not in\n{text}");
    assert!(
        text.contains("# TYPE flow_tcp_bytes_acked_total gauge"),
        "{text}"
    );
    assert!(
        text.contains("flow_tcp_bytes_acked_total{act=\"17\""),
        "{text}"
    );
    assert!(
        text.contains("flowd_metrics_flows_left_out_total 1"),
        "{text}"
    );
}

#[test]
fn a_verify_walk_that_finds_a_difference_asks_for_a_full_dump() {
    use crate::discovery::feeds::{DumpSchedule, Verify};
    use crate::discovery::walk_digest::WalkDigest;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "Analysis Input");
    let dumps = DumpSchedule::new(Duration::from_secs(5));
    let mut e = engine(dir.path(), RecordingStore::new(16)).with_dump_schedule(dumps.clone());
    let complete = |cookie, key| {
        let Discovery::Observed(mut o, at) = observed(cookie, key, SockState::Established) else {
            unreachable!()
        };
        o.cgroup_id = Some(7);
        Discovery::Observed(o, at)
    };
    e.on_discovery(complete(1, key(40000, 1094)));
    assert!(!dumps.full_dump_wanted());
    let walk = |e: &mut Engine, kernel: &WalkDigest| {
        e.on_discovery(Discovery::VerifyBegun { seed: 5 });
        e.on_discovery(Discovery::Verified(Verify {
            started: Instant::now(),
            digest: Ok(kernel.clone()),
            duration: Duration::from_millis(3),
        }));
    };
    let mut kernel = WalkDigest::new(5);
    kernel.add(1, &key(40000, 1094), SockState::Established, 1001);
    walk(&mut e, &kernel);
    assert!(
        !dumps.full_dump_wanted(),
        "the table holds what the kernel has"
    );
    let st = e.status().verify_walks;
    assert_eq!(
        (st.verified, st.last_outcome.as_str(), st.last_connections),
        (1, "verified", 1)
    );

    // The kernel has a connection nobody reported.
    kernel.add(2, &key(40001, 1094), SockState::Established, 1002);
    walk(&mut e, &kernel);
    assert!(dumps.full_dump_wanted());
    let st = e.status().verify_walks;
    assert_eq!(
        (st.verified, st.mismatch, st.last_outcome.as_str()),
        (1, 1, "mismatch")
    );

    // A flow reported without its owner's cgroup (from softirq) wants a full
    // dump for itself, before any walk.
    let dumps = DumpSchedule::new(Duration::from_secs(5));
    let mut e = engine(dir.path(), RecordingStore::new(16)).with_dump_schedule(dumps.clone());
    e.on_discovery(observed(3, key(40002, 1094), SockState::Established));
    assert!(dumps.full_dump_wanted());
}
