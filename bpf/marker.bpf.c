// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TC egress marker: stamps the SciTags tag of known flows into outgoing IPv6
 * packets (flow label and/or an 8-byte option header). It never drops a packet:
 * anything it cannot or should not mark passes unchanged and is counted.
 *
 * Layouts: shared/spec/scitags.md. Shared types: flowd.h.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
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
	if (bpf_check_mtu(skb, 0, &mtu_len, grow, 0))
		return FLOWD_OUT_SKIPPED_MTU;
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

SEC("tc")
int flowd_mark(struct __sk_buff *skb)
{
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
	__u32 slot = mark.counter_slot;
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
		 * to fix. p.l3 is at most ETH_HLEN + 8; the mask proves it. */
		__be32 *word = data + (p.l3 & 0x1f);

		if ((void *)(word + 1) > end) {
			count(FLOWD_OUT_MALFORMED);
			return TC_ACT_OK;
		}
		*word = (*word & bpf_htonl(0xFFF00000)) | bpf_htonl(mark.label & 0xFFFFF);
	}

	if (flowd_strategy & (FLOWD_STRATEGY_HOP_BY_HOP | FLOWD_STRATEGY_DESTINATION))
		count(add_option_headers(skb, &p, &mark));
	else
		count(FLOWD_OUT_MARKED);
	return TC_ACT_OK;
}

/* The harness floor for benchmarks: the cost of running any TC program at all. */
SEC("tc")
int flowd_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
