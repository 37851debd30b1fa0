//! Memory and time per tracked socket in the daemon's userspace state: the flow table
//! plus the marking decisions, fed N synthetic tracker observations (no kernel
//! needed). Bytes are counted by a wrapping global allocator, so they are exact.
//!
//! `cargo bench --bench flows` prints a table for 10 000 and 100 000 flows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use flowd::flows::{FlowEvent, FlowTable, FlowTableConfig};
use flowd::marker::maps::MapError;
use flowd::marking::{MarkSink, Marking};
use flowd::model::socket::{Direction, FlowKey, Protocol, SockState, SocketObservation, Source};
use flowd::model::tag::Tag;
use flowd::policy::{Policy, Registry, StaticAccounts};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The BPF map is kernel memory, measured elsewhere: here a sink that accepts all.
struct NullSink;
impl MarkSink for NullSink {
    fn insert(&self, _: &FlowKey, _: Tag, _: u8) -> Result<(), MapError> {
        Ok(())
    }
    fn remove(&self, _: &FlowKey) -> Result<bool, MapError> {
        Ok(true)
    }
}

fn obs(i: u32) -> SocketObservation {
    let local = SocketAddr::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(), 1094);
    let remote = SocketAddr::new(
        Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into(),
        30000 + (i % 30000) as u16,
    );
    SocketObservation {
        key: FlowKey::new(Protocol::Tcp, local, remote),
        cookie: 1_000_000 + u64::from(i),
        netns: 1,
        state: SockState::Established,
        direction: Direction::Inbound,
        inode: 100_000 + u64::from(i),
        uid: Some(1000),
        pid: Some(4242),
        comm: Some("xrootd".into()),
        cgroup_id: Some(77),
        tcp: None,
        tcp_bytes: None,
        source: Source::Tracker,
    }
}

fn main() {
    let policy = Policy::from_sources_with(
        &[(
            "atlas.toml".into(),
            "experiment = \"atlas\"\n[[rule]]\nname = \"xrootd\"\nactivity = \"Data Consolidation\"\nlocal_ports = [1094]\n"
                .to_string(),
        )],
        &Registry::bundled(),
        &StaticAccounts::default(),
    )
    .unwrap();
    println!("userspace state per tracked socket (flow table + marking decision); size_of Flow {} B, Decision {} B", std::mem::size_of::<flowd::flows::Flow>(), std::mem::size_of::<flowd::marking::Decision>());
    println!(
        "{:>8} {:>14} {:>14} {:>16}",
        "flows", "bytes total", "bytes/flow", "ns/event (start)"
    );
    for n in [10_000u32, 100_000] {
        let before = LIVE.load(Ordering::Relaxed);
        let mut table = FlowTable::new(FlowTableConfig {
            netns: 1,
            ..Default::default()
        });
        let mut marking = Marking::new(1);
        let t0 = Instant::now();
        for i in 0..n {
            for ev in table.apply_observation(obs(i)) {
                if let FlowEvent::Started(f) | FlowEvent::Updated(f) = ev {
                    marking.on_flow(&f, &policy, &NullSink, &mut |_| None);
                }
            }
        }
        let per_event = t0.elapsed().as_nanos() as f64 / f64::from(n);
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        assert_eq!(marking.counters().tagged, n as usize);
        println!(
            "{n:>8} {bytes:>14} {:>14.0} {per_event:>16.0}",
            bytes as f64 / f64::from(n)
        );
        drop((table, marking));
    }
}
