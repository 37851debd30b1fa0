// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TC egress marker: stamps the SciTags tag of known flows into outgoing IPv6
 * packets (flow label and/or an 8-byte option header). It never drops a packet:
 * anything it cannot or should not mark passes unchanged and is counted.
 *
 * Layouts: the flow label as in src/model/tag.rs, the option header as in flowd.h.
 * Shared types: flowd.h.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "flowd.h"

#define TC_ACT_OK 0
#define ETH_HLEN 14
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define NEXTHDR_HOP 0
#define NEXTHDR_TCP 6
#define NEXTHDR_UDP 17
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
/* Extension headers walked before giving up: enough for HBH + DST + routing
 * + DST, and a constant bound keeps the verifier's work small. */
#define MAX_EXT_HDRS 4
/* Enough linear bytes for Ethernet, two VLAN tags, IPv6, four 8-byte-ish
 * extension headers and the ports: what we pull when headers are not linear. */
#define PULL_LEN 128

/* Strategy bits (FLOWD_STRATEGY_*), set by userspace before load. */
const volatile __u32 flowd_strategy = FLOWD_STRATEGY_LABEL;
/* Config marker.in_kernel_decisions: when false the verifier drops the whole
 * miss-path decision as dead code. */
const volatile __u32 flowd_in_kernel = 0;
/* Inode of the daemon's network namespace: the sockops program sees connects of
 * every namespace (cgroup hooks are not per namespace) and decides only ours. */
const volatile __u32 flowd_netns_ino = 0;
/* Config marker.socket_cache: remember each socket's lookup (flowd_sk_cache_map). */
const volatile __u32 flowd_sk_cache_on = 0;
/* Key of the entropy hash (flow_entropy): from the boot id (src/marker/mod.rs). */
const volatile __u32 flowd_entropy_seed = 0;
/* Whether the bpf_check_mtu helper exists (Linux 5.12; probed by userspace).
 * Without it, option headers are only added to a packet that still fits
 * flowd_fallback_mtu, the smallest MTU of the marked interfaces read at start. */
const volatile __u32 flowd_have_check_mtu = 1;
const volatile __u32 flowd_fallback_mtu = 1500;
/* Set by userspace once the sockops program is attached: accepted connections are
 * then written into flowd_marks when their handshake completes, and a SYN-ACK is
 * only labelled. Before that (or without cgroup2) the SYN-ACK writes the entry. */
__u32 flowd_passive_at_established = 0;

/* Not used by the programs: makes libbpf-cargo emit the enums of flowd.h. */
struct flowd_contract flowd_contract_types = {};

/* Flows to mark, written only by userspace (the daemon's marker module).
 * max_entries is resized by userspace before load (config marker.map_capacity). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flowd_flow_key);
	__type(value, struct flowd_flow_mark);
} flowd_marks SEC(".maps");

/* Per-outcome packet counts (enum flowd_outcome). A per-CPU array: no atomics on
 * the hot path, and the lookup is inlined by the JIT on recent kernels. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOWD_OUT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} flowd_outcomes SEC(".maps");

/* Per-tag counters, indexed by flowd_flow_mark.counter_slot. Slots rather than
 * the scitag itself (15 bits) keep this small on hosts with many CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOWD_TAG_SLOTS);
	__type(key, __u32);
	__type(value, struct flowd_tag_counter);
} flowd_tag_counters SEC(".maps");

/* ---- In-kernel decisions: the compiled policy (flowd.h, "In-kernel policy
 * decisions"). Written only by userspace (src/marker/compiled.rs). ---- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flowd_kstate);
} flowd_kstate_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOWD_KSLOTS);
	__type(key, __u32);
	__type(value, struct flowd_kpolicy);
} flowd_kpolicy_map SEC(".maps");

/* Rule i of slot s at s * FLOWD_KRULES_MAX + i: its mark with zero entropy. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOWD_KSLOTS * FLOWD_KRULES_MAX);
	__type(key, __u32);
	__type(value, struct flowd_flow_mark);
} flowd_krules SEC(".maps");

/* LPM tries are never preallocated: max_entries only bounds them. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct flowd_kaddr_key);
	__type(value, struct flowd_kbits);
} flowd_kaddrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct flowd_kport_key);
	__type(value, struct flowd_kbits);
} flowd_kports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flowd_kuid_key);
	__type(value, struct flowd_kbits);
} flowd_kuids SEC(".maps");

/* Connected UDP sockets already evaluated under the current generation. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct flowd_kseen);
} flowd_kseen_map SEC(".maps");

/* Per local socket: its last lookup in flowd_marks (flowd.h, "Per-socket lookup
 * cache"). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct flowd_sk_cache);
} flowd_sk_cache_map SEC(".maps");

/* The generation of flowd_marks: userspace increments it (through mmap, no
 * syscall) after every change it makes to flowd_marks. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} flowd_cache_gen SEC(".maps");

/* Marks the in-kernel decision wrote (per CPU): userspace walks flowd_marks for
 * unclaimed kernel marks only when this moved. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} flowd_kinserts SEC(".maps");

/* Test input/output of flowd_kdecide_test. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flowd_ktest);
} flowd_ktest_map SEC(".maps");

static __always_inline void kand(struct flowd_kbits *acc, const struct flowd_kbits *b)
{
	acc->w[0] &= b->w[0];
	acc->w[1] &= b->w[1];
}

/* Index of the single set bit of x (x a power of two); no ctz instruction in BPF. */
static __always_inline __u32 bit_index(__u64 x)
{
	__u32 n = 0;

	if (x >> 32) { n += 32; x >>= 32; }
	if (x >> 16) { n += 16; x >>= 16; }
	if (x >> 8) { n += 8; x >>= 8; }
	if (x >> 4) { n += 4; x >>= 4; }
	if (x >> 2) { n += 2; x >>= 2; }
	if (x >> 1) n += 1;
	return n;
}

