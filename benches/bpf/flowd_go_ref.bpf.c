// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Benches only (benches/marker.rs): a TC marker shaped like flowd-go's
 * (github.com/scitags/flowd-go, internal/progs/marker, label strategy), written
 * here from its published key layout and logic, to measure flowd-rs's marker
 * against in the same BPF_PROG_TEST_RUN run. Not flowd-go's code.
 *
 * flowd-go's shape: skb->protocol picks plain Ethernet or one 802.1Q tag; the
 * IPv6 header must be followed directly by TCP (no extension headers, no UDP);
 * the key is the destination address as two host-order u64 halves and both ports
 * as host-order u32 (24 bytes, no source address, no protocol); the map is an
 * LRU hash of 100 000 entries holding the 20-bit tag; a hit rewrites the label.
 *
 * The other programs change one thing each (map type, key size), to measure the
 * options for flowd-rs's own lookup in isolation.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowd.h"

#define TC_ACT_OK 0
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100

struct ref_key24 {
	__u64 ip6_hi;
	__u64 ip6_lo;
	__u32 dport;
	__u32 sport;
};

/* The 5-tuple without family and padding: 36 bytes, one jhash round fewer than 40. */
struct ref_key36 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 100000);
	__type(key, struct ref_key24);
	__type(value, __u32);
} ref_lru24 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 100000);
	__type(key, struct ref_key24);
	__type(value, __u32);
} ref_hash24 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 100000);
	__type(key, struct ref_key36);
	__type(value, __u32);
} ref_hash36 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 100000);
	__type(key, struct flowd_flow_key);
	__type(value, __u32);
} ref_hash40 SEC(".maps");

static __always_inline __u64 half(const struct in6_addr *a, int i)
{
	return (__u64)bpf_ntohl(a->in6_u.u6_addr32[2 * i]) << 32 | bpf_ntohl(a->in6_u.u6_addr32[2 * i + 1]);
}

/* The IPv6 header of an IPv6 TCP frame (plain or one 802.1Q tag), else NULL. */
static __always_inline struct ipv6hdr *ref_l3(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *l3;

	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		l3 = data + sizeof(struct ethhdr);
	} else if (skb->protocol == bpf_htons(ETH_P_8021Q)) {
		struct vlan_ethhdr *q = data;

		if ((void *)(q + 1) > end || q->h_vlan_encapsulated_proto != bpf_htons(ETH_P_IPV6))
			return NULL;
		l3 = (void *)(q + 1);
	} else {
		return NULL;
	}
	if ((void *)(l3 + 1) > end || l3->nexthdr != IPPROTO_TCP)
		return NULL;
	if ((void *)l3 + sizeof(*l3) + sizeof(struct tcphdr) > end)
		return NULL;
	return l3;
}

static __always_inline void ref_label(struct ipv6hdr *l3, __u32 tag)
{
	l3->flow_lbl[0] = (tag >> 16) & 0xF;
	l3->flow_lbl[1] = (tag >> 8) & 0xFF;
	l3->flow_lbl[2] = tag & 0xFF;
}

#define REF_KEY24(l3, th)                                                                   \
	struct ref_key24 k;                                                                 \
	__builtin_memset(&k, 0, sizeof(k));                                                 \
	k.ip6_hi = half(&l3->daddr, 0);                                                     \
	k.ip6_lo = half(&l3->daddr, 1);                                                     \
	k.dport = bpf_ntohs(th->dest);                                                      \
	k.sport = bpf_ntohs(th->source)

/* flowd-go's shape, as published: LRU hash, 24-byte key. */
SEC("tc")
int ref_flowd_go(struct __sk_buff *skb)
{
	struct ipv6hdr *l3 = ref_l3(skb);

	if (!l3)
		return TC_ACT_OK;
	struct tcphdr *th = (void *)(l3 + 1);
	REF_KEY24(l3, th);
	__u32 *tag = bpf_map_lookup_elem(&ref_lru24, &k);

	if (tag)
		ref_label(l3, *tag);
	return TC_ACT_OK;
}

/* Option "plain hash instead of LRU": the same with BPF_MAP_TYPE_HASH. */
SEC("tc")
int ref_hash24_prog(struct __sk_buff *skb)
{
	struct ipv6hdr *l3 = ref_l3(skb);

	if (!l3)
		return TC_ACT_OK;
	struct tcphdr *th = (void *)(l3 + 1);
	REF_KEY24(l3, th);
	__u32 *tag = bpf_map_lookup_elem(&ref_hash24, &k);

	if (tag)
		ref_label(l3, *tag);
	return TC_ACT_OK;
}

/* Option "36-byte key": the 5-tuple less family, padding and protocol. */
SEC("tc")
int ref_hash36_prog(struct __sk_buff *skb)
{
	struct ipv6hdr *l3 = ref_l3(skb);

	if (!l3)
		return TC_ACT_OK;
	struct tcphdr *th = (void *)(l3 + 1);
	struct ref_key36 k;

	__builtin_memcpy(k.saddr, &l3->saddr, 16);
	__builtin_memcpy(k.daddr, &l3->daddr, 16);
	k.sport = th->source;
	k.dport = th->dest;
	__u32 *tag = bpf_map_lookup_elem(&ref_hash36, &k);

	if (tag)
		ref_label(l3, *tag);
	return TC_ACT_OK;
}

/* flowd-rs's 40-byte key (struct flowd_flow_key) in flowd-go's logic. */
SEC("tc")
int ref_hash40_prog(struct __sk_buff *skb)
{
	struct ipv6hdr *l3 = ref_l3(skb);

	if (!l3)
		return TC_ACT_OK;
	struct tcphdr *th = (void *)(l3 + 1);
	struct flowd_flow_key k;

	k.family = FLOWD_AF_INET6;
	k.proto = IPPROTO_TCP;
	k.pad = 0;
	k.sport = th->source;
	k.dport = th->dest;
	__builtin_memcpy(k.saddr, &l3->saddr, 16);
	__builtin_memcpy(k.daddr, &l3->daddr, 16);
	__u32 *tag = bpf_map_lookup_elem(&ref_hash40, &k);

	if (tag)
		ref_label(l3, *tag);
	return TC_ACT_OK;
}

/* The harness floor, in this object too. */
SEC("tc")
int ref_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
