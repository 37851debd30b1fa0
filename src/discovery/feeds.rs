//! The discovery sources as running feeds: the tracker's ring buffer and the periodic
//! sock_diag dump each run on a thread of their own (both block in the kernel) and
//! send what they find down one bounded channel to the flow table's owner.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

use super::full_dump::{DumpSource, FullDump};
use super::sockdiag::{PollerStats, SockDiagError};
use super::sockiter::SockIterError;
use super::tracker::{Features, Tracker, TrackerConfig};
use super::tracker_event::EventKind;
use super::walk_digest::WalkDigest;
use crate::config::DumpSourceSetting;
use crate::model::socket::SocketObservation;

/// One sock_diag dump in this many asks the kernel for tcp_info.
const TCP_INFO_EVERY: u64 = 4;
/// A periodic reconcile may be a verify walk, but every this many rounds it is a
/// full dump all the same: the tcp_info that displays show comes from dumps only.
const FULL_DUMP_EVERY: u64 = 10;
/// Sockets per part of a dump: the engine digests a dump of 100 000 sockets part by
/// part, never holding all of it (~400 KiB a part).
const DUMP_PART: usize = 2048;

/// What the feeds send.
pub enum Discovery {
    /// One tracker event, and when it happened.
    Observed(SocketObservation, Instant),
    /// Sockets of the sock_diag dump in progress.
    DumpPart(Vec<SocketObservation>),
    /// The end of a dump: complete (reconcile against it) or failed.
    Dumped(Dump),
    /// A verify walk begins (digests seeded with `seed`): fold the table now.
    VerifyBegun { seed: u64 },
    /// The verify walk's digest of the namespace, or why there is none.
    Verified(Verify),
}

/// A verify walk ([`crate::discovery::walk_digest`]): instead of a periodic full
/// dump, when the tracker sees every change and the table lacks nothing a dump
/// would fill in.
pub struct Verify {
    pub started: Instant,
    pub digest: Result<WalkDigest, SockIterError>,
    pub duration: Duration,
}

pub struct Dump {
    /// Taken before the first request: the race rule of `FlowTable::dump_complete`.
    pub started: Instant,
    pub result: Result<(), SockDiagError>,
    pub stats: PollerStats,
    /// The source that made it, and how many iterator walks failed so far and
    /// were made again with sock_diag.
    pub source: DumpSource,
    pub fallbacks: u64,
}

