// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The flow index (flowd.h, "Flow index"): flowd_marks' marks in an array of
 * buckets the TC program reads with inlined lookups, written only by userspace.
 *
 * Part of marker.bpf.c's one translation unit, included by it after the
 * definitions it uses (rodata, maps, flowd.h): not a stand-alone header.
 */
#ifndef FLOWD_FLOW_INDEX_BPF_H
#define FLOWD_FLOW_INDEX_BPF_H

/* Config marker.flow_index; buckets - 1 (a power of two, sized by userspace) and
 * the shift that leaves log2(buckets) top bits of the hash (63 for one bucket). */
const volatile __u32 flowd_index_on = 0;
const volatile __u32 flowd_index_mask = 0;
const volatile __u32 flowd_index_shift = 63;

/* max_entries (the bucket count) is set by userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flowd_index_bucket);
} flowd_index SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flowd_index_head);
} flowd_index_head SEC(".maps");

/* Keeps the compiler from moving loads across it; x86 keeps loads in order, which
 * the slot's sequence check relies on (src/marker/flow_index.rs). */
#define index_barrier() asm volatile("" ::: "memory")
#define INDEX_READ(x) (*(volatile typeof(x) *)&(x))

/* Multipliers of the bucket hash: odd 64-bit constants with well-spread bits (the
 * fractional parts of sqrt(2), sqrt(3), sqrt(5), sqrt(7), sqrt(11), pi). */
#define IDX_K0 0x6a09e667f3bcc909ULL
#define IDX_K1 0xbb67ae8584caa73bULL
#define IDX_K2 0x3c6ef372fe94f82bULL
#define IDX_K3 0xa54ff53a5f1d36f1ULL
#define IDX_K4 0x510e527fade682d1ULL
#define IDX_K5 0x243f6a8885a308d3ULL

/* One word's share of the hash: xored with its secret seed, multiplied, and its
 * high half folded down, so a change in the word's top bits (a port, the last
 * bytes of an address) reaches every bit of the sum. */
#define IDX_WORD(w, s, k)                        \
	({                                       \
		__u64 _m = ((w) ^ (s)) * (k);    \
		_m ^ (_m >> 32);                 \
	})

/* The bucket of `key`: the five words' shares added (independent multiplies, which
 * pipeline), mixed once more, and the top bits taken, the best mixed of a product.
 * Rust: flow_index::bucket_of. */
static __always_inline __u32 flowd_index_bucket_of(const struct flowd_index_head *hd,
						   const struct flowd_flow_key *key)
{
	const __u64 *w = (const __u64 *)key;
	__u64 h = IDX_WORD(w[0], hd->seed[0], IDX_K0) + IDX_WORD(w[1], hd->seed[1], IDX_K1) +
		  IDX_WORD(w[2], hd->seed[2], IDX_K2) + IDX_WORD(w[3], hd->seed[3], IDX_K3) +
		  IDX_WORD(w[4], hd->seed[4], IDX_K4);

	h ^= h >> 29;
	h *= IDX_K5;
	return (__u32)(h >> flowd_index_shift) & flowd_index_mask;
}

enum index_result {
	INDEX_HIT,
	/* Certainly not in flowd_marks either. */
	INDEX_ABSENT,
	/* Ask flowd_marks. */
	INDEX_UNSURE,
};

/* Finds `key`; on a hit copies its mark to `out` (counts zero: they stay in the
 * slot) and counts the packet in its slot. */
static __always_inline enum index_result index_find(const struct flowd_flow_key *key,
						    struct flowd_flow_mark *out, __u32 len)
{
	__u32 zero = 0;
	struct flowd_index_head *hd = bpf_map_lookup_elem(&flowd_index_head, &zero);

	if (!hd)
		return INDEX_UNSURE;
	__u32 b = flowd_index_bucket_of(hd, key);
	struct flowd_index_bucket *bk = bpf_map_lookup_elem(&flowd_index, &b);

	if (!bk)
		return INDEX_UNSURE;
	const __u64 *w = (const __u64 *)key;
	bool busy = false;

#pragma unroll
	for (int i = 0; i < FLOWD_INDEX_WAYS; i++) {
		struct flowd_index_slot *s = &bk->way[i];
		__u32 seq = INDEX_READ(s->seq);

		index_barrier();
		if (seq & 1) {
			/* Being written, perhaps with this key. */
			busy = true;
			continue;
		}
		const __u64 *k = (const __u64 *)&s->key;

		if (k[0] != w[0] || k[1] != w[1] || k[2] != w[2] || k[3] != w[3] || k[4] != w[4])
			continue;
		out->label = s->label;
		out->experiment = s->experiment;
		out->activity = s->activity;
		out->flags = s->flags;
		out->counter_slot = s->counter_slot;
		out->pad = 0;
		index_barrier();
		if (INDEX_READ(s->seq) != seq)
			return INDEX_UNSURE;
		/* Plain adds, as for flowd_marks entries (marker.bpf.c says why). */
		s->packets += 1;
		s->bytes += len;
		out->packets = 0;
		out->bytes = 0;
		return INDEX_HIT;
	}
	index_barrier();
	if (busy || INDEX_READ(bk->unindexed))
		return INDEX_UNSURE;
	return INDEX_ABSENT;
}

/* Around an in-kernel insert into flowd_marks: the mark is not in the index, so
 * lookups of its bucket must ask flowd_marks from before it is there until
 * userspace indexes it (or, when the insert fails, at once again). */
static __always_inline void index_unindexed_add(const struct flowd_flow_key *key, __s32 n)
{
	__u32 zero = 0;
	struct flowd_index_head *hd;

	if (!flowd_index_on)
		return;
	hd = bpf_map_lookup_elem(&flowd_index_head, &zero);
	if (!hd)
		return;
	__u32 b = flowd_index_bucket_of(hd, key);
	struct flowd_index_bucket *bk = bpf_map_lookup_elem(&flowd_index, &b);

	if (bk)
		__sync_fetch_and_add(&bk->unindexed, n);
}


#endif /* FLOWD_FLOW_INDEX_BPF_H */
