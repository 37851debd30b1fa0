// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * In-kernel decisions: the compiled policy's maps, kdecide() over them, the
 * flow entropy, and the TC miss path that decides a flow's first packet.
 *
 * Part of marker.bpf.c's one translation unit, included by it after the
 * definitions it uses (rodata, maps, flowd.h): not a stand-alone header.
 */
#ifndef FLOWD_KDECIDE_BPF_H
#define FLOWD_KDECIDE_BPF_H

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

/* Decides `s` (enum flowd_kverdict); on a match, *mark is the flow's full mark
 * (entropy included). */
static __always_inline int kdecide_mark(const struct flowd_ksock *s,
					const struct flowd_flow_key *key,
					struct flowd_flow_mark *mark)
{
	__u32 rule;
	int v = kdecide(s, mark, &rule);

	if (v != FLOWD_KV_MATCH)
		return v;
	mark->label = (mark->label & ~FLOWD_ENTROPY_MASK) | flow_entropy(key);
	mark->flags |= FLOWD_MARK_F_KERNEL;
	return v;
}

/* Decides `s` and, on a match, writes the flow's mark (never replacing one that
 * userspace or another CPU wrote first). Returns the verdict (enum flowd_kverdict):
 * FLOWD_KV_MATCH when the flow now has a mark. */
static __always_inline int kdecide_and_insert(const struct flowd_ksock *s,
					      const struct flowd_flow_key *key)
{
	struct flowd_flow_mark mark;
	int v = kdecide_mark(s, key, &mark);

	if (v != FLOWD_KV_MATCH)
		return v;
	/* Counted as unindexed before it can be found, so no lookup misses it. */
	index_unindexed_add(key, 1);
	/* NOEXIST: if userspace (or a racing CPU) got there first, its entry stands. */
	if (bpf_map_update_elem(&flowd_marks, key, &mark, BPF_NOEXIST) == 0) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&flowd_kinserts, &zero);

		if (n)
			*n += 1;
	} else {
		index_unindexed_add(key, -1);
	}
	return v;
}

/* The policy's match-all mark (zero entropy), if it has one (flowd.h,
 * flowd_kpolicy.match_all). Array lookups, inlined by the JIT, and only by packets
 * that found no mark; without a match-all rule, one. */
static __always_inline bool match_all_mark(struct flowd_flow_mark *out)
{
	__u32 zero = 0;
	struct flowd_kstate *st = bpf_map_lookup_elem(&flowd_kstate_map, &zero);

	if (!st || !st->enabled || !st->match_all)
		return false;
	__u32 slot = st->active & 1;
	struct flowd_kpolicy *pol = bpf_map_lookup_elem(&flowd_kpolicy_map, &slot);

	if (!pol || !pol->match_all.experiment)
		return false;
	*out = pol->match_all;
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
	/* A rule needing userspace facts could win: not even a match-all label. */
	MISS_USERSPACE,
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
	int v = label_only ? kdecide_mark(&s, key, out) : kdecide_and_insert(&s, key);

	if (v == FLOWD_KV_MATCH)
		return label_only ? MISS_LABEL_ONLY : MISS_IN_MAP;
	return v == FLOWD_KV_USERSPACE ? MISS_USERSPACE : MISS_NONE;
}


#endif /* FLOWD_KDECIDE_BPF_H */
