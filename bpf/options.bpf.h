// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Writing the mark: the flow label, and the hop-by-hop / destination-options
 * headers (with their MTU guard).
 *
 * Part of marker.bpf.c's one translation unit, included by it after the
 * definitions it uses (rodata, maps, flowd.h): not a stand-alone header.
 */
#ifndef FLOWD_OPTIONS_BPF_H
#define FLOWD_OPTIONS_BPF_H

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


#endif /* FLOWD_OPTIONS_BPF_H */
