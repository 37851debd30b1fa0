//! The flow index (bpf/flow_index.bpf.h, src/marker/flow_index.rs) through
//! BPF_PROG_TEST_RUN of the marker: which packets it answers alone, when a miss
//! in it is final, and that every mark it lacks is counted in its bucket, so that
//! no packet of a marked flow leaves unmarked. Privileged (loads BPF).

mod common;
#[path = "common/policy.rs"]
mod policy_common;

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use flowd::bpf::marker::types::{flowd_flow_key, flowd_flow_mark};
use flowd::bpf::marker::MarkerSkel;
use flowd::marker::flow_index::{FlowIndex, WAYS};
use flowd::marker::maps::{as_bytes, bpf_key, MarkMaps};
use flowd::marker::{load, maps_of, LoadOptions};
use flowd::model::socket::{FlowKey, Protocol};
use flowd::model::tag::{decode, Tag};
use flowd::policy::kernel::KernelPolicy;
use libbpf_rs::{MapCore, MapFlags, ProgramInput};

const LOCAL: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const TAG: Tag = Tag {
    experiment: 2,
    activity: 4,
};
const CAPACITY: u32 = 64;

struct Marker {
    skel: MarkerSkel<'static>,
    maps: MarkMaps,
}

/// No socket cache: every packet takes the lookup, as a flow's first does.
fn marker(in_kernel: bool) -> Marker {
    let skel = load(&LoadOptions {
        map_capacity: CAPACITY,
        socket_cache: false,
        flow_index: true,
        in_kernel,
        ..Default::default()
    })
    .expect("load marker");
    let maps = maps_of(&skel, CAPACITY).unwrap();
    assert!(maps.index().is_some(), "the flow index is on by default");
    Marker { skel, maps }
}

fn flow(sport: u16, dport: u16) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        SocketAddr::new(LOCAL.into(), sport),
        SocketAddr::new(PEER.into(), dport),
    )
}

