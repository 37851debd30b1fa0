// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Measurement only (benches/scripts/reconcile_iter.sh): a BPF TCP socket iterator
 * that writes one 48-byte record per socket of the reader's network namespace
 * (the kernel's tcp iterator walks the namespace of whoever opens it), to compare
 * with a sock_diag dump of the same sockets. Not loaded by the daemon.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct flowd_iter_rec {
	__u64 cookie;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 state;
	__u8 pad[2];
};

SEC("iter/tcp")
int flowd_iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct flowd_iter_rec r = {};

	if (!skc)
		return 0;
	r.cookie = bpf_get_socket_cookie(skc);
	r.family = skc->skc_family;
	r.state = skc->skc_state;
	r.sport = skc->skc_num;
	r.dport = skc->skc_dport;
	if (r.family == 10) {
		BPF_CORE_READ_INTO(&r.saddr, skc, skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&r.daddr, skc, skc_v6_daddr.in6_u.u6_addr8);
	} else {
		*(__u32 *)r.saddr = skc->skc_rcv_saddr;
		*(__u32 *)r.daddr = skc->skc_daddr;
	}
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}