static __always_inline const struct flowd_kbits *
lookup_addr(__u32 slot, __u8 side, const __u8 *addr)
{
	struct flowd_kaddr_key k = { .prefixlen = 16 + 128, .slot = slot, .side = side };

	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&flowd_kaddrs, &k);
}

static __always_inline const struct flowd_kbits *lookup_port(__u32 slot, __u8 side, __u16 port)
{
	struct flowd_kport_key k = {
		.prefixlen = 16 + 16, .slot = slot, .side = side, .port = bpf_htons(port)
	};

	return bpf_map_lookup_elem(&flowd_kports, &k);
}

/*
 * The compiled policy applied to one socket (the kernel half of Policy::evaluate;
 * tests/marker_kernel_agreement.rs checks that both agree). On FLOWD_KV_MATCH, *out is
 * the winning rule's mark with zero entropy and *rule its precedence index.
 * Only the miss paths call this; the per-packet hit path never does.
 */
static __always_inline int kdecide(const struct flowd_ksock *s, struct flowd_flow_mark *out,
				   __u32 *rule)
{
	__u32 zero = 0;
	struct flowd_kstate *st = bpf_map_lookup_elem(&flowd_kstate_map, &zero);
	const struct flowd_kbits *b;
	struct flowd_kbits m, stop;

	if (!st || !st->enabled)
		return FLOWD_KV_OFF;
	__u32 slot = st->active & 1;
	struct flowd_kpolicy *pol = bpf_map_lookup_elem(&flowd_kpolicy_map, &slot);

	if (!pol)
		return FLOWD_KV_OFF;
	m = s->proto == IPPROTO_TCP ? pol->tcp : pol->udp;
	kand(&m, s->direction == FLOWD_KDIR_OUTBOUND ? &pol->outbound : &pol->inbound);
	stop = pol->stop;
	if (s->uid_known) {
		struct flowd_kuid_key uk = { .slot = slot, .uid = s->uid };
		struct flowd_kbits u = pol->any_uid;

		b = bpf_map_lookup_elem(&flowd_kuids, &uk);
		if (b) {
			u.w[0] |= b->w[0];
			u.w[1] |= b->w[1];
		}
		kand(&m, &u);
	} else {
		/* Rules with `users` cannot be checked here but could match in
		 * userspace, which may know the uid: treat them as stop rules. */
		stop.w[0] |= ~pol->any_uid.w[0];
		stop.w[1] |= ~pol->any_uid.w[1];
	}
	/* Every trie holds a default entry per slot and side, so a miss means no
	 * policy in this slot: leave it to userspace. */
	b = lookup_port(slot, FLOWD_KSIDE_LOCAL, s->lport);
	if (!b)
		return FLOWD_KV_USERSPACE;
	kand(&m, b);
	b = lookup_port(slot, FLOWD_KSIDE_REMOTE, s->rport);
	if (!b)
		return FLOWD_KV_USERSPACE;
	kand(&m, b);
	b = lookup_addr(slot, FLOWD_KSIDE_LOCAL, s->laddr);
	if (!b)
		return FLOWD_KV_USERSPACE;
	kand(&m, b);
	b = lookup_addr(slot, FLOWD_KSIDE_REMOTE, s->raddr);
	if (!b)
		return FLOWD_KV_USERSPACE;
	kand(&m, b);

	__u32 word;
	__u64 low;

	if (m.w[0]) {
		word = 0;
		low = m.w[0] & -m.w[0];
	} else if (m.w[1]) {
		word = 1;
		low = m.w[1] & -m.w[1];
	} else {
		return FLOWD_KV_NONE;
	}
	if (stop.w[word] & low)
		return FLOWD_KV_USERSPACE;
	__u32 idx = word * 64 + bit_index(low);
	__u32 at = slot * FLOWD_KRULES_MAX + (idx & (FLOWD_KRULES_MAX - 1));
	struct flowd_flow_mark *r = bpf_map_lookup_elem(&flowd_krules, &at);

	if (!r)
		return FLOWD_KV_USERSPACE;
	*out = *r;
	*rule = idx;
	return FLOWD_KV_MATCH;
}

