// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The per-socket lookup cache: each local socket's last flowd_marks lookup,
 * kept in its socket storage and checked against the packet's 5-tuple.
 *
 * Part of marker.bpf.c's one translation unit, included by it after the
 * definitions it uses (rodata, maps, flowd.h): not a stand-alone header.
 */
#ifndef FLOWD_SK_CACHE_BPF_H
#define FLOWD_SK_CACHE_BPF_H

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


#endif /* FLOWD_SK_CACHE_BPF_H */
