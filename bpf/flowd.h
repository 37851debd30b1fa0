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

/*
 * Constants are enums, not #defines: libbpf-cargo emits an enum into the skeleton's
 * `types` module (as a newtype with associated consts) when a type reachable from a
 * map or a global uses it, so Rust reads these values from here rather than from a
 * hand-kept copy. struct flowd_contract at the end of this file is that global.
 */

enum flowd_family {
	FLOWD_AF_INET = 2,
	FLOWD_AF_INET6 = 10,
};

/*
 * Marking strategy bits, set once before load through rodata (flowd_strategy).
 * The flow label and the two option headers combine freely: each option header
 * (hop-by-hop, destination) is 8 bytes: next header, length 0, one option of type
 * FLOWD_OPT_TYPE with 3 data bytes (experiment, 16 bits big-endian; activity),
 * then one Pad1 (marker.bpf.c, fill_option_header).
 */
enum flowd_strategy_bit {
	FLOWD_STRATEGY_LABEL = 0x1,
	FLOWD_STRATEGY_HOP_BY_HOP = 0x2,
	FLOWD_STRATEGY_DESTINATION = 0x4,
};

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
	 * flow, by whichever side writes the flow's entry first (userspace, or the
	 * in-kernel decision with bpf_get_prandom_u32), and kept by the other, so
	 * that the label never changes mid-flow. */
	__u32 label;
	__u16 experiment;
	__u8 activity;
	__u8 flags; /* FLOWD_MARK_F_* */
	/* Index into flowd_tag_counters: userspace gives each tag in use a slot. */
	__u32 counter_slot;
	__u32 pad; /* zero; keeps the counters 8-byte aligned with no hidden padding */
	/* Packets and bytes marked for this flow, for display (see marker.bpf.c on why
	 * they are not atomic). Userspace carries them over when it rewrites the entry
	 * (a new tag after a reload). */
	__u64 packets;
	__u64 bytes;
};

/* flowd_flow_mark.flags: the entry was written by the in-kernel decision (sockops
 * or the TC miss path), not by userspace. Userspace reads it to say whether a
 * flow was marked from its first packet and adopts the entry's entropy bits. */
enum flowd_mark_flag {
	FLOWD_MARK_F_KERNEL = 0x1,
};

/* Packets and bytes marked for one tag (per CPU). */
struct flowd_tag_counter {
	__u64 packets;
	__u64 bytes;
};

enum flowd_tag_limits {
	FLOWD_TAG_SLOTS = 1024,
};

/* ---- In-kernel policy decisions (marker.bpf.c; src/policy/kernel.rs compiles,
 * src/marker/compiled.rs writes) ----
 *
 * The kernel-decidable part of the policy (protocol, direction, local/remote
 * CIDRs with negation, local/remote ports, uid) is compiled into bitmaps: rule i
 * (in precedence order, i < FLOWD_KRULES_MAX) is bit i of every bitmap. Each map
 * below answers, for one field value, "which rules accept this value"; the AND of
 * all answers is the set of rules that match, and its lowest bit wins. Rules that
 * need userspace facts (process, exe, cgroup, groups) keep their bit with their
 * kernel-checkable fields and are also set in `stop`: if such a rule is the lowest
 * set bit, userspace might match it, so the kernel does not decide.
 *
 * Every map is keyed by a slot (0 or 1): userspace fills the inactive slot, then
 * flips flowd_kstate.active, so a program never sees half a policy.
 */
enum flowd_krule_limits {
	FLOWD_KRULES_MAX = 128,
	FLOWD_KWORDS = 2,
	FLOWD_KSLOTS = 2,
};
#define FLOWD_KSIDE_LOCAL 0
#define FLOWD_KSIDE_REMOTE 1
#define FLOWD_KDIR_OUTBOUND 1
#define FLOWD_KDIR_INBOUND 2

/* A set of rules: bit i of w[i / 64] is rule i. */
struct flowd_kbits {
	__u64 w[FLOWD_KWORDS];
};

/* LPM key of flowd_kaddrs: slot and side are the first 16 bits of the prefix
 * (prefixlen = 16 + address prefix length), then the IPv6 address. The entry of
 * prefix length 16 is the default: addresses outside every listed prefix. */
