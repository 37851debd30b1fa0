//! A fake flowd-rs control socket for tests and benches: answers `status`, `flows`
//! (applying the filter as the daemon will, with `FlowFilter::matches`), `flow` and
//! `reload` with canned data, speaking protocol v1 exactly as documented.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flowd::api::filter::FlowFilter;
use flowd::api::view::{FlowEventView, FlowView, StatusView, TagTotals, TcpView};
use serde_json::{json, Value};

pub struct FakeDaemon {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Every request line received, parsed.
    pub requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeDaemon {
    /// A daemon from before paging (it refuses `limit` and `after`).
    pub fn start(path: &Path, flows: Vec<FlowView>) -> FakeDaemon {
        Self::start_with(path, flows, None)
    }

    /// A daemon that pages listings as the real one does, `page` flows at most per
    /// reply (fewer if the request's `limit` says so), in cookie order.
    pub fn start_paged(path: &Path, flows: Vec<FlowView>, page: usize) -> FakeDaemon {
        Self::start_with(path, flows, Some(page))
    }

    fn start_with(path: &Path, flows: Vec<FlowView>, paging: Option<usize>) -> FakeDaemon {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("binding the fake control socket");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let flows = Arc::new(flows);
        let thread = {
            let (stop, requests) = (stop.clone(), requests.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (flows, requests) = (flows.clone(), requests.clone());
                    std::thread::spawn(move || serve(conn, &flows, &requests, paging));
                }
            })
        };
        FakeDaemon {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
            requests,
        }
    }

    /// Stops listening and removes the socket, as a daemon that exits would.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    conn: UnixStream,
    flows: &[FlowView],
    requests: &Mutex<Vec<Value>>,
    paging: Option<usize>,
) {
    let mut wr = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        requests.lock().unwrap().push(req.clone());
        let mut out = answer(&req, flows, paging);
        out.push(b'\n');
        if wr.write_all(&out).is_err() {
            return;
        }
    }
}

/// The reply envelope, serialized straight from typed results (no `Value` detour),
/// as the daemon should do it for 10 000-flow listings.
#[derive(serde::Serialize)]
struct Ok<T> {
    v: u32,
    ok: bool,
    result: T,
}

fn ok<T: serde::Serialize>(result: T) -> Vec<u8> {
    serde_json::to_vec(&Ok {
        v: 1,
        ok: true,
        result,
    })
    .unwrap()
}

fn err(e: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "ok": false, "error": e})).unwrap()
}

fn answer(req: &Value, flows: &[FlowView], paging: Option<usize>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Flows<'a> {
        flows: Vec<&'a FlowView>,
        #[serde(skip_serializing_if = "Option::is_none")]
        next: Option<u64>,
    }
    if req.get("v") != Some(&json!(1)) {
        return err("missing protocol version: send {\"v\":1,...}");
    }
    match req.get("op").and_then(Value::as_str) {
        Some("status") => ok(status(flows)),
        Some("flows") => {
            // A daemon from before paging: its request type denies unknown fields.
            if paging.is_none() {
                if let Some(k) = ["limit", "after"].iter().find(|k| req.get(**k).is_some()) {
                    return err(&format!(
                        "bad request: unknown field `{k}`, expected `filter`"
                    ));
                }
            }
            let filter: FlowFilter = match serde_json::from_value(req["filter"].clone()) {
                Ok(f) => f,
                Err(e) => return err(&format!("bad request: {e}")),
            };
            let mut shown: Vec<&FlowView> = flows.iter().filter(|f| filter.matches(f)).collect();
            let Some(page) = paging else {
                return ok(Flows {
                    flows: shown,
                    next: None,
                });
            };
            shown.sort_by_key(|f| f.cookie);
            let after = req.get("after").and_then(Value::as_u64);
            shown.retain(|f| after.is_none_or(|a| f.cookie > a));
            let limit = req
                .get("limit")
                .and_then(Value::as_u64)
                .map_or(page, |l| (l as usize).min(page));
            let next = (shown.len() > limit).then(|| shown[limit - 1].cookie);
            shown.truncate(limit);
            ok(Flows { flows: shown, next })
        }
        Some("flow") => match flows
            .iter()
            .find(|f| Some(f.cookie) == req["cookie"].as_u64())
        {
            Some(f) => {
                let mut f = f.clone();
                f.events = vec![
                    FlowEventView {
                        at_secs_ago: f.age_secs,
                        what: "seen by tracker (connect)".into(),
                    },
                    FlowEventView {
                        at_secs_ago: f.age_secs - 0.5,
                        what: format!(
                            "tagged {} by {}",
                            f.tag_text(),
                            f.rule.clone().unwrap_or_default()
                        ),
                    },
                ];
                ok(f)
            }
            None => err("no flow with that cookie (it may have ended)"),
        },
        Some("reload") => ok(json!({"policy_version": "p-fake-2"})),
        _ => err("bad request: unknown op"),
    }
}

