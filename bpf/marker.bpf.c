// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TC egress marker: stamps the SciTags tag of known flows into outgoing IPv6
 * packets (flow label and/or an 8-byte option header). It never drops a packet:
 * anything it cannot or should not mark passes unchanged and is counted.
 *
 * Layouts: the flow label as in src/model/tag.rs, the option header as in flowd.h.
 * Lookup: the flow index (flow_index.bpf.h), then flowd_marks when it cannot answer.
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


#include "flow_index.bpf.h"
#include "kdecide.bpf.h"

static __always_inline void count(__u32 outcome)
{
	__u64 *c = bpf_map_lookup_elem(&flowd_outcomes, &outcome);

	if (c)
		*c += 1;
}


#include "parse.bpf.h"
#include "options.bpf.h"
#include "sk_cache.bpf.h"

/* Whether `copy`, read through a flowd_marks lookup of `key`, is still the mark
 * of `key`. A hash map reuses a deleted element at once: between the lookup and
 * the copy, the flow may have been removed and another flow's mark written into
 * the same memory (tests/marker_flow_index.rs measured 1-2 such packets in tens
 * of millions under constant rewrites). Looking the key up again after the copy
 * finds it gone, or a mark that differs, unless the copy was right. Only with the
 * flow index, which leaves this path to the few marks it lacks; alone, the hash
 * map keeps its one lookup. Compared by content (the fields a packet carries):
 * comparing pointers needs CAP_PERFMON. */
static __always_inline bool hash_mark_still_current(const struct flowd_flow_key *key,
						   const struct flowd_flow_mark *copy)
{
	const __u64 *now = bpf_map_lookup_elem(&flowd_marks, key);
	const __u64 *was = (const __u64 *)copy;

	return now && now[0] == was[0] && (__u32)now[1] == (__u32)was[1];
}

SEC("tc")
int flowd_mark(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	/* The socket whose cache this packet may use: set only for a frame of the
	 * shape the cache serves. */
	struct bpf_sock *csk = NULL;
	__u32 generation = 0;

	/* Fast path: a packet of a local socket whose flow is cached. Only frames
	 * with TCP or UDP right behind an untagged IPv6 header use the cache, so
	 * their shape is checked first: other frames (VLAN, extension headers) skip
	 * the socket helpers (~4 ns, benches/marker.rs). skb->sk goes to the storage
	 * helper as it is: the helper answers NULL for a TIME_WAIT or request socket
	 * (no storage), and every verifier we support (5.10 on, checked in the 5.10
	 * and 6.1 guests) takes a sock_common there, so no bpf_sk_fullsock call
	 * (~8 ns a packet) is needed first. */
	if (flowd_sk_cache_on && sk) {
		void *data = (void *)(long)skb->data;
		void *end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		__u32 *ports = (void *)(ip6 + 1);

		if ((void *)(ports + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IPV6) &&
		    (ip6->nexthdr == NEXTHDR_TCP || ip6->nexthdr == NEXTHDR_UDP))
			csk = sk;
		if (csk) {
			struct flowd_sk_cache *c = bpf_sk_storage_get(&flowd_sk_cache_map, csk, 0, 0);

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
	case PARSE_NOT_TCP_UDP: {
		/* ICMPv6, fragments, other next headers: no rule but a match-all one
		 * can cover them (rules describe TCP/UDP sockets). No flow, no entropy. */
		struct flowd_flow_mark all;

		if (flowd_in_kernel && match_all_mark(&all))
			return mark_packet(skb, &p, &all);
		count(FLOWD_OUT_NOT_TCP_UDP);
		return TC_ACT_OK;
	}
	default:
		count(FLOWD_OUT_MALFORMED);
		return TC_ACT_OK;
	}

	/* The index first (inlined array reads); flowd_marks only when the index
	 * cannot answer alone. */
	struct flowd_flow_mark found;
	struct flowd_flow_mark *m = NULL;
	enum index_result ir = flowd_index_on ? index_find(&key, &found, skb->len) : INDEX_UNSURE;

	if (ir == INDEX_HIT)
		m = &found;
	else if (ir == INDEX_UNSURE)
		m = bpf_map_lookup_elem(&flowd_marks, &key);
	bool undecided = false;

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
		case MISS_USERSPACE:
			undecided = true;
			break;
		}
	}
	/* No entry and no decision: a match-all rule's tag, with the flow's entropy
	 * (the same bits userspace gives the flow when it writes its entry). Not
	 * for a first packet a rule needing userspace facts may claim. */
	struct flowd_flow_mark all;
	bool fallback = !m && flowd_in_kernel && !undecided && match_all_mark(&all);

	if (fallback)
		all.label = (all.label & ~FLOWD_ENTROPY_MASK) | flow_entropy(&key);
	/* generation is non-zero only for frames the fast path can read. */
	if (generation && p.vlan_tags == 0 && p.l4 == ETH_HLEN + sizeof(struct ipv6hdr))
		cache_store(csk, &key, fallback ? &all : m, generation);
	if (fallback)
		return mark_packet(skb, &p, &all);
	if (!m) {
		count(FLOWD_OUT_UNMARKED);
		return TC_ACT_OK;
	}

	/* Plain adds, not atomics: a flow's packets leave one at a time under its
	 * socket's lock, so concurrent updates of one entry are rare, and a lost count
	 * only blurs a display figure (per-tag totals, per CPU, stay exact). Atomics
	 * cost ~10 ns a packet here (benches/marker.rs). */
	if (ir != INDEX_HIT) {
		m->packets += 1;
		m->bytes += skb->len;
	}
	/* Copy: the entry may be deleted (and its memory reused) while we work. */
	struct flowd_flow_mark mark = *m;

	if (ir != INDEX_HIT && flowd_index_on && !hash_mark_still_current(&key, &mark)) {
		count(FLOWD_OUT_UNMARKED);
		return TC_ACT_OK;
	}
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
