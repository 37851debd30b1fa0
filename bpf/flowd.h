/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every struct and constant shared by the BPF programs and the Rust daemon.
 * The Rust side reaches these through the skeleton-generated types; a Rust test
 * asserts the layout of anything read by hand.
 *
 * Names carry a flowd_ prefix: vmlinux.h already defines many common ones.
 */
#ifndef FLOWD_H
#define FLOWD_H

#define FLOWD_AF_INET 2
#define FLOWD_AF_INET6 10

/*
 * Marking strategy bits, set once before load through rodata (flowd_strategy).
 * The flow label and the two option headers combine freely; see
 * shared/spec/scitags.md ("IPv6 extension header option").
 */
#define FLOWD_STRATEGY_LABEL 0x1
#define FLOWD_STRATEGY_HOP_BY_HOP 0x2
#define FLOWD_STRATEGY_DESTINATION 0x4

/* Option type 0x1E: RFC 4727 experimental, action 00 (skip if unknown), C=0. */
#define FLOWD_OPT_TYPE 0x1E
#define FLOWD_OPT_HDR_LEN 8

/* What happened to a packet: one per-CPU counter each (map flowd_outcomes). */
enum flowd_outcome {
	/* Packet of a flow in flowd_marks, rewritten as the strategy says. */
	FLOWD_OUT_MARKED = 0,
	/* IPv6 TCP/UDP packet of a flow that has no mark. */
	FLOWD_OUT_UNMARKED = 1,
	/* Marked flow, but an option header would exceed the MTU: header not added. */
	FLOWD_OUT_SKIPPED_MTU = 2,
	/* IPv4, ARP, ...: passed untouched. */
	FLOWD_OUT_NOT_IPV6 = 3,
	/* IPv6 but neither TCP nor UDP (ICMPv6, non-first fragments, ...). */
	FLOWD_OUT_NOT_TCP_UDP = 4,
	/* Truncated or unparseable headers: passed untouched. */
	FLOWD_OUT_MALFORMED = 5,
	/* Marked flow, header not added: the packet already has that header, it
	 * comes behind an inline VLAN tag, or the kernel refused to grow it. */
	FLOWD_OUT_SKIPPED_HEADER = 6,
	FLOWD_OUT_MAX = 7,
};

/*
 * A flow as the sending host sees it. Addresses and ports in network byte order,
 * exactly as in the packet; an IPv4 address takes the first 4 bytes of its field
 * and the rest is zero. 40 bytes, no implicit padding.
 */
struct flowd_flow_key {
	__u8 family; /* FLOWD_AF_INET or FLOWD_AF_INET6 */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u16 pad;   /* must be zero */
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* The mark for one flow. */
struct flowd_flow_mark {
	/* The 20-bit flow label (host order), entropy bits included: drawn once per
	 * flow by userspace so that the label never changes mid-flow. */
	__u32 label;
	__u16 experiment;
	__u8 activity;
	__u8 flags; /* reserved, zero */
	/* Index into flowd_tag_counters: userspace gives each tag in use a slot. */
	__u32 counter_slot;
};

/* Packets and bytes marked for one tag (per CPU). */
struct flowd_tag_counter {
	__u64 packets;
	__u64 bytes;
};

#define FLOWD_TAG_SLOTS 1024

#endif /* FLOWD_H */
