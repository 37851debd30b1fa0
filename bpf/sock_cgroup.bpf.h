/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The socket's own cgroup v2 id, as sock_diag reports it (INET_DIAG_CGROUP_ID):
 * cgroup_id(sock_cgroup_ptr(&sk->sk_cgrp_data)). Shared by the socket iterator
 * (every full socket of a dump) and the tracker (an accepted connection, whose
 * event runs in softirq where no task is its owner).
 */
#ifndef FLOWD_SOCK_CGROUP_BPF_H
#define FLOWD_SOCK_CGROUP_BPF_H

/* Linux < 5.15 keeps the socket's cgroup in a word that is either a pointer or,
 * once net_cls/net_prio were used, classid/prioidx data (bit 0 or 1 set). */
struct sock_cgroup_data___word {
	__u64 val;
} __attribute__((preserve_access_index));

struct sock___word {
	struct sock_cgroup_data___word sk_cgrp_data;
} __attribute__((preserve_access_index));

/* 0 for the default root (no cgroup, or net_cls/net_prio data in its place);
 * `sk` must be a BTF-typed pointer (plain loads). */
static __always_inline __u64 flowd_sock_cgroup_id(struct sock *sk)
{
	struct cgroup *cg;
	__u64 v;

	if (bpf_core_field_exists(struct sock_cgroup_data, cgroup)) {
		cg = sk->sk_cgrp_data.cgroup;
		if (cg)
			return cg->kn->id;
	} else {
		v = ((struct sock___word *)sk)->sk_cgrp_data.val;
		/* sock_cgroup_ptr() answers the default root for data and for 0. */
		if (v && !(v & 3))
			return BPF_CORE_READ((struct cgroup *)v, kn, id);
	}
	return 0;
}

#endif /* FLOWD_SOCK_CGROUP_BPF_H */