/* The 5 entropy bits of a label: 19..18, 8, 1..0. */
#define FLOWD_ENTROPY_MASK 0xC0103

/* A flow's entropy bits, in their label positions: a hash of its 5-tuple under a
 * key fixed for the boot. Random across flows, and the same wherever the flow is
 * decided (its SYN-ACK, its established socket, userspace: src/marker/label.rs
 * flow_entropy computes the same), so its label never changes whoever writes
 * first. */
static __always_inline __u32 flow_entropy(const struct flowd_flow_key *key)
{
	const __u32 *w = (const __u32 *)key;
	__u32 h = flowd_entropy_seed;

#pragma unroll
	for (int i = 0; i < sizeof(*key) / 4; i++) {
		h = (h ^ w[i]) * 0x9E3779B1;
		h ^= h >> 15;
	}
	return h & FLOWD_ENTROPY_MASK;
}

/* Decides `s`; on a match, *mark is the flow's full mark (entropy included). */
static __always_inline bool kdecide_mark(const struct flowd_ksock *s,
					 const struct flowd_flow_key *key,
					 struct flowd_flow_mark *mark)
{
	__u32 rule;

	if (kdecide(s, mark, &rule) != FLOWD_KV_MATCH)
		return false;
	mark->label = (mark->label & ~FLOWD_ENTROPY_MASK) | flow_entropy(key);
	mark->flags |= FLOWD_MARK_F_KERNEL;
	return true;
}

/* Decides `s` and, on a match, writes the flow's mark (never replacing one that
 * userspace or another CPU wrote first). Returns whether the flow now has one. */
static __always_inline bool kdecide_and_insert(const struct flowd_ksock *s,
					       const struct flowd_flow_key *key)
{
	struct flowd_flow_mark mark;

	if (!kdecide_mark(s, key, &mark))
		return false;
	/* NOEXIST: if userspace (or a racing CPU) got there first, its entry stands. */
	if (bpf_map_update_elem(&flowd_marks, key, &mark, BPF_NOEXIST) == 0) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&flowd_kinserts, &zero);

		if (n)
			*n += 1;
	}
	return true;
}

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define FLOWD_TCP_ESTABLISHED_STATE 1

/* Cheap pre-filter of the miss path: UDP, or TCP with SYN set. */
static __always_inline bool may_decide(struct __sk_buff *skb, const struct flowd_flow_key *key,
				       __u32 l4)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *flags = data + (l4 & 0x3ff) + 13;

	if (key->proto != IPPROTO_TCP)
		return true;
	return (void *)(flags + 1) <= end && (*flags & TCP_FLAG_SYN);
}

/*
 * TC miss path: a packet of a flow with no mark. Decided here:
 *  - a TCP SYN-ACK (passive open: the request socket's listener gives the uid),
 *  - a TCP SYN (active open; normally sockops has decided already, this covers
 *    hosts where the sockops program could not be attached),
 *  - a datagram of a connected UDP socket (once per socket and policy generation).
 * Only packets owned by a local socket (skb->sk): forwarded packets and syncookie
 * SYN-ACKs carry none, and are not ours to decide (userspace never marks them).
 */
enum miss_decision {
	MISS_NONE,
	/* The flow's mark is now in flowd_marks. */
	MISS_IN_MAP,
	/* A SYN-ACK to label with *out only: its connection is written into the map
	 * when the handshake completes (flowd_ksockops), so half-open connections (a
	 * SYN flood) never take a map entry. */
	MISS_LABEL_ONLY,
};

