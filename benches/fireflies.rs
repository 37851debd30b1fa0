//! Firefly costs: encoding one datagram, the engine-side bookkeeping per tagged flow
//! (start + end) and its memory, and the sender's rate to a collector on loopback
//! (sent and received counts, so losses show). No privileges needed.
//!
//! Run: `cargo bench --bench fireflies`.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flowd::config::FireflyConfig;
use flowd::firefly::{sender, Fireflies, Firefly, FireflyCounters, State, Usage};
use flowd::flows::{Flow, Lifecycle, Owner, SeenBy};
use flowd::marking::Decision;
use flowd::model::socket::{Direction, FlowKey, Protocol, SockState};
use flowd::model::tag::Tag;
use flowd::policy::RuleRef;

const N: u32 = 100_000;

fn key(i: u32) -> FlowKey {
    let [a, b, c, d] = i.to_be_bytes();
    FlowKey::new(
        Protocol::Tcp,
        format!("[fd00::{a:x}{b:02x}:{c:x}{d:02x}]:40000")
            .parse()
            .unwrap(),
        "[fd00:2::9]:1094".parse().unwrap(),
    )
}

fn flow(i: u32, lifecycle: Lifecycle) -> Flow {
    let now = Instant::now();
    Flow {
        key: key(i),
        cookie: u64::from(i) + 1,
        netns: 1,
        state: SockState::Established,
        lifecycle,
        direction: Direction::Outbound,
        inode: 0,
        owner: Owner::default(),
        first_seen: now,
        last_seen: now,
        tcp: None,
        seen_by: SeenBy::default(),
    }
}

fn rule() -> Arc<RuleRef> {
    Arc::new(RuleRef {
        file: "atlas.toml".into(),
        name: "x".into(),
        line: 1,
    })
}

/// What the policy decides for every flow here: atlas/4.
fn decision(f: &Flow, rule: &Arc<RuleRef>) -> Decision {
    Decision {
        tag: Tag::new(2, 4).unwrap(),
        rule: rule.clone(),
        entropy: 0,
        key: f.key,
        in_map: false,
        tagged_at: Instant::now(),
        first_packet_exact: false,
        announced: false,
    }
}