struct flowd_kaddr_key {
	__u32 prefixlen;
	__u8 slot;
	__u8 side; /* FLOWD_KSIDE_* */
	__u8 addr[16];
	__u8 pad[2]; /* beyond any prefix; zero */
};

/* LPM key of flowd_kports: port ranges become aligned power-of-two blocks
 * (prefixlen = 16 + block prefix length); the port is in network order so that
 * its prefix bits come first. */
struct flowd_kport_key {
	__u32 prefixlen;
	__u8 slot;
	__u8 side;
	__be16 port;
};

/* Key of flowd_kuids: rules listing this uid in `users`. */
struct flowd_kuid_key {
	__u32 slot;
	__u32 uid;
};

/* Per slot: the masks of the fields with few values, and the stop bits. */
struct flowd_kpolicy {
	struct flowd_kbits tcp;      /* rules accepting TCP (protocol tcp or any) */
	struct flowd_kbits udp;
	struct flowd_kbits outbound; /* direction outbound or any */
	struct flowd_kbits inbound;
	struct flowd_kbits any_uid;  /* rules without `users` */
	struct flowd_kbits stop;     /* rules needing userspace facts */
	/* The mark (zero entropy) of the policy's `match_all` rule, experiment 0 when
	 * it has none: the TC program labels with it every IPv6 packet that no flow
	 * entry and no decision covers (ICMPv6, unconnected UDP, flows not decided yet),
	 * except a flow's first packet that the kernel left to userspace. */
	struct flowd_flow_mark match_all;
};

/* The one entry of flowd_kstate. */
struct flowd_kstate {
	__u32 enabled;    /* 0 until userspace has written a policy */
	__u32 active;     /* slot the programs read */
	__u32 generation; /* bumped on every policy switch (UDP sockets re-decide) */
	/* 1: the active slot has a match-all mark (flowd_kpolicy.match_all). Lets a
	 * packet without a mark skip the policy lookup when there is none. */
	__u32 match_all;
};

/* What the decision sees of a socket. Addresses in network order (IPv6 only:
 * IPv4 has no flow label), ports in host order. */
struct flowd_ksock {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 direction; /* FLOWD_KDIR_* */
	__u8 uid_known; /* 0: rules with `users` leave the decision to userspace */
	__u8 pad;
	__u32 uid;
};

enum flowd_kverdict {
	/* No compiled rule matches (rules beyond FLOWD_KRULES_MAX may: userspace). */
	FLOWD_KV_NONE = 0,
	/* Rule `rule` wins: mark written. */
	FLOWD_KV_MATCH = 1,
	/* A rule needing userspace facts (or an unknown uid) could win. */
	FLOWD_KV_USERSPACE = 2,
	/* No policy loaded (or decisions disabled). */
	FLOWD_KV_OFF = 3,
};

/* In/out record of the test program flowd_kdecide_test (tests only): the
 * verdict on `sock`, and the entropy bits (label positions) of `key`. */
struct flowd_ktest {
	struct flowd_ksock sock;
	__u32 verdict; /* enum flowd_kverdict */
	__u32 rule;
	struct flowd_flow_mark mark;
	struct flowd_flow_key key;
	__u32 entropy;
	__u32 pad;
};

/* Per UDP socket (sk_storage): the policy generation it was last decided under,
 * so a connected socket whose flow matches no rule is evaluated once, not per
 * datagram. */
struct flowd_kseen {
	__u32 generation;
};

/* ---- Per-socket lookup cache (marker.bpf.c; src/marker/maps.rs) ----
 *
 * The 5-tuple lookup in flowd_marks (a 40-byte jhash and compare) is most of a
 * marked packet's cost. A local socket sends one flow, so the TC program keeps the
 * result of its last lookup in the socket's local storage and, for the next
 * packets, only checks that the packet still has that 5-tuple. Userspace bumps
 * flowd_cache_gen after changing flowd_marks: every entry of an older generation
 * is looked up again (a reload, a deleted mark, a mark added to a flow seen
 * unmarked). Only frames with TCP or UDP right behind an untagged IPv6 header use
 * it; anything else takes the full parse.
 */