static __noinline int decide_on_miss(struct __sk_buff *skb, const struct flowd_flow_key *key,
				     __u32 l4, struct flowd_flow_mark *out)
{
	struct bpf_sock *sk = skb->sk;
	struct flowd_ksock s = {};
	bool label_only = false;

	if (!sk)
		return MISS_NONE;
	if (key->proto == IPPROTO_TCP) {
		void *data = (void *)(long)skb->data;
		void *end = (void *)(long)skb->data_end;
		__u8 *flags = data + (l4 & 0x3ff) + 13;

		if ((void *)(flags + 1) > end || !(*flags & TCP_FLAG_SYN))
			return MISS_NONE;
		if (*flags & TCP_FLAG_ACK) {
			struct tcp_request_sock *req = bpf_skc_to_tcp_request_sock(sk);
			struct tcp_sock *tp;

			s.direction = FLOWD_KDIR_INBOUND;
			if (req) {
				label_only = *(volatile __u32 *)&flowd_passive_at_established;
				struct sock *listener = BPF_CORE_READ(req, req.req.__req_common.skc_listener);

				if (listener) {
					s.uid = BPF_CORE_READ(listener, sk_uid.val);
					s.uid_known = 1;
				}
			} else if ((tp = bpf_skc_to_tcp_sock(sk))) {
				/* TCP Fast Open: the SYN-ACK belongs to the child. */
				s.uid = BPF_CORE_READ((struct sock *)tp, sk_uid.val);
				s.uid_known = 1;
			}
		} else {
			struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

			s.direction = FLOWD_KDIR_OUTBOUND;
			if (tp) {
				s.uid = BPF_CORE_READ((struct sock *)tp, sk_uid.val);
				s.uid_known = 1;
			}
		}
	} else {
		struct bpf_sock *fsk = bpf_sk_fullsock(sk);
		struct udp6_sock *u6;
		struct flowd_kseen *seen;
		__u32 zero = 0;
		struct flowd_kstate *st;

		/* Unconnected sockets send to many peers and userspace tracks none of
		 * them: only connected ones are flows. */
		if (!fsk || fsk->state != FLOWD_TCP_ESTABLISHED_STATE)
			return MISS_NONE;
		u6 = bpf_skc_to_udp6_sock(sk);
		if (!u6)
			return MISS_NONE;
		st = bpf_map_lookup_elem(&flowd_kstate_map, &zero);
		if (!st || !st->enabled)
			return MISS_NONE;
		seen = bpf_sk_storage_get(&flowd_kseen_map, fsk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!seen || seen->generation == st->generation + 1)
			return MISS_NONE;
		/* Stored as generation + 1 so that a fresh (zeroed) entry never
		 * looks decided. */
		seen->generation = st->generation + 1;
		s.direction = FLOWD_KDIR_OUTBOUND;
		s.uid = BPF_CORE_READ((struct sock *)u6, sk_uid.val);
		s.uid_known = 1;
	}
	s.proto = key->proto;
	__builtin_memcpy(s.laddr, key->saddr, 16);
	__builtin_memcpy(s.raddr, key->daddr, 16);
	s.lport = bpf_ntohs(key->sport);
	s.rport = bpf_ntohs(key->dport);
	if (label_only)
		return kdecide_mark(&s, key, out) ? MISS_LABEL_ONLY : MISS_NONE;
	return kdecide_and_insert(&s, key) ? MISS_IN_MAP : MISS_NONE;
}

static __always_inline void count(__u32 outcome)
{
	__u64 *c = bpf_map_lookup_elem(&flowd_outcomes, &outcome);

	if (c)
		*c += 1;
}

/* Where the parser found things, as offsets from skb->data (pointers do not
 * survive helpers that may move the packet). */
struct flowd_parsed {
	__u32 l3;	 /* start of the IPv6 header */
	__u32 l4;	 /* start of the TCP/UDP header */
	__u8 vlan_tags;	 /* inline 802.1Q/802.1ad tags before it */
	__u8 first_next; /* the IPv6 header's own next-header field */
};

enum parse_result { PARSE_OK, PARSE_SHORT, PARSE_NOT_IPV6, PARSE_NOT_TCP_UDP };

static __always_inline enum parse_result parse(struct __sk_buff *skb,
					       struct flowd_flow_key *key,
					       struct flowd_parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 off = ETH_HLEN;
	__u16 proto;

	if (data + ETH_HLEN > end)
		return PARSE_SHORT;
	proto = eth->h_proto;
	p->vlan_tags = 0;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		/* TCI (2 bytes) then the encapsulated EtherType. */
		if (data + off + 4 > end)
			return PARSE_SHORT;
		proto = *(__be16 *)(data + off + 2);
		off += 4;
		p->vlan_tags++;
	}
	if (proto != bpf_htons(ETH_P_IPV6))
		return PARSE_NOT_IPV6;

	struct ipv6hdr *ip6 = data + off;

	if ((void *)(ip6 + 1) > end)
		return PARSE_SHORT;
	p->l3 = off;
	p->first_next = ip6->nexthdr;

	__u8 next = ip6->nexthdr;
	__u32 l4 = off + sizeof(*ip6);