/// Ethernet + IPv6 (label 0) + a 20-byte TCP header with `flags`, no payload.
fn frame(f: &FlowKey, flags: u8) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
    p.extend_from_slice(&(6u32 << 28).to_be_bytes());
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&[6, 64]);
    p.extend_from_slice(&LOCAL.octets());
    p.extend_from_slice(&PEER.octets());
    p.extend_from_slice(&f.local().port().to_be_bytes());
    p.extend_from_slice(&f.remote().port().to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

impl Marker {
    fn index(&self) -> &FlowIndex {
        self.maps.index().unwrap()
    }

    /// The flow label of `frame` after the program ran on it.
    fn label_of(&self, frame: &[u8]) -> u32 {
        let mut out = vec![0u8; frame.len() + 64];
        let o = self
            .skel
            .progs
            .flowd_mark
            .test_run(ProgramInput {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test_run");
        assert_eq!(o.return_value, 0);
        let d = o.data.unwrap();
        u32::from_be_bytes(d[14..18].try_into().unwrap()) & 0xfffff
    }

    /// Writes into flowd_marks behind MarkMaps' back (neither indexed nor counted).
    fn raw_insert(&self, f: &FlowKey, label: u32) {
        let v = flowd_flow_mark {
            label,
            experiment: TAG.experiment,
            activity: TAG.activity,
            ..Default::default()
        };
        self.skel
            .maps
            .flowd_marks
            .update(as_bytes(&key(f)), as_bytes(&v), MapFlags::ANY)
            .unwrap();
    }

    fn raw_delete(&self, f: &FlowKey) {
        self.skel
            .maps
            .flowd_marks
            .delete(as_bytes(&key(f)))
            .unwrap();
    }
}

fn key(f: &FlowKey) -> flowd_flow_key {
    bpf_key(f).unwrap()
}

#[test]
fn a_flow_in_the_index_is_marked_without_asking_flowd_marks() {
    if !common::privileged() {
        return;
    }
    let m = marker(false);
    let f = flow(40000, 1094);
    m.maps.insert(&f, TAG, 0b10101).unwrap();
    assert!(m.index().contains(&key(&f)));
    assert_eq!(m.index().unindexed(), 0);
    // Gone from flowd_marks, still in the index: only the index can label it.
    m.raw_delete(&f);
    let fr = frame(&f, 0x10);
    assert_eq!(m.label_of(&fr), TAG.label(0b10101));
    assert_eq!(m.label_of(&fr), TAG.label(0b10101));
    assert_eq!(
        m.index().count(&key(&f)),
        Some((2, 2 * fr.len() as u64)),
        "packets are counted in the slot"
    );
}

#[test]
fn an_index_miss_is_final_unless_its_bucket_counts_an_unindexed_mark() {
    if !common::privileged() {
        return;
    }
    let m = marker(false);
    let f = flow(40001, 1094);
    let fr = frame(&f, 0x10);
    // In flowd_marks but neither indexed nor counted: the program must not look.
    m.raw_insert(&f, TAG.label(3));
    assert_eq!(
        m.label_of(&fr),
        0,
        "a miss with a zero count skips flowd_marks"
    );
    // Counted in its bucket: now flowd_marks is asked.
    m.index().unindexed_inc(&key(&f));
    assert_eq!(m.label_of(&fr), TAG.label(3));
    // A count in another bucket does not make this one ask.
    m.index().unindexed_dec(&key(&f));
    let other = (1..u16::MAX)
        .map(|p| flow(p, 9))
        .find(|o| m.index().bucket(&key(o)) != m.index().bucket(&key(&f)))
        .unwrap();
    m.index().unindexed_inc(&key(&other));
    assert_eq!(m.label_of(&fr), 0);
}

#[test]
fn a_full_bucket_keeps_its_extra_flow_in_flowd_marks_counted_and_marked() {
    if !common::privileged() {
        return;
    }
    let m = marker(false);
    let ix = m.index();
    let first = flow(30000, 1094);
    let b = ix.bucket(&key(&first));
    let same: Vec<FlowKey> = (30000..u16::MAX)
        .map(|p| flow(p, 1094))
        .filter(|f| ix.bucket(&key(f)) == b)
        .take(WAYS as usize + 1)
        .collect();
    assert_eq!(same.len(), WAYS as usize + 1);
    for (i, f) in same.iter().enumerate() {
        m.maps.insert(f, TAG, i as u8).unwrap();
    }
    let extra = same.last().unwrap();
    assert!(same[..WAYS as usize].iter().all(|f| ix.contains(&key(f))));
    assert!(!ix.contains(&key(extra)));
    assert_eq!(ix.unindexed(), 1, "the extra flow is counted in its bucket");
    for (i, f) in same.iter().enumerate() {
        assert_eq!(m.label_of(&frame(f, 0x10)), TAG.label(i as u8), "flow {i}");
    }
    // A way frees: the extra flow's next write indexes it and ends its count.
    assert!(m.maps.remove(&same[0]).unwrap());
    assert_eq!(ix.unindexed(), 1);
    m.maps.insert(extra, TAG, WAYS as u8).unwrap();
    assert!(ix.contains(&key(extra)));
    assert_eq!(ix.unindexed(), 0);
    assert_eq!(
        m.label_of(&frame(extra, 0x10)),
        TAG.label(WAYS as u8),
        "the entropy drawn at its first write stays"
    );
    for f in &same[1..] {
        assert!(m.maps.remove(f).unwrap());
    }
    assert_eq!(ix.unindexed(), 0);
    assert!(ix.counts().is_empty());
    assert!(m.maps.is_empty());
    assert_eq!(m.label_of(&frame(extra, 0x10)), 0);
}

#[test]
fn a_retag_keeps_the_slot_and_its_counts() {
    if !common::privileged() {
        return;
    }
    let m = marker(false);
    let f = flow(40002, 1094);
    let fr = frame(&f, 0x10);
    m.maps.insert(&f, TAG, 5).unwrap();
    assert_eq!(m.label_of(&fr), TAG.label(5));
    let other = Tag::new(3, 9).unwrap();
    m.maps.insert(&f, other, 5).unwrap();
    assert_eq!(m.label_of(&fr), other.label(5));
    assert_eq!(m.index().unindexed(), 0);
    assert_eq!(
        m.maps.flow_count(&f).unwrap(),
        Some((2, 2 * fr.len() as u64))
    );
}

/// A mark the kernel decided (the SYN-ACK miss path) is in flowd_marks only: its
/// bucket counts it from before the insert, so the flow's next packets still find
/// it, until userspace meets the flow and indexes the kernel's mark as it is.
#[test]
fn kernel_decided_marks_are_counted_until_userspace_indexes_them() {
    if !common::privileged() {
        return;
    }
    let m = marker(true);
    let text = "experiment = 2\n[[rule]]\nname = \"door\"\nactivity = 4\nlocal_ports = [1094]\n";
    let p = policy_common::load(&[("p/atlas.toml", text)]).unwrap();
    m.maps
        .install_policy(&KernelPolicy::compile(p.rules()))
        .unwrap();
    let f = flow(1094, 50000);
    let synack = m.label_of(&frame(&f, 0x12));
    assert_eq!(
        decode(synack).tag,
        Some(TAG),
        "the SYN-ACK carries the rule's tag"
    );
    let kernel = m
        .maps
        .existing(&f)
        .unwrap()
        .expect("the kernel wrote a mark");
    assert!(kernel.kernel);
    assert!(!m.index().contains(&key(&f)));
    assert_eq!(m.index().unindexed(), 1);
    assert_eq!(m.label_of(&frame(&f, 0x10)), synack, "found in flowd_marks");
    // Userspace meets the flow: the kernel's mark (and entropy) stands, indexed.
    let got = m.maps.insert_new(&f, TAG, 0).unwrap();
    assert_eq!(got, Some(kernel));
    assert!(m.index().contains(&key(&f)));
    assert_eq!(m.index().unindexed(), 0);
    m.raw_delete(&f);
    assert_eq!(m.label_of(&frame(&f, 0x10)), synack, "now from the index");
}

/// A flow of the same bucket as `x`, from port `from` up.
fn same_bucket(m: &Marker, x: &FlowKey, from: u16) -> FlowKey {
    let ix = m.index();
    (from..u16::MAX)
        .map(|p| flow(p, 1094))
        .find(|f| ix.bucket(&key(f)) == ix.bucket(&key(x)))
        .unwrap()
}

/// Runs `flip` in a loop on another thread while the program labels `x`'s packets
/// for 3 s (10 000 per BPF_PROG_TEST_RUN); returns the flips and the packets.
fn flip_while_labelling(
    m: &std::sync::Arc<Marker>,
    x: &FlowKey,
    flip: impl Fn(&Marker) + Send + 'static,
) -> (u64, u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                flip(&m);
                flips += 1;
            }
            flips
        })
    };
    let fr = frame(x, 0x10);
    let end = std::time::Instant::now() + Duration::from_secs(3);
    let mut runs = 0u64;
    while std::time::Instant::now() < end {
        let mut out = vec![0u8; fr.len() + 64];
        m.skel
            .progs
            .flowd_mark
            .test_run(ProgramInput {
                data_in: Some(&fr),
                data_out: Some(&mut out),
                repeat: 10_000,
                ..Default::default()
            })
            .unwrap();
        runs += 10_000;
    }
    stop.store(true, Ordering::Relaxed);
    (writer.join().unwrap(), runs)
}