struct flowd_sk_cache {
	__u32 generation; /* flowd_cache_gen + 1 when written; 0: never */
	__u8 marked;      /* 0: the flow had no mark (a negative entry) */
	__u8 pad[3];
	struct flowd_flow_key key;
	/* The flow's mark; its packets/bytes are those counted through this entry
	 * (flowd_marks holds the others): userspace adds both, read through the
	 * flowd_cache_counts iterator. */
	struct flowd_flow_mark mark;
};

/* ---- Flow index (bpf/flow_index.bpf.h; src/marker/flow_index.rs) ----
 *
 * The marks of flowd_marks again, in a table the TC program reads without a
 * hash-map call: an array of buckets of FLOWD_INDEX_WAYS slots, the bucket chosen
 * by a seeded multiply-xor hash of the 5-tuple (flowd_index_bucket_of in
 * flow_index.bpf.h, index::bucket in Rust). Array lookups are inlined by the JIT,
 * so a packet pays the hash and a few compares instead of a 40-byte jhash, a bucket
 * walk and a memcmp. flowd_marks stays the source of truth; only userspace writes
 * the index (through mmap), one writer, with a sequence count per slot.
 *
 * A flow with no free slot in its bucket, and every mark the kernel decided, stays
 * in flowd_marks only. Its bucket's `unindexed` counts such marks (plus writes in
 * progress): while it is not zero, a packet of that bucket the index does not know
 * is also looked up in flowd_marks. The count may err high (then lookups of that
 * bucket double-check), never low.
 */
enum flowd_index_limits {
	FLOWD_INDEX_WAYS = 4,
	FLOWD_INDEX_SEEDS = 5,
};

struct flowd_index_slot {
	/* Odd while userspace rewrites the slot; readers that see it change retry
	 * in flowd_marks. */
	__u32 seq;
	__u32 counter_slot;
	/* family 0: the slot is free. */
	struct flowd_flow_key key;
	__u32 label;
	__u16 experiment;
	__u8 activity;
	__u8 flags;
	/* Packets and bytes marked through this slot (flowd_marks holds the others):
	 * userspace adds both. */
	__u64 packets;
	__u64 bytes;
};

struct flowd_index_bucket {
	/* Marks of this bucket in flowd_marks that may be missing from the index. */
	__u32 unindexed;
	__u32 pad;
	struct flowd_index_slot way[FLOWD_INDEX_WAYS];
};

struct flowd_index_head {
	/* Drawn by userspace when the maps are new, kept by a daemon that adopts them:
	 * one per 8-byte word of the key, so that buckets cannot be predicted. */
	__u64 seed[FLOWD_INDEX_SEEDS];
};

/* ---- Socket tracker (tracker.bpf.c, src/discovery/tracker*.rs) ---- */

#define FLOWD_COMM_LEN 16

/* Which hook produced a record. */
enum flowd_event_kind {
	/* tp_btf/inet_sock_set_state: any TCP state change. */
	FLOWD_EV_TCP_STATE = 1,
	/* sockops BPF_SOCK_OPS_TCP_CONNECT_CB: active open, source port bound,
	 * SYN not sent yet. */
	FLOWD_EV_TCP_CONNECT = 2,
	/* sockops BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB. */
	FLOWD_EV_TCP_ACTIVE_ESTABLISHED = 3,
	/* sockops BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB (accepted connection). */
	FLOWD_EV_TCP_PASSIVE_ESTABLISHED = 4,
	/* tp_btf/sys_exit of a successful connect() on a UDP socket: newstate is
	 * ESTABLISHED (connected) or CLOSE (connect(AF_UNSPEC), i.e. disconnect). */
	FLOWD_EV_UDP_CONNECT = 5,
	/* cgroup/sock_release of a UDP socket whose connect was seen: newstate CLOSE,
	 * tuple/netns/inode/uid as recorded at connect. */
	FLOWD_EV_UDP_RELEASE = 6,
	/* sockops BPF_SOCK_OPS_STATE_CB: a TCP state change that the tracepoint
	 * program is about to miss (it is already running on this CPU, under the
	 * softirq that made this change, and the kernel skips nested runs). Fields as
	 * FLOWD_EV_TCP_STATE, owner never valid. */
	FLOWD_EV_TCP_STATE_CB = 7,
	/* tp_btf/sys_exit of a successful accept()/accept4() on a TCP socket: the
	 * accepted connection, now with its struct socket (inode) and the task that
	 * took it (owner valid). newstate is its state then. */
	FLOWD_EV_TCP_ACCEPT = 8,
};

