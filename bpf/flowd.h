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
	__u32 pad; /* zero; keeps the counters 8-byte aligned with no hidden padding */
	/* Packets and bytes marked for this flow, for display (see marker.bpf.c on why
	 * they are not atomic). Userspace carries them over when it rewrites the entry
	 * (a new tag after a reload). */
	__u64 packets;
	__u64 bytes;
};

/* Packets and bytes marked for one tag (per CPU). */
struct flowd_tag_counter {
	__u64 packets;
	__u64 bytes;
};

#define FLOWD_TAG_SLOTS 1024

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
};

/* pid, tid, comm and cgroup_id are those of the socket's owner: the hook ran in the
 * context of a user task (a syscall), not in softirq/hardirq or a kernel thread. */
#define FLOWD_F_OWNER_VALID 0x1
/* netns, inode and uid were read from the socket itself (set by every hook; kept
 * as a flag so a hook that cannot read them can say so). */
#define FLOWD_F_SOCK_INFO 0x2

/* TCP states (include/net/tcp_states.h); UDP reuses ESTABLISHED and CLOSE. */
#define FLOWD_TCP_ESTABLISHED 1
#define FLOWD_TCP_SYN_SENT 2
#define FLOWD_TCP_SYN_RECV 3
#define FLOWD_TCP_CLOSE 7
#define FLOWD_TCP_LISTEN 10

/*
 * One ring-buffer record. 112 bytes, no implicit padding (every field is naturally
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
};

/* The Rust side reads records by hand (tests/layout.rs pins the same numbers). */
_Static_assert(sizeof(struct flowd_sock_event) == 112, "flowd_sock_event size");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, pid) == 40, "pid offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, saddr) == 56, "saddr offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, sport) == 88, "sport offset");
_Static_assert(__builtin_offsetof(struct flowd_sock_event, comm) == 96, "comm offset");

#endif /* FLOWD_H */