/// Through the maps as the daemon writes them: X (tag 2/4) and Y (another tag),
/// same bucket, inserted and removed in turn as fast as a thread can, while the
/// program labels X's packets tens of millions of times; Y's per-tag counter must
/// stay zero. The reads that meet a write in progress go to flowd_marks, whose
/// elements are reused at once: before the second lookup after the copy
/// (hash_mark_still_current), 2-3 X packets per run carried Y's mark.
#[test]
fn a_slot_rewritten_under_load_never_lends_a_packet_another_flows_mark() {
    if !common::privileged() {
        return;
    }
    let m = std::sync::Arc::new(marker(false));
    let x = flow(41000, 1094);
    let y = same_bucket(&m, &x, 41001);
    let other = Tag::new(7, 9).unwrap();
    let (flips, runs) = flip_while_labelling(&m, &x, move |m| {
        m.maps.insert(&x, TAG, 1).unwrap();
        m.maps.remove(&x).unwrap();
        m.maps.insert(&y, other, 2).unwrap();
        m.maps.remove(&y).unwrap();
    });
    let per_tag = m.maps.counters().unwrap().per_tag;
    let count = |t: Tag| {
        per_tag
            .iter()
            .find(|c| (c.experiment, c.activity) == (t.experiment, t.activity))
            .map_or(0, |c| c.packets)
    };
    assert!(flips > 1000, "only {flips} rewrites");
    assert!(count(TAG) > 0, "X was never found in {runs} runs");
    assert_eq!(
        count(other),
        0,
        "an X packet got Y's mark ({flips} rewrites, {runs} runs)"
    );
    assert_eq!(m.index().unindexed(), 0);
}

/// The sequence count under load: one slot flips between flow X's mark and flow Y's
/// (same bucket, written straight into the index; nothing in flowd_marks, so only
/// the index can label) as fast as a thread can write it, while the program labels
/// X's packets tens of millions of times: no X packet may carry Y's counter slot.
/// Without the sequence check, 9 586 and 23 761 of them did in two runs.
#[test]
fn the_index_alone_never_lends_a_packet_another_flows_mark() {
    if !common::privileged() {
        return;
    }
    let m = std::sync::Arc::new(marker(false));
    let x = flow(42000, 1094);
    let y = same_bucket(&m, &x, 42001);
    let mark = |slot: u32, tag: Tag| flowd_flow_mark {
        label: tag.label(0),
        experiment: tag.experiment,
        activity: tag.activity,
        counter_slot: slot,
        ..Default::default()
    };
    let (mx, my) = (mark(1, TAG), mark(2, Tag::new(7, 9).unwrap()));
    let (flips, _) = flip_while_labelling(&m, &x, move |m| {
        let ix = m.index();
        assert!(ix.place(&key(&x), &mx));
        assert!(ix.clear(&key(&x)));
        assert!(ix.place(&key(&y), &my));
        assert!(ix.clear(&key(&y)));
    });
    let packets = |slot: u32| -> u64 {
        m.skel
            .maps
            .flowd_tag_counters
            .lookup_percpu(&slot.to_ne_bytes(), MapFlags::ANY)
            .unwrap()
            .unwrap()
            .iter()
            .map(|b| u64::from_ne_bytes(b[..8].try_into().unwrap()))
            .sum()
    };
    assert!(flips > 1000, "only {flips} rewrites");
    assert!(packets(1) > 0, "X never found in the index");
    assert_eq!(packets(2), 0, "an X packet got Y's mark ({flips} rewrites)");
}