enum flowd_event_flag {
	/* pid, tid, comm and cgroup_id are those of the socket's owner: the hook ran
	 * in the context of a user task (a syscall), not in softirq/hardirq or a
	 * kernel thread. */
	FLOWD_F_OWNER_VALID = 0x1,
	/* netns, inode and uid were read from the socket itself (set by every hook;
	 * kept as a flag so a hook that cannot read them can say so). */
	FLOWD_F_SOCK_INFO = 0x2,
	/* bytes_acked/bytes_received hold the socket's tcp_info counters (TCP state
	 * changes to CLOSE: the last word on a flow's volume, which no later dump can
	 * give). */
	FLOWD_F_TCP_BYTES = 0x4,
	/* cgroup_id is the socket's own cgroup (0: the default root), as sock_diag
	 * reports it: set where no task owns the event (an accepted connection's
	 * passive-established callback runs in softirq). */
	FLOWD_F_SOCK_CGROUP = 0x8,
};

/* TCP states (include/net/tcp_states.h); UDP reuses ESTABLISHED and CLOSE. */
#define FLOWD_TCP_ESTABLISHED 1
#define FLOWD_TCP_SYN_SENT 2
#define FLOWD_TCP_SYN_RECV 3
#define FLOWD_TCP_CLOSE 7
#define FLOWD_TCP_LISTEN 10

/*
 * One ring-buffer record. 128 bytes, no implicit padding (every field is naturally
 * aligned; `pad0` is explicit so both sides see the same bytes).
 */
struct flowd_sock_event {
	__u64 ts_ns;     /* bpf_ktime_get_ns() */
	__u64 cookie;    /* socket cookie == SO_COOKIE == sock_diag id.cookie; 0 unknown */
	__u64 netns;     /* inode of the socket's network namespace */
	__u64 inode;     /* socket inode; 0 when not reachable (request/child sock) */
	__u64 cgroup_id; /* cgroup v2 id of the current task */
	__u32 pid;       /* tgid of the current task */
	__u32 tid;       /* pid (thread id) of the current task */
	__u32 uid;       /* sk->sk_uid: the socket's owner, right in any context */
	__u16 family;    /* AF_INET or AF_INET6 */
	__u8 protocol;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 kind;       /* enum flowd_event_kind */
	__u8 saddr[16];  /* local address, network order; IPv4 in the first 4 bytes */
	__u8 daddr[16];  /* remote address, same encoding */
	__u16 sport;     /* local port, host order */
	__u16 dport;     /* remote port, host order */
	__u8 oldstate;   /* TCP state before (0 when the hook does not say) */
	__u8 newstate;   /* TCP state after */
	__u8 flags;      /* FLOWD_F_* */
	__u8 pad0;
	char comm[FLOWD_COMM_LEN]; /* current task's comm */
	__u64 bytes_acked;    /* tcp_sock.bytes_acked when FLOWD_F_TCP_BYTES */
	__u64 bytes_received; /* tcp_sock.bytes_received when FLOWD_F_TCP_BYTES */
};

/* Value of the tracker's flowd_owners map: who called connect() on a socket, for
 * the sockops program, which may not ask the task itself on older kernels. */
struct flowd_owner {
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	char comm[FLOWD_COMM_LEN];
};

/* The Rust side reads records by hand (tests/layout.rs pins the same numbers). */
_Static_assert(sizeof(struct flowd_sock_event) == 128, "flowd_sock_event size");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, pid) == 40, "pid offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, saddr) == 56, "saddr offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, sport) == 88, "sport offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, comm) == 96, "comm offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, bytes_acked) == 112, "bytes offset");

/*
 * One socket as the socket iterators report it (bpf/sockiter.bpf.c): what a
 * sock_diag dump tells the reconcile (struct inet_diag_msg, the INET_DIAG_INFO
 * fields the daemon reads, INET_DIAG_CGROUP_ID), with the values sock_diag would
 * give, so both sources make the same observation of the same socket.
 */
