//! Pins the layout of the ring-buffer record (`struct flowd_sock_event` in bpf/flowd.h, which
//! `_Static_assert`s the same numbers on the C side).

use std::mem::{offset_of, size_of};

use flowd::discovery::tracker_event::{RawRecord, RECORD_SIZE};

#[test]
fn record_size_and_every_offset_match_the_c_header() {
    assert_eq!(size_of::<RawRecord>(), 128);
    assert_eq!(RECORD_SIZE, 128);
    let offsets = [
        (offset_of!(RawRecord, ts_ns), 0),
        (offset_of!(RawRecord, cookie), 8),
        (offset_of!(RawRecord, netns), 16),
        (offset_of!(RawRecord, inode), 24),
        (offset_of!(RawRecord, cgroup_id), 32),
        (offset_of!(RawRecord, pid), 40),
        (offset_of!(RawRecord, tid), 44),
        (offset_of!(RawRecord, uid), 48),
        (offset_of!(RawRecord, family), 52),
        (offset_of!(RawRecord, protocol), 54),
        (offset_of!(RawRecord, kind), 55),
        (offset_of!(RawRecord, saddr), 56),
        (offset_of!(RawRecord, daddr), 72),
        (offset_of!(RawRecord, sport), 88),
        (offset_of!(RawRecord, dport), 90),
        (offset_of!(RawRecord, oldstate), 92),
        (offset_of!(RawRecord, newstate), 93),
        (offset_of!(RawRecord, flags), 94),
        (offset_of!(RawRecord, pad0), 95),
        (offset_of!(RawRecord, comm), 96),
        (offset_of!(RawRecord, bytes_acked), 112),
        (offset_of!(RawRecord, bytes_received), 120),
    ];
    for (i, (got, want)) in offsets.iter().enumerate() {
        assert_eq!(got, want, "field #{i}");
    }
    assert_eq!(std::mem::align_of::<RawRecord>(), 8);
}