/// A running feed thread; stopped and joined on drop.
pub struct Feed {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // The poller parks between dumps: wake it rather than wait out the interval.
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// The tracker's live state for status displays.
#[derive(Debug, Default)]
pub struct TrackerStatus {
    pub drops: AtomicU64,
    pub features: std::sync::Mutex<Option<Features>>,
    /// Per attached program, runs the kernel skipped (see
    /// [`Tracker::recursion_misses`]); `None` where the kernel does not count them.
    pub recursion_misses: std::sync::Mutex<Option<Vec<(&'static str, u64)>>>,
    /// TCP state changes the tracepoint program would have missed, reported by
    /// the sockops STATE_CB instead (all namespaces).
    pub state_cb_events: AtomicU64,
    /// Full dumps the tracker asked for because it lost events (ring drops,
    /// skipped runs the STATE_CB did not cover).
    pub dumps_requested: AtomicU64,
}

impl TrackerStatus {
    /// Sum of [`TrackerStatus::recursion_misses`] over programs.
    pub fn recursion_misses_total(&self) -> Option<u64> {
        let m = self.recursion_misses.lock().unwrap();
        m.as_ref().map(|v| v.iter().map(|(_, n)| n).sum())
    }
}

/// How often the tracker thread reads its programs' recursion_misses (one bpf()
/// call per program).
const MISSES_EVERY: Duration = Duration::from_secs(1);

/// Starts the tracker (in the caller, so a failure is reported at once) and a thread
/// that drains its ring buffer without pause: the ring carries every socket of the
/// host, and a consumer that stalls loses events (counted in `drops`). With
/// `only_netns`, events of other network namespaces stop here.
pub fn spawn_tracker(
    cfg: &TrackerConfig,
    only_netns: Option<u64>,
    tx: Sender<Discovery>,
    status: Arc<TrackerStatus>,
    dumps: Arc<DumpSchedule>,
) -> Result<Feed> {
    let mut tracker = Tracker::start(cfg).context("starting the socket tracker")?;
    info!(features = ?tracker.features(), "socket tracker running");
    *status.features.lock().unwrap() = Some(tracker.features().clone());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name("flowd-tracker".into())
        .spawn(move || {
            let mut last_drops = 0;
            let mut last_uncovered = 0;
            let mut misses_read = Instant::now() - MISSES_EVERY;
            while !stop2.load(Ordering::Relaxed) {
                let clock = MonotonicClock::now();
                // Events wake the poll at once; the timeout only bounds how long a
                // stop request waits, so it can be long (idle wakeups cost CPU).
                let r = tracker.poll_events(Duration::from_millis(500), &mut |ev| {
                    if ev.kind == EventKind::TcpStateCb {
                        status.state_cb_events.fetch_add(1, Ordering::Relaxed);
                    }
                    if !ev.has_full_tuple() || only_netns.is_some_and(|n| ev.observation.netns != n)
                    {
                        return;
                    }
                    // Blocks when the flow table lags: backpressure into the ring,
                    // where losses are counted rather than hidden.
                    let at = clock.instant_of(ev.ts_ns);
                    let _ = tx.blocking_send(Discovery::Observed(ev.observation, at));
                });
                if let Err(e) = r {
                    warn!(error = %e, "polling the tracker ring buffer failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Ok(d) = tracker.drops() {
                    if d > last_drops {
                        warn!(
                            lost = d - last_drops,
                            total = d,
                            "tracker ring buffer overflowed: dumping sock_diag to reconcile"
                        );
                        last_drops = d;
                        dumps.request();
                        status.dumps_requested.fetch_add(1, Ordering::Relaxed);
                    }
                    status.drops.store(d, Ordering::Relaxed);
                }
                if misses_read.elapsed() >= MISSES_EVERY {
                    misses_read = Instant::now();
                    let m = tracker.recursion_misses();
                    // Skipped runs of the programs that report events (the softirq
                    // ones only keep a flag), less the changes the sockops STATE_CB
                    // reported in their place: one each (bpf/tracker.bpf.c,
                    // flowd_in_tcp_state). Counted host-wide, as the misses are.
                    let skipped: u64 = m
                        .iter()
                        .flatten()
                        .filter(|(p, _)| !p.starts_with("flowd_softirq"))
                        .map(|(_, n)| n)
                        .sum();
                    let uncovered =
                        skipped.saturating_sub(status.state_cb_events.load(Ordering::Relaxed));
                    if uncovered > last_uncovered {
                        info!(
                            lost = uncovered - last_uncovered,
                            skipped,
                            "tracker programs skipped nested runs that STATE_CB did not cover: dumping sock_diag to reconcile"
                        );
                        last_uncovered = uncovered;
                        dumps.request();
                        status.dumps_requested.fetch_add(1, Ordering::Relaxed);
                    }
                    *status.recursion_misses.lock().unwrap() = m;
                }
            }
        })
        .context("spawning the tracker thread")?;
    Ok(Feed {
        stop,
        handle: Some(handle),
    })
}

/// Converts the kernel's CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) into
/// `Instant`s, which on Linux count the same clock.
struct MonotonicClock {
    instant: Instant,
    ns: u64,
}

impl MonotonicClock {
    fn now() -> Self {
        let ts =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
        MonotonicClock {
            instant: Instant::now(),
            ns: ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        }
    }

    fn instant_of(&self, ts_ns: u64) -> Instant {
        if ts_ns <= self.ns {
            self.instant - Duration::from_nanos(self.ns - ts_ns)
        } else {
            self.instant + Duration::from_nanos(ts_ns - self.ns)
        }
    }
}

/// When the poller makes a full dump. A dump costs a walk of every socket of the
/// host (the kernel's hash is global), ~2 us per socket with sock_diag, about half
/// with the socket iterator: at 100 000 sockets, 0.07-0.2 s. While
/// the tracker reports every change, a dump only corrects what it lost, so it runs
/// at start, soon after the tracker says it lost something (ring drop, skipped
/// nested run) and otherwise at a long safety interval; without a complete tracker,
/// every `min_gap`.
#[derive(Debug)]
pub struct DumpSchedule {
    /// Dumps at most this often, whatever asks (config reconcile_interval_ms).
    min_gap: Duration,
    /// The period in force, milliseconds (set once the tracker's coverage is known).
    interval_ms: AtomicU64,
    wanted: AtomicBool,
    /// The next reconcile must be a full dump (a loss, a failed verify walk, or
    /// flows a dump would complete).
    full_wanted: AtomicBool,
    /// Periodic reconciles may be verify walks (`discovery.verify_walks`).
    verify_walks: AtomicBool,
    /// Flows the table holds that a full dump would complete (the engine's
    /// count): while any, periodic reconciles are full dumps.
    incomplete_flows: AtomicU64,
    poller: std::sync::OnceLock<std::thread::Thread>,
}

impl DumpSchedule {
    /// Every `min_gap` until [`DumpSchedule::set_interval`] says otherwise.
    pub fn new(min_gap: Duration) -> Arc<Self> {
        Arc::new(DumpSchedule {
            min_gap,
            interval_ms: AtomicU64::new(min_gap.as_millis() as u64),
            wanted: AtomicBool::new(false),
            full_wanted: AtomicBool::new(false),
            verify_walks: AtomicBool::new(false),
            incomplete_flows: AtomicU64::new(0),
            poller: std::sync::OnceLock::new(),
        })
    }

    /// The period between dumps nobody asked for; never below `min_gap`.
    pub fn set_interval(&self, every: Duration) {
        let every = every.max(self.min_gap);
        self.interval_ms
            .store(every.as_millis() as u64, Ordering::Relaxed);
        self.wake();
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    /// Asks for a full dump as soon as `min_gap` allows: something was lost.
    pub fn request(&self) {
        self.full_wanted.store(true, Ordering::Relaxed);
        self.wanted.store(true, Ordering::Relaxed);
        self.wake();
    }

    /// How many flows a full dump would complete (the engine says after each
    /// change): periodic reconciles are full dumps while there are any.
    pub fn set_incomplete_flows(&self, n: usize) {
        let n = n as u64;
        if self.incomplete_flows.load(Ordering::Relaxed) != n {
            self.incomplete_flows.store(n, Ordering::Relaxed);
        }
    }

    /// Whether the next reconcile is to be a full dump: asked for, or flows a
    /// dump would complete.
    pub fn full_dump_wanted(&self) -> bool {
        self.full_wanted.load(Ordering::Relaxed) || self.has_incomplete_flows()
    }

    /// As [`DumpSchedule::full_dump_wanted`], for the round that makes the dump:
    /// the request is taken.
    fn take_full_dump_wanted(&self) -> bool {
        self.full_wanted.swap(false, Ordering::Relaxed) || self.has_incomplete_flows()
    }

    fn has_incomplete_flows(&self) -> bool {
        self.incomplete_flows.load(Ordering::Relaxed) > 0
    }

    /// Lets periodic reconciles be verify walks (while the tracker sees every
    /// change: set with [`DumpSchedule::set_interval`]).
    pub fn allow_verify_walks(&self) {
        self.verify_walks.store(true, Ordering::Relaxed);
    }

    fn wake(&self) {
        if let Some(t) = self.poller.get() {
            t.unpark();
        }
    }

    /// Parks until the next dump is due (timer, or a request `min_gap` after the
    /// last one started) or `stop` is set.
    fn wait(&self, last: Instant, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let due = if self.wanted.load(Ordering::Relaxed) {
                last + self.min_gap
            } else {
                last + self.interval()
            };
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.wanted.store(false, Ordering::Relaxed);
                return;
            }
            // Unparked by Feed::drop, a request or a new interval.
            std::thread::park_timeout(left);
        }
    }
}

/// Opens the dump sources (here, so a failure is reported at once) and dumps as
/// `schedule` says, first at once: sockets that existed before the daemon are
/// adopted from the first dump. Returns the feed and the inode of the dumped netns.
pub fn spawn_poller(
    schedule: Arc<DumpSchedule>,
    source: DumpSourceSetting,
    tx: Sender<Discovery>,
) -> Result<(Feed, u64)> {
    let mut sd = FullDump::open(source).context("opening the full dump sources")?;
    let netns = sd.netns();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name("flowd-sockdiag".into())
        .spawn(move || {
            let _ = schedule.poller.set(std::thread::current());
            let mut round: u64 = 0;
            let mut since_full: u64 = 0;
            while !stop2.load(Ordering::Relaxed) {
                let full_wanted = schedule.take_full_dump_wanted();
                let verify = round > 0
                    && !full_wanted
                    && since_full + 1 < FULL_DUMP_EVERY
                    && schedule.verify_walks.load(Ordering::Relaxed)
                    && sd.can_verify();
                if verify {
                    round += 1;
                    since_full += 1;
                    let seed = sd.digest_seed();
                    if tx.blocking_send(Discovery::VerifyBegun { seed }).is_err() {
                        return;
                    }
                    let started = Instant::now();
                    let digest = sd.verify();
                    let duration = started.elapsed();
                    let v = Verify {
                        started,
                        digest,
                        duration,
                    };
                    if tx.blocking_send(Discovery::Verified(v)).is_err() {
                        return;
                    }
                    schedule.wait(started, &stop2);
                    continue;
                }
                since_full = 0;
                // tcp_info is for display only, and asking for it makes the kernel
                // fill ~250 bytes per socket: every 4th dump is fresh enough (every
                // dump, when dumps are rare).
                let rare = schedule.interval() > schedule.min_gap;
                sd.set_tcp_info(rare || round.is_multiple_of(TCP_INFO_EVERY));
                round += 1;
                let started = Instant::now();
                let mut engine_gone = false;
                let result = sd.dump_chunked(DUMP_PART, &mut |part| {
                    let part = std::mem::take(part);
                    engine_gone |= tx.blocking_send(Discovery::DumpPart(part)).is_err();
                });
                if engine_gone {
                    return;
                }
                let dump = Dump {
                    started,
                    result,
                    stats: *sd.stats(),
                    source: sd.source(),
                    fallbacks: sd.fallbacks(),
                };
                if tx.blocking_send(Discovery::Dumped(dump)).is_err() {
                    return;
                }
                schedule.wait(started, &stop2);
            }
        })
        .context("spawning the sock_diag thread")?;
    Ok((
        Feed {
            stop,
            handle: Some(handle),
        },
        netns,
    ))
}
