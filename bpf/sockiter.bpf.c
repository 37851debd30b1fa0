// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Socket iterators: the reconcile's full dump without sock_diag
 * (src/discovery/sockiter.rs). Reading an iterator fd runs these programs once per
 * TCP or UDP socket of the network namespace the fd was created in (the kernel's
 * tcp and udp iterators skip the others), and each writes one fixed-size
 * struct flowd_sock_record: no netlink messages to build and parse, which is most
 * of what a sock_diag dump costs.
 *
 * Every field carries the value sock_diag would report for the same socket
 * (net/ipv4/inet_diag.c, udp_diag.c), so the flow table sees the same sockets
 * whichever source dumped them. Listeners and unconnected UDP sockets are
 * reported too: the reader needs them to tell a connection's direction, as the
 * sock_diag parser does.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "flowd.h"
#include "sock_cgroup.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by userspace before load: tracing programs (iterators included) may call
 * bpf_get_socket_cookie() (Linux 5.12). Without, the cookie is read from the
 * socket, and a socket that never got one is flagged FLOWD_SR_NO_COOKIE. */
const volatile __u32 flowd_tracing_cookie = 1;

/* Set by userspace between walks (SockIter::set_tcp_info): read the tcp_info
 * fields. They are on other cache lines of the tcp_sock than what the reconcile
 * needs, so a walk that does not want them skips them. */
__u32 flowd_tcp_info = 1;

/* Set by userspace between walks (SockIter::verify): 1 makes a walk fold each
 * connection into flowd_digest instead of writing records. The seed is drawn
 * once per daemon, so a local user cannot aim sockets at one digest. */
__u32 flowd_walk_digest = 0;
__u64 flowd_digest_seed = 0;
/* A read() that passes a million sockets without writing anything fails with
 * EAGAIN (bpf_seq_read's MAX_ITER_OBJECTS): a digest walk writes an all-zero
 * record each time it has visited mask + 1 sockets (a power of two). */
__u64 flowd_digest_visited = 0;
__u64 flowd_digest_progress_mask = (1 << 19) - 1;
struct flowd_digest_part flowd_digest[FLOWD_DIGEST_PARTS] = {};

/* Not used by the programs: make libbpf-cargo emit the record and its flags into
 * the skeleton's types. */
struct flowd_sock_record flowd_sock_record_layout = {};
enum flowd_sock_record_flag flowd_sock_record_flags = 0;
struct flowd_contract flowd_contract_types = {};

#define FLOWD_IPPROTO_TCP 6
#define FLOWD_IPPROTO_UDP 17
#define FLOWD_TCP_TIME_WAIT 6
#define FLOWD_TCP_NEW_SYN_RECV 12

/*
 * Fields are read with plain loads through the BTF-typed pointers the iterator
 * hands over (CO-RE relocated, faults caught by the kernel), not with
 * BPF_CORE_READ: a bpf_probe_read_kernel() call per field made the walk cost as
 * much as a sock_diag dump.
 */

/* sock_i_ino(): the inode of the struct socket the sock belongs to, 0 if none. */
static __always_inline __u64 sock_inode(struct sock *sk)
{
	struct socket *sock = sk->sk_socket;
	struct socket_alloc *sa;

	if (!sock)
		return 0;
	/* Past the end of struct socket for the verifier: one probe read. */
	sa = container_of(sock, struct socket_alloc, socket);
	return BPF_CORE_READ(sa, vfs_inode.i_ino);
}

/* The socket's cookie; 0 if it has none and this kernel cannot give it one from
 * an iterator (before Linux 5.12). bpf_get_socket_cookie() gives a socket that
 * had none the one sock_diag would give it, and the tracker reports. */
static __always_inline __u64 sock_cookie(struct sock_common *skc)
{
	return flowd_tracing_cookie ? bpf_get_socket_cookie(skc) : skc->skc_cookie.counter;
}

