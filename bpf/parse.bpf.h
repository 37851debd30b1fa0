// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Packet parsing: Ethernet (with VLAN tags), IPv6 and its extension headers,
 * TCP/UDP ports, into a flow key and the offsets the marker writes at.
 *
 * Part of marker.bpf.c's one translation unit, included by it after the
 * definitions it uses (rodata, maps, flowd.h): not a stand-alone header.
 */
#ifndef FLOWD_PARSE_BPF_H
#define FLOWD_PARSE_BPF_H

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

	/* The common frame first, in straight-line code: untagged IPv6 with TCP or
	 * UDP right behind. The loops below serve VLAN tags and extension headers. */
	struct ipv6hdr *fast = data + ETH_HLEN;
	__be16 *fports = (void *)(fast + 1);

	if ((void *)(fports + 2) <= end && eth->h_proto == bpf_htons(ETH_P_IPV6) &&
	    (fast->nexthdr == NEXTHDR_TCP || fast->nexthdr == NEXTHDR_UDP)) {
		p->l3 = ETH_HLEN;
		p->l4 = ETH_HLEN + sizeof(*fast);
		p->vlan_tags = 0;
		p->first_next = fast->nexthdr;
		key->family = FLOWD_AF_INET6;
		key->proto = fast->nexthdr;
		key->pad = 0;
		key->sport = fports[0];
		key->dport = fports[1];
		__builtin_memcpy(key->saddr, &fast->saddr, 16);
		__builtin_memcpy(key->daddr, &fast->daddr, 16);
		return PARSE_OK;
	}
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


#endif /* FLOWD_PARSE_BPF_H */