#pragma unroll
	for (int i = 0; i < MAX_EXT_HDRS; i++) {
		if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST)
			break;
		__u8 *ext = data + l4;

		if ((void *)(ext + 2) > end)
			return PARSE_SHORT;
		next = ext[0];
		l4 += ((__u32)ext[1] + 1) * 8;
	}
	/* Fragments: only the first carries ports, and flows that fragment TCP/UDP
	 * at the source are not worth the parsing cost; they pass unmarked. */
	if (next != NEXTHDR_TCP && next != NEXTHDR_UDP)
		return PARSE_NOT_TCP_UDP;

	/* l4 is bounded by the loop above; the mask tells the verifier so. */
	__be16 *ports = data + (l4 & 0x3ff);

	if ((void *)(ports + 2) > end)
		return PARSE_SHORT;

	p->l4 = l4 & 0x3ff;
	key->family = FLOWD_AF_INET6;
	key->proto = next;
	key->pad = 0;
	key->sport = ports[0];
	key->dport = ports[1];
	__builtin_memcpy(key->saddr, &ip6->saddr, 16);
	__builtin_memcpy(key->daddr, &ip6->daddr, 16);
	return PARSE_OK;
}

/* The 8-byte option header of the spec: next header, length 0 (8 bytes), one
 * option 0x1E of 3 data bytes carrying experiment << 8 | activity, then Pad1. */
static __always_inline void fill_option_header(__u8 *h, __u8 next, const struct flowd_flow_mark *m)
{
	h[0] = next;
	h[1] = 0;
	h[2] = FLOWD_OPT_TYPE;
	h[3] = 3;
	h[4] = (m->experiment >> 8) & 0xff;
	h[5] = m->experiment & 0xff;
	h[6] = m->activity;
	h[7] = 0;
}

/* Inserts the option header(s) right behind the fixed IPv6 header. Returns the
 * outcome to count. Only called for untagged frames whose skb->protocol is IPv6:
 * bpf_skb_adjust_room(BPF_ADJ_ROOM_NET) finds the network header from it. */
static __always_inline __u32 add_option_headers(struct __sk_buff *skb, const struct flowd_parsed *p,
						 const struct flowd_flow_mark *m)
{
	__u32 want = flowd_strategy & (FLOWD_STRATEGY_HOP_BY_HOP | FLOWD_STRATEGY_DESTINATION);
	__u32 grow = want == (FLOWD_STRATEGY_HOP_BY_HOP | FLOWD_STRATEGY_DESTINATION) ?
			     2 * FLOWD_OPT_HDR_LEN :
			     FLOWD_OPT_HDR_LEN;
	__u32 mtu_len = 0;

	/* A second Hop-by-Hop header is illegal, and stacking ours on someone
	 * else's options is not ours to do. */
	if (p->first_next == NEXTHDR_HOP || p->first_next == NEXTHDR_DEST)
		return FLOWD_OUT_SKIPPED_HEADER;
	if (p->vlan_tags || skb->protocol != bpf_htons(ETH_P_IPV6))
		return FLOWD_OUT_SKIPPED_HEADER;
	/* GSO packets pass this check: adjust_room lowers their gso_size instead. */
	if (flowd_have_check_mtu) {
		if (bpf_check_mtu(skb, 0, &mtu_len, grow, 0))
			return FLOWD_OUT_SKIPPED_MTU;
	} else if (!skb->gso_size && skb->len - ETH_HLEN + grow > flowd_fallback_mtu) {
		return FLOWD_OUT_SKIPPED_MTU;
	}
	if (bpf_skb_adjust_room(skb, grow, BPF_ADJ_ROOM_NET, 0))
		return FLOWD_OUT_SKIPPED_HEADER;

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u8 *h = (void *)(ip6 + 1);

	if ((void *)(h + 2 * FLOWD_OPT_HDR_LEN) > end) {
		/* Grown but not linear: unlikely after adjust_room, which makes the
		 * headers writable. Fill what we can reach after a pull. */
		if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(*ip6) + 2 * FLOWD_OPT_HDR_LEN))
			return FLOWD_OUT_MALFORMED;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		ip6 = data + ETH_HLEN;
		h = (void *)(ip6 + 1);
		if ((void *)(h + 2 * FLOWD_OPT_HDR_LEN) > end)
			return FLOWD_OUT_MALFORMED;
	}
	if (want & FLOWD_STRATEGY_HOP_BY_HOP) {
		ip6->nexthdr = NEXTHDR_HOP;
		if (want & FLOWD_STRATEGY_DESTINATION) {
			fill_option_header(h, NEXTHDR_DEST, m);
			fill_option_header(h + FLOWD_OPT_HDR_LEN, p->first_next, m);
		} else {
			fill_option_header(h, p->first_next, m);
		}
	} else {
		ip6->nexthdr = NEXTHDR_DEST;
		fill_option_header(h, p->first_next, m);
	}
	ip6->payload_len = bpf_htons(bpf_ntohs(ip6->payload_len) + grow);
	return FLOWD_OUT_MARKED;
}