static __always_inline void read_common(struct flowd_sock_record *r, struct sock_common *skc)
{
	r->cookie = sock_cookie(skc);
	if (!r->cookie)
		r->flags |= FLOWD_SR_NO_COOKIE;
	r->family = skc->skc_family;
	r->sport = skc->skc_num;
	r->dport = bpf_ntohs(skc->skc_dport);
	if (r->family == FLOWD_AF_INET6) {
		__u32 *s = (__u32 *)r->saddr, *d = (__u32 *)r->daddr;

		s[0] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[0];
		s[1] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[1];
		s[2] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[2];
		s[3] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[3];
		d[0] = skc->skc_v6_daddr.in6_u.u6_addr32[0];
		d[1] = skc->skc_v6_daddr.in6_u.u6_addr32[1];
		d[2] = skc->skc_v6_daddr.in6_u.u6_addr32[2];
		d[3] = skc->skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		*(__u32 *)r->saddr = skc->skc_rcv_saddr;
		*(__u32 *)r->daddr = skc->skc_daddr;
	}
}

#define FLOWD_DIGEST_K 0x9E3779B97F4A7C15ULL

static __always_inline __u64 digest_mix(__u64 h, __u64 w)
{
	h = (h ^ w) * FLOWD_DIGEST_K;
	return h ^ (h >> 32);
}

/*
 * walk_digest::socket_digest() in Rust, word for word: the cookie, then
 * protocol | state << 8 | local port << 16 | remote port << 32 | bound << 48
 * (bound: the socket has a struct socket and its state is one of
 * FLOWD_DIGEST_BOUND_STATES), then the local
 * and remote addresses as 16 bytes (IPv4 as ::ffff:a.b.c.d), two native-order
 * words each. The partition comes from the cookie alone, so the daemon can name
 * the partition of a socket it only knows by cookie.
 */
static __always_inline void digest_socket(struct sock_common *skc, struct sock *sk, __u8 protocol,
					  __u8 state, __u32 states)
{
	__u64 bound;
	__u64 seed = flowd_digest_seed, cookie, h, l0, l1, r0, r1;
	struct flowd_digest_part *p;
	__u32 part;

	if (state > 31 || !(states & (1u << state)))
		return;
	bound = (FLOWD_DIGEST_BOUND_STATES & (1u << state)) && sk->sk_socket;
	cookie = sock_cookie(skc);
	if (skc->skc_family == FLOWD_AF_INET6) {
		l0 = (__u64)skc->skc_v6_rcv_saddr.in6_u.u6_addr32[1] << 32 |
		     skc->skc_v6_rcv_saddr.in6_u.u6_addr32[0];
		l1 = (__u64)skc->skc_v6_rcv_saddr.in6_u.u6_addr32[3] << 32 |
		     skc->skc_v6_rcv_saddr.in6_u.u6_addr32[2];
		r0 = (__u64)skc->skc_v6_daddr.in6_u.u6_addr32[1] << 32 |
		     skc->skc_v6_daddr.in6_u.u6_addr32[0];
		r1 = (__u64)skc->skc_v6_daddr.in6_u.u6_addr32[3] << 32 |
		     skc->skc_v6_daddr.in6_u.u6_addr32[2];
	} else {
		l0 = 0;
		r0 = 0;
		l1 = 0xffff0000ULL | (__u64)skc->skc_rcv_saddr << 32;
		r1 = 0xffff0000ULL | (__u64)skc->skc_daddr << 32;
	}
	h = digest_mix(seed, cookie);
	h = digest_mix(h, protocol | (__u64)state << 8 | (__u64)skc->skc_num << 16 |
				  (__u64)bpf_ntohs(skc->skc_dport) << 32 | bound << 48);
	h = digest_mix(h, l0);
	h = digest_mix(h, l1);
	h = digest_mix(h, r0);
	h = digest_mix(h, r1);
	part = ((cookie ^ seed) * FLOWD_DIGEST_K) >> (64 - FLOWD_DIGEST_PART_BITS);
	p = &flowd_digest[part & (FLOWD_DIGEST_PARTS - 1)];
	/* One walk at a time per loaded object (SockIter is not shared), and
	 * iterator programs run with migration off: plain adds. */
	p->count += 1;
	p->sum += h;
}