/// A firefly config sending only to a collector on loopback, and the thread that
/// counts what that collector receives (it stops 0.5 s after the last datagram).
fn loopback_collector() -> (FireflyConfig, std::thread::JoinHandle<u64>) {
    let collector = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // A receive buffer big enough that the count measures the sender, not the
    // receiver's backlog.
    let _ = socket2::SockRef::from(&collector).set_recv_buffer_size(64 << 20);
    collector
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let to = collector.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        while collector.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    let cfg = FireflyConfig {
        enabled: true,
        collectors: vec![flowd::config::Collector::Addr(to)],
        to_remote: false,
        ..FireflyConfig::default()
    };
    (cfg, receiver)
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

fn encode() {
    let f = Firefly {
        state: State::End,
        key: key(7),
        tag: Tag::new(2, 4).unwrap(),
        start: SystemTime::now(),
        now: SystemTime::now(),
        end: Some(SystemTime::now()),
        usage: Some(Usage {
            received: 123,
            sent: 4_567_890,
        }),
        application: Some("xrootd".into()),
    };
    let t0 = Instant::now();
    let mut bytes = 0;
    for _ in 0..N {
        bytes += black_box(&f).datagram(Some("se01.example.org")).len();
    }
    let per = t0.elapsed().as_nanos() as f64 / f64::from(N);
    println!(
        "encode (end, IPv6, syslog header)   {per:8.0} ns/datagram   {} bytes",
        bytes / N as usize
    );
}

fn bookkeeping() {
    // A queue that holds every message: this row measures the bookkeeping; the
    // daemon's queue (sender::QUEUE) drops what a burst beyond it brings (counted).
    let (tx, mut rx) = tokio::sync::mpsc::channel(2 * N as usize);
    let counters = Arc::new(FireflyCounters::default());
    let mut ff = Fireflies::new(tx, counters.clone(), None);
    let mut queued = 0u64;
    let mut drain = move || {
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        queued
    };
    let rule = rule();
    let flows: Vec<Flow> = (0..N).map(|i| flow(i, Lifecycle::Established)).collect();
    let decisions: Vec<Decision> = flows.iter().map(|f| decision(f, &rule)).collect();
    // In batches of a sock_diag dump part, the queue emptied in between (by the
    // sender, in the daemon): the RSS growth is then the per-flow state alone.
    let before = rss_kib();
    let t0 = Instant::now();
    for (fs, ds) in flows.chunks(2048).zip(decisions.chunks(2048)) {
        for (f, d) in fs.iter().zip(ds) {
            ff.on_flow(f, Some(d));
        }
        drain();
    }
    let start = t0.elapsed();
    let held = rss_kib().saturating_sub(before);
    let t0 = Instant::now();
    for fs in flows.chunks(2048) {
        for f in fs {
            ff.on_end(f);
        }
        drain();
    }
    let end = t0.elapsed();
    let queued = drain();
    println!(
        "engine side, {N} flows: start {:.0} ns/flow, end {:.0} ns/flow ({queued} queued, {} dropped); \
         +{held} KiB RSS while announced",
        start.as_nanos() as f64 / f64::from(N),
        end.as_nanos() as f64 / f64::from(N),
        counters.queue_full.load(Ordering::Relaxed),
    );
}

fn send_rate(rt: &tokio::runtime::Runtime) {
    let (cfg, receiver) = loopback_collector();
    let counters = Arc::new(FireflyCounters::default());
    let t0 = Instant::now();
    let sent = rt.block_on(async {
        let sender::Sender { queue, task, .. } = sender::spawn(&cfg, counters.clone()).unwrap();
        for i in 0..N {
            let f = Firefly {
                state: State::Start,
                key: key(i),
                tag: Tag::new(2, 4).unwrap(),
                start: SystemTime::now(),
                now: SystemTime::now(),
                end: None,
                usage: None,
                application: Some("xrootd".into()),
            };
            queue.send(f).await.unwrap();
        }
        drop(queue);
        task.await.unwrap();
        counters.sent[State::Start as usize].load(Ordering::Relaxed)
    });
    let took = t0.elapsed();
    let received = receiver.join().unwrap();
    println!(
        "sender to a loopback collector: {:.0} datagrams/s ({sent} sent, {received} received, {} errors)",
        f64::from(N) / took.as_secs_f64(),
        counters.send_errors.load(Ordering::Relaxed)
    );
}

/// The first dump of a busy host: starts for N flows at once, in dump-part batches,
/// through the daemon's queue and sender to a loopback collector.
fn burst(rt: &tokio::runtime::Runtime) {
    let (cfg, receiver) = loopback_collector();
    let counters = Arc::new(FireflyCounters::default());
    let flows: Vec<Flow> = (0..N).map(|i| flow(i, Lifecycle::Established)).collect();
    let rule = rule();
    let t0 = Instant::now();
    let (waited_max, sent) = rt.block_on(async {
        let sender::Sender { queue, task, .. } = sender::spawn(&cfg, counters.clone()).unwrap();
        let mut ff = Fireflies::new(queue, counters.clone(), None);
        let live = |c: u64| flows.get(c as usize - 1);
        let mut waited_max = 0;
        for fs in flows.chunks(2048) {
            for f in fs {
                ff.on_flow(f, Some(&decision(f, &rule)));
            }
            ff.flush(live);
            waited_max = waited_max.max(ff.status().starts_waiting);
            tokio::task::yield_now().await;
        }
        // The engine's 10 ms tick while starts wait.
        while ff.has_waiting() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ff.flush(live);
        }
        drop(ff);
        task.await.unwrap();
        (
            waited_max,
            counters.sent[State::Start as usize].load(Ordering::Relaxed),
        )
    });
    let took = t0.elapsed();
    println!(
        "burst of {N} starts (queue {}): all out in {:.2} s, {sent} sent, {} received, {} lost, at most {waited_max} waiting",
        sender::QUEUE,
        took.as_secs_f64(),
        receiver.join().unwrap(),
        counters.queue_full.load(Ordering::Relaxed),
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("fireflies ({N} per row)");
    encode();
    bookkeeping();
    send_rate(&rt);
    burst(&rt);
}