enum flowd_sock_record_flag {
	/* A full socket: inode, uid, cgroup_id and (TCP) the tcp_info fields were read.
	 * TIME_WAIT and request sockets have none (sock_diag reports 0 and no
	 * attributes). */
	FLOWD_SR_FULL = 0x1,
	/* The socket has no cookie yet and this kernel (< 5.12) cannot give it one from
	 * an iterator: the walk cannot name it as sock_diag would. */
	FLOWD_SR_NO_COOKIE = 0x2,
	/* The socket's cgroup is the root of the default hierarchy, which Linux 5.10
	 * does not store as a pointer (net_cls/net_prio data, or no cgroup at all):
	 * cgroup_id is 0, the reader fills in the root's id. */
	FLOWD_SR_CGROUP_ROOT = 0x4,
};

/* 112 bytes, no implicit padding; one per socket, written with bpf_seq_write. */
struct flowd_sock_record {
	__u64 cookie;         /* bpf_get_socket_cookie(), or skc_cookie (see flags) */
	__u64 inode;          /* socket inode, 0 if not full */
	__u64 cgroup_id;      /* cgroup v2 id of the socket (sk_cgrp_data) */
	__u64 bytes_acked;    /* tcp_info fields, TCP full sockets only */
	__u64 bytes_received;
	__u8 saddr[16];       /* local address, network order; IPv4 in the first 4 bytes */
	__u8 daddr[16];       /* remote address, same encoding */
	__u32 uid;            /* sock_i_uid() as the reader's user namespace sees it */
	__u32 rtt_us;         /* srtt_us >> 3, as tcp_get_info() */
	__u32 rttvar_us;      /* mdev_us >> 2 */
	__u32 snd_cwnd;
	__u32 total_retrans;
	__u32 segs_out;
	__u32 segs_in;
	__u16 sport;          /* local port, host order */
	__u16 dport;          /* remote port, host order */
	__u8 family;          /* AF_INET or AF_INET6 */
	__u8 protocol;        /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 state;           /* as inet_diag_msg.idiag_state (see sockiter.bpf.c) */
	__u8 flags;           /* FLOWD_SR_* */
	__u8 pad[4];
};

_Static_assert(sizeof(struct flowd_sock_record) == 112, "flowd_sock_record size");

/*
 * The verify walk (sockiter.bpf.c, src/discovery/walk_digest.rs): instead of a
 * record per socket, the iterators fold each connection into one 64-bit digest
 * and add it to one of FLOWD_DIGEST_PARTS partitions (count and sum). The daemon
 * folds its flow table the same way: equal partitions mean the table already
 * holds what the kernel has. Which sockets count: full TCP sockets in the states
 * of FLOWD_DIGEST_TCP_STATES (a bit per state) and connected UDP sockets. In the
 * states of FLOWD_DIGEST_BOUND_STATES, whether the socket has a struct socket
 * (an inode) is folded too: an accepted connection gets one at accept(), and
 * the daemon wants its inode then (the process that holds it).
 */
enum flowd_digest_limits {
	/* Partitions: a partition a tracker event touched during the walk is
	 * excused, so many small ones keep a miss from hiding behind churn. */
	FLOWD_DIGEST_PART_BITS = 12,
	FLOWD_DIGEST_PARTS = 1 << FLOWD_DIGEST_PART_BITS,
	/* ESTABLISHED, SYN_SENT, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING */
	FLOWD_DIGEST_TCP_STATES = 0xb36,
	FLOWD_DIGEST_UDP_STATES = 0x2,
	/* ESTABLISHED, SYN_SENT, CLOSE_WAIT: states a socket cannot be in once its
	 * owner closed it (so no orphan counts as a difference) */
	FLOWD_DIGEST_BOUND_STATES = 0x106,
};

struct flowd_digest_part {
	__u64 count;
	__u64 sum;
};

/* Not used by the programs: each object defines one global of this type so that
 * libbpf-cargo emits every enum above into its skeleton's `types`. */
struct flowd_contract {
	enum flowd_family family;
	enum flowd_strategy_bit strategy;
	enum flowd_outcome outcome;
	enum flowd_mark_flag mark_flag;
	enum flowd_tag_limits tag_limits;
	enum flowd_krule_limits krule_limits;
	enum flowd_event_kind event_kind;
	enum flowd_event_flag event_flag;
	enum flowd_index_limits index_limits;
	enum flowd_digest_limits digest_limits;
};

#endif /* FLOWD_H */