/* Counts a marked packet and rewrites it as the strategy says. */
static __always_inline int mark_packet(struct __sk_buff *skb, const struct flowd_parsed *p,
				       const struct flowd_flow_mark *mark)
{
	__u32 slot = mark->counter_slot;
	struct flowd_tag_counter *tc = bpf_map_lookup_elem(&flowd_tag_counters, &slot);

	if (tc) {
		tc->packets += 1;
		tc->bytes += skb->len;
	}

	if (flowd_strategy & FLOWD_STRATEGY_LABEL) {
		void *data = (void *)(long)skb->data;
		void *end = (void *)(long)skb->data_end;
		/* The label is the low 20 bits of the first 32-bit word (version, traffic
		 * class, label). It is not in the TCP/UDP pseudo-header: no checksum
		 * to fix. p->l3 is at most ETH_HLEN + 8; the mask proves it. */
		__be32 *word = data + (p->l3 & 0x1f);

		if ((void *)(word + 1) > end) {
			count(FLOWD_OUT_MALFORMED);
			return TC_ACT_OK;
		}
		*word = (*word & bpf_htonl(0xFFF00000)) | bpf_htonl(mark->label & 0xFFFFF);
	}

	if (flowd_strategy & (FLOWD_STRATEGY_HOP_BY_HOP | FLOWD_STRATEGY_DESTINATION))
		count(add_option_headers(skb, p, mark));
	else
		count(FLOWD_OUT_MARKED);
	return TC_ACT_OK;
}

/* Whether the flow in `key` is still the one cached: the packet's 5-tuple, read at
 * the fixed offsets of an untagged IPv6 header with no extension header. */
static __always_inline bool cache_matches(const struct flowd_sk_cache *c, const struct ipv6hdr *ip6,
					  __u32 ports)
{
	const __u64 *a = (const __u64 *)&ip6->saddr;
	const __u64 *k = (const __u64 *)c->key.saddr;

	return c->key.proto == ip6->nexthdr && *(const __u32 *)&c->key.sport == ports &&
	       a[0] == k[0] && a[1] == k[1] && a[2] == k[2] && a[3] == k[3];
}

/* The generation an entry written now carries: flowd_cache_gen + 1. Read before the
 * lookup it caches, so a change racing with it leaves the entry stale, not wrong. */
static __always_inline __u32 cache_generation(void)
{
	__u32 zero = 0;
	__u32 *g = bpf_map_lookup_elem(&flowd_cache_gen, &zero);

	return g ? *(volatile __u32 *)g + 1 : 0;
}

/* Remembers the lookup result for `key` in the socket's cache. Only for TCP and
 * connected UDP: an unconnected UDP socket sends to many peers and would only
 * churn its entry. */
static __always_inline void cache_store(struct bpf_sock *sk, const struct flowd_flow_key *key,
					const struct flowd_flow_mark *m, __u32 generation)
{
	struct flowd_sk_cache *c;

	if (key->proto == IPPROTO_UDP && sk->state != FLOWD_TCP_ESTABLISHED_STATE)
		return;
	c = bpf_sk_storage_get(&flowd_sk_cache_map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!c)
		return;
	/* Counts stay with the flow across refreshes: userspace adds them to those
	 * in flowd_marks. A new flow on the socket (a reconnect) starts from zero. */
	__u64 packets = 0, bytes = 0;

	const __u64 *a = (const __u64 *)&c->key, *b = (const __u64 *)key;

	if (a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]) {
		packets = c->mark.packets;
		bytes = c->mark.bytes;
	}
	/* Generation last: a packet of the same socket on another CPU (an ACK from
	 * softirq) either sees the old generation or a complete entry. That holds on
	 * x86 (stores in program order); a weakly ordered CPU could, rarely, label one
	 * packet with the entry's previous mark. */
	c->generation = 0;
	c->key = *key;
	if (m) {
		c->mark = *m;
		c->marked = 1;
	} else {
		__builtin_memset(&c->mark, 0, sizeof(c->mark));
		c->marked = 0;
	}
	c->mark.packets = packets;
	c->mark.bytes = bytes;
	c->generation = generation;
}