pub fn status(flows: &[FlowView]) -> StatusView {
    let mut per_tag: Vec<TagTotals> = Vec::new();
    for f in flows.iter().filter(|f| f.experiment.is_some()) {
        let (e, a) = (f.experiment.unwrap(), f.activity.unwrap_or(0));
        match per_tag
            .iter_mut()
            .find(|t| t.experiment == e && t.activity == a)
        {
            Some(t) => {
                t.flows += 1;
                t.packets += f.packets;
                t.bytes += f.bytes;
            }
            None => per_tag.push(TagTotals {
                experiment: e,
                experiment_name: f.experiment_name.clone(),
                activity: a,
                activity_name: f.activity_name.clone(),
                flows: 1,
                packets: f.packets,
                bytes: f.bytes,
            }),
        }
    }
    StatusView {
        version: "0.1.0-fake".into(),
        pid: 4242,
        uptime_secs: 3725.0,
        strategy: "flow-label".into(),
        attached: vec![("eth0".into(), "tcx".into())],
        policy_version: "p-fake-1".into(),
        policy_files: 2,
        policy_rules: 9,
        flows_total: flows.len(),
        flows_tagged: flows.iter().filter(|f| f.experiment.is_some()).count(),
        map_entries: flows.iter().filter(|f| f.label.is_some()).count(),
        map_capacity: 65536,
        outcomes: [
            ("marked".to_string(), 1000u64),
            ("unmarked".to_string(), 50),
        ]
        .into(),
        per_tag,
        ringbuf_drops: 0,
        reconcile_added: 1,
        reconcile_ended: 2,
        last_poll_ms: 3.2,
        policy_reloads_ok: 1,
        policy_reloads_failed: 0,
        ..Default::default()
    }
}

/// `n` flows: cycling through atlas/xrootd, cms/fts, untagged sshd; deterministic.
pub fn flows(n: usize) -> Vec<FlowView> {
    (0..n)
        .map(|i| {
            let kind = i % 3;
            let (exp, ename, act, aname, comm, user, uid) = match kind {
                0 => (
                    Some(2),
                    Some("atlas"),
                    Some(3),
                    Some("datachallenge"),
                    "xrootd",
                    "xrootd",
                    998,
                ),
                1 => (
                    Some(3),
                    Some("cms"),
                    Some(1),
                    Some("perfsonar"),
                    "fts_url_copy",
                    "fts3",
                    997,
                ),
                _ => (None, None, None, None, "sshd", "root", 0),
            };
            let label = exp.map(|e: u16| {
                // Same layout as model::tag (entropy 0), without depending on it here.
                let rev = (e & 0x1ff).reverse_bits() >> 7;
                (u32::from(rev) << 9) | (u32::from(act.unwrap_or(0u8)) << 2)
            });
            FlowView {
                cookie: 1000 + i as u64,
                proto: if i % 7 == 6 { "udp" } else { "tcp" }.into(),
                local: format!("[2001:db8:1::10]:{}", 40000 + (i % 20000))
                    .parse()
                    .unwrap(),
                remote: format!("[2001:db8:{:x}::20]:1094", 2 + i / 20000)
                    .parse()
                    .unwrap(),
                state: "established".into(),
                direction: "outbound".into(),
                netns: 4026531840,
                pid: Some(1234 + kind as u32),
                comm: Some(comm.into()),
                uid: Some(uid),
                user: Some(user.into()),
                experiment: exp,
                experiment_name: ename.map(Into::into),
                activity: act,
                activity_name: aname.map(Into::into),
                label,
                header: None,
                rule: ename.map(|e| format!("{e}.toml:{comm}-data")),
                first_packet_exact: exp.map(|_| true),
                packets: 100 * (i as u64 + 1),
                bytes: 150_000 * (i as u64 + 1),
                age_secs: 10.0 + i as f64,
                tcp: Some(TcpView {
                    rtt_us: 1500,
                    rttvar_us: 200,
                    snd_cwnd: 10,
                    total_retrans: 0,
                    bytes_acked: 1 << 20,
                    bytes_received: 1 << 10,
                    segs_out: 800,
                    segs_in: 400,
                }),
                events: vec![],
            }
        })
        .collect()
}