static __always_inline void digest_progress(struct seq_file *seq)
{
	struct flowd_sock_record none = {};

	if ((++flowd_digest_visited & flowd_digest_progress_mask) == 0)
		bpf_seq_write(seq, &none, sizeof(none));
}

static __always_inline void read_full(struct flowd_sock_record *r, struct sock *sk, __u32 uid)
{
	r->flags |= FLOWD_SR_FULL;
	r->uid = uid;
	r->inode = sock_inode(sk);
	r->cgroup_id = flowd_sock_cgroup_id(sk);
	if (!r->cgroup_id)
		r->flags |= FLOWD_SR_CGROUP_ROOT;
}

SEC("iter/tcp")
int flowd_iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct flowd_sock_record r = {};
	struct tcp_timewait_sock *tw;
	struct tcp_sock *tp;

	if (!skc)
		return 0;
	if (flowd_walk_digest) {
		digest_progress(ctx->meta->seq);
		/* Full sockets only: TIME_WAIT and request sockets are not flows the
		 * table keeps (the tracker reported their full socket's close). */
		if (skc->skc_state == FLOWD_TCP_TIME_WAIT || skc->skc_state == FLOWD_TCP_NEW_SYN_RECV)
			return 0;
		tp = bpf_skc_to_tcp_sock(skc);
		if (tp)
			digest_socket(skc, (struct sock *)tp, FLOWD_IPPROTO_TCP, skc->skc_state,
				      FLOWD_DIGEST_TCP_STATES);
		return 0;
	}
	read_common(&r, skc);
	r.protocol = FLOWD_IPPROTO_TCP;
	r.state = skc->skc_state;
	if (r.state == FLOWD_TCP_TIME_WAIT) {
		/* inet_twsk_diag_fill() reports the substate (TIME_WAIT or FIN_WAIT2),
		 * uid and inode 0. */
		tw = bpf_skc_to_tcp_timewait_sock(skc);
		if (tw)
			r.state = tw->tw_sk.tw_substate;
	} else if (r.state == FLOWD_TCP_NEW_SYN_RECV) {
		/* inet_req_diag_fill() reports SYN_RECV, uid and inode 0 (the iterator's
		 * uid would be the listener's). */
		r.state = FLOWD_TCP_SYN_RECV;
	} else {
		tp = bpf_skc_to_tcp_sock(skc);
		if (!tp)
			return 0;
		read_full(&r, (struct sock *)tp, ctx->uid);
		if (!flowd_tcp_info)
			goto out;
		/* tcp_get_info(), the fields the daemon reads. */
		r.rtt_us = tp->srtt_us >> 3;
		r.rttvar_us = tp->mdev_us >> 2;
		r.snd_cwnd = tp->snd_cwnd;
		r.total_retrans = tp->total_retrans;
		r.bytes_acked = tp->bytes_acked;
		r.bytes_received = tp->bytes_received;
		r.segs_out = tp->segs_out;
		r.segs_in = tp->segs_in;
	}
out:
	/* A full seq buffer makes the kernel show this socket again at the next
	 * read: nothing is lost, so the result needs no check. */
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

SEC("iter/udp")
int flowd_iter_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;
	struct flowd_sock_record r = {};
	struct sock *sk;

	if (!udp)
		return 0;
	sk = (struct sock *)udp;
	if (flowd_walk_digest) {
		digest_progress(ctx->meta->seq);
		digest_socket((struct sock_common *)udp, sk, FLOWD_IPPROTO_UDP,
			      sk->__sk_common.skc_state, FLOWD_DIGEST_UDP_STATES);
		return 0;
	}
	read_common(&r, (struct sock_common *)udp);
	r.protocol = FLOWD_IPPROTO_UDP;
	r.state = sk->__sk_common.skc_state;
	read_full(&r, sk, ctx->uid);
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}