SEC("tc")
int flowd_mark(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct bpf_sock *fsk = NULL;
	__u32 generation = 0;

	/* Fast path: a packet of a local socket whose flow is cached. Full sockets
	 * only: a TIME_WAIT or request socket has no storage, and older kernels'
	 * storage helpers accept nothing but a full socket. */
	if (flowd_sk_cache_on && sk)
		fsk = bpf_sk_fullsock(sk);
	if (fsk) {
		void *data = (void *)(long)skb->data;
		void *end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		__u32 *ports = (void *)(ip6 + 1);

		if ((void *)(ports + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IPV6) &&
		    (ip6->nexthdr == NEXTHDR_TCP || ip6->nexthdr == NEXTHDR_UDP)) {
			struct flowd_sk_cache *c = bpf_sk_storage_get(&flowd_sk_cache_map, fsk, 0, 0);

			generation = cache_generation();
			if (c && c->generation == generation && cache_matches(c, ip6, *ports)) {
				if (!c->marked) {
					count(FLOWD_OUT_UNMARKED);
					return TC_ACT_OK;
				}
				c->mark.packets += 1;
				c->mark.bytes += skb->len;

				struct flowd_flow_mark mark = c->mark;
				struct flowd_parsed p = {
					.l3 = ETH_HLEN,
					.l4 = ETH_HLEN + sizeof(*ip6),
					.first_next = ip6->nexthdr,
				};

				return mark_packet(skb, &p, &mark);
			}
		}
	}

	struct flowd_flow_key key;
	struct flowd_parsed p;
	enum parse_result r = parse(skb, &key, &p);

	if (r == PARSE_SHORT && skb->len > skb->data_end - skb->data) {
		/* Headers not all in the linear part (seen with some GSO/frag_list
		 * skbs): make them linear once and try again. */
		if (bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN) == 0)
			r = parse(skb, &key, &p);
	}
	switch (r) {
	case PARSE_OK:
		break;
	case PARSE_NOT_IPV6:
		count(FLOWD_OUT_NOT_IPV6);
		return TC_ACT_OK;
	case PARSE_NOT_TCP_UDP:
		count(FLOWD_OUT_NOT_TCP_UDP);
		return TC_ACT_OK;
	default:
		count(FLOWD_OUT_MALFORMED);
		return TC_ACT_OK;
	}

	struct flowd_flow_mark *m = bpf_map_lookup_elem(&flowd_marks, &key);

	if (!m && flowd_in_kernel && may_decide(skb, &key, p.l4)) {
		/* The miss path: only here may the policy be evaluated. The common
		 * miss (a TCP segment without SYN of an unmarked flow) is filtered
		 * inline, before any call. */
		struct flowd_flow_mark decided;

		switch (decide_on_miss(skb, &key, p.l4, &decided)) {
		case MISS_IN_MAP:
			m = bpf_map_lookup_elem(&flowd_marks, &key);
			break;
		case MISS_LABEL_ONLY:
			/* Counted per tag; the flow's own counts start with its entry. */
			return mark_packet(skb, &p, &decided);
		}
	}
	/* generation is non-zero only for frames the fast path can read. */
	if (generation && p.vlan_tags == 0 && p.l4 == ETH_HLEN + sizeof(struct ipv6hdr))
		cache_store(fsk, &key, m, generation);
	if (!m) {
		count(FLOWD_OUT_UNMARKED);
		return TC_ACT_OK;
	}

	/* Plain adds, not atomics: a flow's packets leave one at a time under its
	 * socket's lock, so concurrent updates of one entry are rare, and a lost count
	 * only blurs a display figure (per-tag totals, per CPU, stay exact). Atomics
	 * cost ~10 ns a packet here (benches/marker.rs). */
	m->packets += 1;
	m->bytes += skb->len;
	/* Copy: the entry may be deleted (and its memory reused) while we work. */
	struct flowd_flow_mark mark = *m;

	return mark_packet(skb, &p, &mark);
}

/*
 * Moves the counts taken through each socket's cache into its flow's entry in
 * flowd_marks, where userspace reads them (src/marker/sk_cache.rs runs it before
 * reading counts for `inspect`). It writes nothing to the iterator's output: the
 * kernel then walks the cache map in one pass (each output buffer that fills
 * restarts the walk from the start of its bucket, quadratic at 100 000 sockets).
 */
SEC("iter/bpf_sk_storage_map")
int flowd_cache_counts(struct bpf_iter__bpf_sk_storage_map *ctx)
{
	struct flowd_sk_cache *c = ctx->value;
	struct flowd_flow_key key;
	struct flowd_flow_mark *m;

	if (!c || !c->marked || !c->mark.packets)
		return 0;
	/* A copy on the stack: older verifiers (Linux 6.1) refuse the iterator's
	 * buffer as a map key. */
	__builtin_memcpy(&key, &c->key, sizeof(key));
	m = bpf_map_lookup_elem(&flowd_marks, &key);
	if (!m)
		return 0;
	__u64 packets = c->mark.packets, bytes = c->mark.bytes;

	/* Subtract what was read rather than zero: packets counted meanwhile stay. */
	__sync_fetch_and_add(&c->mark.packets, -packets);
	__sync_fetch_and_add(&c->mark.bytes, -bytes);
	__sync_fetch_and_add(&m->packets, packets);
	__sync_fetch_and_add(&m->bytes, bytes);
	return 0;
}

/*
 * Decisions at the two moments a TCP connection is born, attached to the cgroup2
 * root by the marker module (it shares flowd_marks with flowd_mark by being in the
 * same object):
 *  - active opens: BPF_SOCK_OPS_TCP_CONNECT_CB runs in connect() with the source
 *    port bound and before the SYN is built, so the mark written here labels the
 *    SYN itself (verified on the wire: tests/marker_first_packet.rs);
 *  - passive opens: BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB runs when the handshake
 *    completes, before the new socket sends anything; its SYN-ACK was labelled by
 *    the TC miss path with the same mark (same rule, same uid: the listener's,
 *    same entropy: flow_entropy).
 */
SEC("sockops")
int flowd_ksockops(struct bpf_sock_ops *skops)
{
	struct flowd_ksock s = {};
	struct flowd_flow_key key = {};
	struct tcp_sock *tp;

	if (skops->family != FLOWD_AF_INET6)
		return 1;
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
		s.direction = FLOWD_KDIR_OUTBOUND;
	else if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		s.direction = FLOWD_KDIR_INBOUND;
	else
		return 1;
	struct bpf_sock *bsk = skops->sk;

	if (!bsk)
		return 1;
	tp = bpf_skc_to_tcp_sock(bsk);
	if (!tp)
		return 1;
	if (BPF_CORE_READ((struct sock *)tp, __sk_common.skc_net.net, ns.inum) != flowd_netns_ino)
		return 1;
	/* 4-byte loads only (the verifier refuses a memcpy of the ctx). */
	__u32 *l = (__u32 *)s.laddr, *r = (__u32 *)s.raddr;

	l[0] = skops->local_ip6[0];
	l[1] = skops->local_ip6[1];
	l[2] = skops->local_ip6[2];
	l[3] = skops->local_ip6[3];
	r[0] = skops->remote_ip6[0];
	r[1] = skops->remote_ip6[1];
	r[2] = skops->remote_ip6[2];
	r[3] = skops->remote_ip6[3];
	/* A v4-mapped peer (::ffff:a.b.c.d) means IPv4 packets: no flow label. */
	if (r[0] == 0 && r[1] == 0 && r[2] == bpf_htonl(0xffff))
		return 1;
	s.lport = skops->local_port;
	s.rport = bpf_ntohl(skops->remote_port);
	s.proto = IPPROTO_TCP;
	s.uid = BPF_CORE_READ((struct sock *)tp, sk_uid.val);
	s.uid_known = 1;

	key.family = FLOWD_AF_INET6;
	key.proto = IPPROTO_TCP;
	key.sport = bpf_htons(s.lport);
	key.dport = bpf_htons(s.rport);
	__builtin_memcpy(key.saddr, s.laddr, 16);
	__builtin_memcpy(key.daddr, s.raddr, 16);
	kdecide_and_insert(&s, &key);
	/* A socket connecting again may have cached its previous attempt. */
	if (s.direction == FLOWD_KDIR_OUTBOUND)
		bpf_sk_storage_delete(&flowd_sk_cache_map, bsk);
	return 1;
}

/* Tests only: runs kdecide on the socket description in flowd_ktest_map[0] and
 * writes the verdict back (through BPF_PROG_TEST_RUN with any frame). */
SEC("tc")
int flowd_kdecide_test(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct flowd_ktest *t = bpf_map_lookup_elem(&flowd_ktest_map, &zero);

	if (!t)
		return TC_ACT_OK;
	t->rule = 0;
	__builtin_memset(&t->mark, 0, sizeof(t->mark));
	t->verdict = kdecide(&t->sock, &t->mark, &t->rule);
	t->entropy = flow_entropy(&t->key);
	return TC_ACT_OK;
}

/* The harness floor for benchmarks: the cost of running any TC program at all. */
SEC("tc")
int flowd_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
