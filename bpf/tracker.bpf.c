// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * flowd socket tracker: reports TCP and connected-UDP sockets to userspace through
 * one ring buffer, without help from applications and without kprobes/fentry
 * (refused where kernel lockdown forbids them, as on some hosts).
 *
 *   tp_btf/inet_sock_set_state   every TCP state change (opens, closes, RST, timeouts)
 *   tp_btf/softirq_entry, _exit  per-CPU "in softirq" flag: are pid/comm the owner's?
 *   sockops (cgroup2 root)       TCP_CONNECT_CB with the bound tuple before the SYN,
 *                                ACTIVE/PASSIVE_ESTABLISHED_CB, and STATE_CB for the
 *                                state changes the tracepoint program misses
 *   cgroup/connect4, connect6    only makes the kernel assign a UDP socket's cookie
 *   tp_btf/sys_exit              connect() on a UDP socket (connect and disconnect),
 *                                accept() of a TCP connection (its owner and inode)
 *   cgroup/sock_release          release of a UDP socket whose connect was seen
 *
 * Each program is loaded or not by userspace (autoload), so a host lacking a hook
 * still runs the others.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "flowd.h"
#include "sock_cgroup.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define AF_UNSPEC 0
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SOCK_DGRAM 2
#define PF_KTHREAD 0x00200000

/* Ring buffer of struct flowd_sock_event. Size set by userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} flowd_events SEC(".maps");

/* Records lost because the ring buffer was full: one u64 per CPU, summed by
 * userspace (Tracker::drops). Per-CPU so the hot path needs no atomic. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} flowd_drops SEC(".maps");

/* Connected UDP sockets seen by the sys_exit hook, by cookie, with the record that
 * announced them. cgroup/sock_release may read neither the tuple (the bpf_sock src_ and dst_ fields
 * are only readable from post_bind hooks: __sock_filter_check_attach_type() in
 * net/core/filter.c) nor netns/inode/uid, only the cookie: the release event is
 * rebuilt from this entry. LRU, so a missed release cannot leak an entry; 32768 *
 * ~130 bytes ~ 4 MiB. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, __u64);
	__type(value, struct flowd_sock_event);
} flowd_udp_socks SEC(".maps");

/* Per CPU: 1 while a softirq handler runs (tp_btf/softirq_entry..softirq_exit).
 * TCP's softirq work (packet receive, timers) runs on top of whatever task was
 * current, so `current` says nothing about the socket's owner there. The kernel's
 * own preempt_count (what in_serving_softirq() reads) is not reachable: the per-CPU
 * __preempt_count ksym is not in kallsyms here (no CONFIG_KALLSYMS_ALL) and the
 * bpf_in_interrupt() helper of newer selftests builds on it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} flowd_in_softirq SEC(".maps");

/* Per CPU: 1 while flowd_tcp_state runs. A softirq that changes a TCP state while
 * the same CPU is inside that program does not run it again: the kernel skips
 * nested runs of a tracing program (counted in bpf_prog_info.recursion_misses)
 * and the change would be lost. Cgroup programs have no such guard, so the
 * sockops STATE_CB reports the change instead, only in that case (no duplicates
 * otherwise). A softirq landing in the few instructions before the flag is set
 * or after it is cleared still loses the event: that one is counted in
 * recursion_misses, and userspace dumps sock_diag when the count moves. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} flowd_in_tcp_state SEC(".maps");

/* The owner of each TCP socket in SYN_SENT, by cookie: recorded by the tracepoint
 * program in connect() (the CLOSE->SYN_SENT transition runs in the owner's
 * syscall), read by the sockops program at TCP_CONNECT_CB a moment later.
 * Older kernels do not let sockops ask the task itself: Linux 6.1 refuses
 * bpf_get_current_pid_tgid() there, 6.12 bpf_get_current_comm(). LRU: an
 * entry whose TCP_CONNECT_CB never comes (no sockops attached) ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct flowd_owner);
} flowd_owners SEC(".maps");

/* Set by userspace before load: tracing programs may call bpf_get_socket_cookie()
 * (Linux 5.12). Without, the cookie is read from the socket: the connect4/connect6
 * hooks make sure a connecting socket has one before its first state change. */
const volatile __u32 flowd_tracing_cookie = 1;

/* Set by userspace before load: the cgroup/sock_release program may call
 * bpf_get_current_task_btf(), bpf_get_current_pid_tgid(), _comm() and
 * _cgroup_id() (probed at start; 5.10 has no bpf_get_current_task_btf at all).
 * Without, the release event keeps
 * the owner recorded at connect(). */
const volatile __u32 flowd_release_owner = 1;

/* Set to 1 by userspace once both softirq programs are attached; until then owner
 * fields are trusted only for transitions that happen in a syscall. */
__u32 flowd_softirq_tracking = 0;

/* Set by userspace before load: the inode of the only network namespace whose
 * sockets are reported (0: every namespace). Checked before the ring buffer, so
 * other namespaces' churn costs neither ring space nor the reader. */
const volatile __u32 flowd_only_netns = 0;

static __always_inline bool flowd_netns_wanted(const struct sock *sk)
{
	return !flowd_only_netns ||
	       BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) == flowd_only_netns;
}

/* Set to 1 by userspace when the sockops STATE_CB must report every TCP state
 * change of the sockets it sees, not only those flowd_tcp_state would skip: when
 * that tracepoint could not be attached (and in tests of this path). */
__u32 flowd_state_cb_all = 0;

/* Not used by the programs: makes libbpf-cargo emit types::flowd_sock_event (it only
 * generates types that appear in maps or globals). */
struct flowd_sock_event flowd_event_layout = {};


/* Not used by the programs: makes libbpf-cargo emit the enums of flowd.h. */
struct flowd_contract flowd_contract_types = {};

static __always_inline void flowd_count_drop(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&flowd_drops, &zero);

	if (n)
		*n += 1;
}

static __always_inline struct flowd_sock_event *flowd_reserve(void)
{
	struct flowd_sock_event *e = bpf_ringbuf_reserve(&flowd_events, sizeof(*e), 0);

	if (!e) {
		flowd_count_drop();
		return NULL;
	}
	/* ringbuf memory is not zeroed: clear it (padding, unused address bytes). */
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	return e;
}

/* bpf_get_current_task() and a CO-RE read rather than bpf_get_current_task_btf():
 * the latter only exists from Linux 5.11, and this runs once per event. */
static __always_inline bool flowd_is_kthread(void)
{
	struct task_struct *task = (void *)bpf_get_current_task();

	return BPF_CORE_READ(task, flags) & PF_KTHREAD;
}

/* True when `current` is the task operating on the socket: a user task, not in a
 * softirq. Needs flowd_softirq_tracking. */
static __always_inline bool flowd_task_context(void)
{
	__u32 zero = 0, *in_softirq;

	if (flowd_is_kthread())
		return false;
	in_softirq = bpf_map_lookup_elem(&flowd_in_softirq, &zero);
	return in_softirq && *in_softirq == 0;
}

/* Without softirq tracking: transitions only ever made by a syscall of the owner
 * (connect, listen, close/shutdown of an established or close-wait socket). */
static __always_inline bool flowd_syscall_transition(int oldstate, int newstate)
{
	return (oldstate == FLOWD_TCP_CLOSE && newstate == FLOWD_TCP_SYN_SENT) ||
	       (oldstate == FLOWD_TCP_CLOSE && newstate == FLOWD_TCP_LISTEN) ||
	       (oldstate == FLOWD_TCP_ESTABLISHED && newstate == 4 /* FIN_WAIT1 */) ||
	       (oldstate == 8 /* CLOSE_WAIT */ && newstate == 9 /* LAST_ACK */);
}

static __always_inline void flowd_set_softirq(__u32 v)
{
	__u32 zero = 0, *in_softirq = bpf_map_lookup_elem(&flowd_in_softirq, &zero);

	if (in_softirq)
		*in_softirq = v;
}

SEC("tp_btf/softirq_entry")
int BPF_PROG(flowd_softirq_entry, unsigned int vec_nr)
{
	flowd_set_softirq(1);
	return 0;
}

/* Softirqs do not nest on a CPU (hardirqs may interrupt them but never change TCP
 * state), so a flag is enough. */
SEC("tp_btf/softirq_exit")
int BPF_PROG(flowd_softirq_exit, unsigned int vec_nr)
{
	flowd_set_softirq(0);
	return 0;
}

static __always_inline void flowd_fill_task(struct flowd_sock_event *e, bool owner)
{
	__u64 id = bpf_get_current_pid_tgid();

	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (owner)
		e->flags |= FLOWD_F_OWNER_VALID;
}

static __always_inline __u64 flowd_sock_inode(const struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	struct socket_alloc *sa;

	/* Child sockets before accept() and orphans have no struct socket. */
	if (!sock)
		return 0;
	/* SOCK_INODE(): the inode is allocated right after the socket. */
	sa = (void *)sock - bpf_core_field_offset(struct socket_alloc, socket);
	return BPF_CORE_READ(sa, vfs_inode.i_ino);
}

/* netns, inode, uid: read with CO-RE probe reads so any sock pointer will do. */
static __always_inline void flowd_fill_sock_info(struct flowd_sock_event *e, const struct sock *sk)
{
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	e->inode = flowd_sock_inode(sk);
	e->uid = BPF_CORE_READ(sk, sk_uid.val);
	e->flags |= FLOWD_F_SOCK_INFO;
}

/* Family, protocol and both endpoints from the sock. */
static __always_inline void flowd_fill_tuple(struct flowd_sock_event *e, const struct sock *sk)
{
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->protocol = BPF_CORE_READ(sk, sk_protocol);
	/* skc_num is the bound local port in host order, skc_dport network order.
	 * At ->CLOSE, inet_put_port() has already zeroed skc_num (tcp_set_state()
	 * unhashes before the tracepoint fires); inet_sport, network order, is kept. */
	e->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (!e->sport)
		e->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	e->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (e->family == AF_INET6) {
		BPF_CORE_READ_INTO(&e->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&e->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		BPF_CORE_READ_INTO((__u32 *)e->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)e->daddr, sk, __sk_common.skc_daddr);
	}
}

static __always_inline void flowd_set_in_tcp_state(__u32 v)
{
	__u32 zero = 0, *in = bpf_map_lookup_elem(&flowd_in_tcp_state, &zero);

	if (in)
		*in = v;
}

static __always_inline bool flowd_tcp_state_running(void)
{
	__u32 zero = 0, *in = bpf_map_lookup_elem(&flowd_in_tcp_state, &zero);

	return in && *in;
}

static __always_inline void flowd_tcp_state_event(const struct sock *sk, int oldstate,
						  int newstate);

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(flowd_tcp_state, const struct sock *sk, int oldstate, int newstate)
{
	flowd_set_in_tcp_state(1);
	flowd_tcp_state_event(sk, oldstate, newstate);
	flowd_set_in_tcp_state(0);
	return 0;
}

static __always_inline void flowd_tcp_state_event(const struct sock *sk, int oldstate,
						  int newstate)
{
	struct flowd_sock_event *e;

	/* The tracepoint also fires for other inet protocols (MPTCP subflows are TCP,
	 * SCTP/DCCP are not tracked). */
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP || !flowd_netns_wanted(sk))
		return;
	e = flowd_reserve();
	if (!e)
		return;
	e->kind = FLOWD_EV_TCP_STATE;
	e->oldstate = oldstate;
	e->newstate = newstate;
	flowd_fill_tuple(e, sk);
	flowd_fill_sock_info(e, sk);
	if (newstate == FLOWD_TCP_CLOSE) {
		/* The flow's final volume, for its end firefly: sock_diag can no longer
		 * report this socket once it is closed. */
		const struct tcp_sock *tp = (const struct tcp_sock *)sk;

		e->bytes_acked = BPF_CORE_READ(tp, bytes_acked);
		e->bytes_received = BPF_CORE_READ(tp, bytes_received);
		e->flags |= FLOWD_F_TCP_BYTES;
	}
	/* A server-side LISTEN->SYN_RECV, a SYN_SENT->ESTABLISHED or an RST runs in
	 * softirq under whatever task was interrupted: owner fields are then not the
	 * socket's. */
	bool owner = flowd_softirq_tracking ? flowd_task_context()
					    : !flowd_is_kthread() &&
						      flowd_syscall_transition(oldstate, newstate);

	flowd_fill_task(e, owner);
	/* bpf_get_socket_cookie on a tp_btf sock allocates the cookie if needed; it is
	 * the value SO_COOKIE and sock_diag report. */
	__u64 cookie;

	if (flowd_tracing_cookie) {
		cookie = bpf_get_socket_cookie((void *)sk);
	} else {
		cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
		/* Never asked for (no cgroup hooks): no key to join on. */
		if (!cookie) {
			bpf_ringbuf_discard(e, 0);
			return;
		}
	}
	e->cookie = cookie;
	/* Map keys and values from the stack: older verifiers (Linux 6.1) refuse
	 * ring-buffer memory there. */
	if (owner && newstate == FLOWD_TCP_SYN_SENT) {
		struct flowd_owner o = {
			.pid = e->pid,
			.tid = e->tid,
			.cgroup_id = e->cgroup_id,
		};

		__builtin_memcpy(o.comm, e->comm, sizeof(o.comm));
		bpf_map_update_elem(&flowd_owners, &cookie, &o, BPF_ANY);
	}
	bpf_ringbuf_submit(e, 0);
}

SEC("sockops")
int flowd_sockops(struct bpf_sock_ops *skops)
{
	struct flowd_sock_event *e;
	struct bpf_sock *bsk;
	struct tcp_sock *tp;
	__u32 op = skops->op;
	__u8 kind;

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		kind = FLOWD_EV_TCP_CONNECT;
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		kind = FLOWD_EV_TCP_ACTIVE_ESTABLISHED;
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		kind = FLOWD_EV_TCP_PASSIVE_ESTABLISHED;
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* Only the changes flowd_tcp_state is about to miss (see
		 * flowd_in_tcp_state); the others it reports itself. */
		if (!flowd_state_cb_all && !flowd_tcp_state_running())
			return 1;
		kind = FLOWD_EV_TCP_STATE_CB;
		break;
	default:
		return 1;
	}
	/* From now on, call this program at each of the socket's state changes
	 * (tcp_set_state, before the tracepoint), keeping other programs' flags. */
	if (kind != FLOWD_EV_TCP_STATE_CB &&
	    !(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
	bsk = skops->sk;
	if (!bsk)
		return 1;
	tp = bpf_skc_to_tcp_sock(bsk);
	if (!tp || !flowd_netns_wanted((const struct sock *)tp))
		return 1;
	e = flowd_reserve();
	if (!e)
		return 1;
	e->kind = kind;
	if (kind == FLOWD_EV_TCP_STATE_CB) {
		e->oldstate = skops->args[0];
		e->newstate = skops->args[1];
		if (e->newstate == FLOWD_TCP_CLOSE) {
			e->bytes_acked = BPF_CORE_READ(tp, bytes_acked);
			e->bytes_received = BPF_CORE_READ(tp, bytes_received);
			e->flags |= FLOWD_F_TCP_BYTES;
		}
	} else {
		e->newstate = kind == FLOWD_EV_TCP_CONNECT ? FLOWD_TCP_SYN_SENT
							   : FLOWD_TCP_ESTABLISHED;
	}
	e->family = skops->family;
	e->protocol = IPPROTO_TCP;
	/* local_port is host order; remote_port holds the network-order port in its
	 * upper 16 bits on little endian (sock_ops_convert_ctx_access shifts it), so
	 * bpf_ntohl() yields the host-order port. */
	e->sport = skops->local_port;
	e->dport = bpf_ntohl(skops->remote_port);
	if (e->family == AF_INET6) {
		/* The verifier only accepts 4-byte loads of remote_ip6[]/local_ip6[]
		 * (no memcpy of the ctx): copy word by word. */
		__u32 *s = (__u32 *)e->saddr, *d = (__u32 *)e->daddr;

		s[0] = skops->local_ip6[0];
		s[1] = skops->local_ip6[1];
		s[2] = skops->local_ip6[2];
		s[3] = skops->local_ip6[3];
		d[0] = skops->remote_ip6[0];
		d[1] = skops->remote_ip6[1];
		d[2] = skops->remote_ip6[2];
		d[3] = skops->remote_ip6[3];
	} else {
		*(__u32 *)e->saddr = skops->local_ip4;
		*(__u32 *)e->daddr = skops->remote_ip4;
	}
	flowd_fill_sock_info(e, (const struct sock *)tp);
	__u64 cookie = bpf_get_socket_cookie(skops);

	e->cookie = cookie;
	/* TCP_CONNECT_CB runs inside connect()/sendmsg(MSG_FASTOPEN), right after the
	 * tracepoint recorded the owner; the ESTABLISHED callbacks usually run in
	 * softirq, where no task is the owner. */
	if (kind == FLOWD_EV_TCP_PASSIVE_ESTABLISHED) {
		/* No task owns an accepted connection yet, but its socket has a cgroup
		 * (the listener's): what a dump would fill in, so the daemon need not
		 * wait for one. */
		e->cgroup_id = flowd_sock_cgroup_id((struct sock *)tp);
		e->flags |= FLOWD_F_SOCK_CGROUP;
	}
	if (kind == FLOWD_EV_TCP_CONNECT) {
		struct flowd_owner *o = bpf_map_lookup_elem(&flowd_owners, &cookie);

		if (o) {
			e->pid = o->pid;
			e->tid = o->tid;
			e->cgroup_id = o->cgroup_id;
			__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
			e->flags |= FLOWD_F_OWNER_VALID;
			bpf_map_delete_elem(&flowd_owners, &cookie);
		}
	}
	bpf_ringbuf_submit(e, 0);
	return 1;
}

/* Sockets get a cookie only when someone asks for one; asking here, before the
 * connect, makes the cookie that sys_exit reads (sk_cookie) the final one, and
 * gives a TCP socket its cookie before its CLOSE->SYN_SENT event, which reads it
 * from the socket where tracing programs cannot call bpf_get_socket_cookie. */
SEC("cgroup/connect4")
int flowd_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_UDP || !flowd_tracing_cookie)
		bpf_get_socket_cookie(ctx);
	return 1;
}

SEC("cgroup/connect6")
int flowd_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_UDP || !flowd_tracing_cookie)
		bpf_get_socket_cookie(ctx);
	return 1;
}

/* Set by userspace before load: what the sys_exit program reports (it is attached
 * for either). Accepted sockets are reported only where sockops gives them a
 * cookie at PASSIVE_ESTABLISHED. */
const volatile __u32 flowd_report_udp_connect = 1;
const volatile __u32 flowd_report_accept = 1;

#if defined(__TARGET_ARCH_x86)
#define FLOWD_NR_ACCEPT 43
#define FLOWD_NR_ACCEPT4 288
#define FLOWD_NR_CONNECT 42
#define FLOWD_SYSCALL_NR(regs) ((regs)->orig_ax)
#define FLOWD_SYSCALL_ARG1(regs) ((regs)->di)
#elif defined(__TARGET_ARCH_arm64)
#define FLOWD_NR_ACCEPT 202
#define FLOWD_NR_ACCEPT4 242
#define FLOWD_NR_CONNECT 203
#define FLOWD_SYSCALL_NR(regs) ((regs)->syscallno)
#define FLOWD_SYSCALL_ARG1(regs) ((regs)->orig_x0)
#endif

/*
 * The sock behind `fd` of the current task, walked with probe reads (the result
 * is not a trusted BTF pointer, hence no bpf_get_socket_cookie on it: sk_cookie
 * is read). NULL if `fd` is no longer a socket.
 */
static __always_inline struct sock *flowd_fd_sock(unsigned int fd)
{
	/* Not bpf_get_current_task_btf() (Linux 5.11+): every read below is a CO-RE
	 * probe read anyway. */
	struct task_struct *task = (void *)bpf_get_current_task();
	struct file **fds, *file;
	struct socket *sock;
	unsigned int max_fds;

	max_fds = BPF_CORE_READ(task, files, fdt, max_fds);
	if (fd >= max_fds)
		return NULL;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (bpf_core_read(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	/* The syscall succeeded on this fd, so it is a socket; the back pointer
	 * guards against the fd having been replaced by another thread meanwhile. */
	if (!sock || BPF_CORE_READ(sock, file) != file)
		return NULL;
	return BPF_CORE_READ(sock, sk);
}

/* connect() returned 0 on `sk`: a UDP socket connected or disconnected. */
static __always_inline void flowd_udp_connect(struct sock *sk)
{
	struct flowd_sock_event ev = {};
	__u64 cookie;

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_UDP ||
	    BPF_CORE_READ(sk, sk_type) != SOCK_DGRAM || !flowd_netns_wanted(sk))
		return;
	/* Built on the stack, not in the ring buffer: older verifiers (Linux 6.1)
	 * refuse ring-buffer memory as the value of a map update. */
	ev.ts_ns = bpf_ktime_get_ns();
	ev.kind = FLOWD_EV_UDP_CONNECT;
	ev.newstate = BPF_CORE_READ(sk, __sk_common.skc_state);
	flowd_fill_tuple(&ev, sk);
	flowd_fill_sock_info(&ev, sk);
	flowd_fill_task(&ev, true);
	cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	ev.cookie = cookie;
	if (ev.newstate == FLOWD_TCP_ESTABLISHED) {
		if (cookie)
			bpf_map_update_elem(&flowd_udp_socks, &cookie, &ev, BPF_ANY);
	} else {
		/* connect(AF_UNSPEC): udp_disconnect() has cleared the remote end (and
		 * the port unless bound explicitly); report the tuple that was connected,
		 * if its connect was seen, else nothing (no tuple to name). */
		struct flowd_sock_event *seen =
			cookie ? bpf_map_lookup_elem(&flowd_udp_socks, &cookie) : NULL;

		if (!seen)
			return;
		__builtin_memcpy(ev.saddr, seen->saddr, sizeof(ev.saddr));
		__builtin_memcpy(ev.daddr, seen->daddr, sizeof(ev.daddr));
		ev.sport = seen->sport;
		ev.dport = seen->dport;
		ev.oldstate = FLOWD_TCP_ESTABLISHED;
		bpf_map_delete_elem(&flowd_udp_socks, &cookie);
	}
	if (bpf_ringbuf_output(&flowd_events, &ev, sizeof(ev), 0))
		flowd_count_drop();
}

/* accept() returned `sk`'s fd: who took the connection, and its inode, which
 * the softirq that established it could not know. */
static __always_inline void flowd_tcp_accept(struct sock *sk)
{
	struct flowd_sock_event *e;
	__u64 cookie;

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP ||
	    BPF_CORE_READ(sk, sk_type) != SOCK_STREAM || !flowd_netns_wanted(sk))
		return;
	/* Asked for at PASSIVE_ESTABLISHED (sockops): without it, no key to join on. */
	cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	if (!cookie)
		return;
	e = flowd_reserve();
	if (!e)
		return;
	e->kind = FLOWD_EV_TCP_ACCEPT;
	e->newstate = BPF_CORE_READ(sk, __sk_common.skc_state);
	flowd_fill_tuple(e, sk);
	flowd_fill_sock_info(e, sk);
	flowd_fill_task(e, true);
	e->cookie = cookie;
	bpf_ringbuf_submit(e, 0);
}

/*
 * UDP connect: no tracepoint sits in ip4/ip6_datagram_connect (they store sk_state
 * directly), and kprobes/fentry are refused, so catch the return of connect(2).
 * accept(2), for the same reason: the accepted socket gets its struct socket
 * there, after every TCP hook has run. Runs on every syscall exit of the host:
 * a failed call returns at the first compare, the others after the number's.
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(flowd_sys_exit, struct pt_regs *regs, long ret)
{
#ifdef FLOWD_NR_CONNECT
	struct sock *sk;
	long nr;

	if (ret < 0)
		return 0;
	nr = FLOWD_SYSCALL_NR(regs);
	if (nr == FLOWD_NR_CONNECT && ret == 0 && flowd_report_udp_connect) {
		sk = flowd_fd_sock(FLOWD_SYSCALL_ARG1(regs));
		if (sk)
			flowd_udp_connect(sk);
	} else if ((nr == FLOWD_NR_ACCEPT || nr == FLOWD_NR_ACCEPT4) && flowd_report_accept) {
		sk = flowd_fd_sock(ret);
		if (sk)
			flowd_tcp_accept(sk);
	}
#endif
	return 0;
}

/* Release (last close) of a UDP socket whose connect() was seen (entry in
 * flowd_udp_socks); others have no known tuple here, sock_diag covers them. */
SEC("cgroup/sock_release")
int flowd_sock_release(struct bpf_sock *ctx)
{
	struct flowd_sock_event *e, *seen;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_UDP)
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	seen = bpf_map_lookup_elem(&flowd_udp_socks, &cookie);
	if (!seen)
		return 1;
	e = bpf_ringbuf_reserve(&flowd_events, sizeof(*e), 0);
	if (!e) {
		flowd_count_drop();
		return 1;
	}
	__builtin_memcpy(e, seen, sizeof(*e));
	bpf_map_delete_elem(&flowd_udp_socks, &cookie);
	e->ts_ns = bpf_ktime_get_ns();
	e->kind = FLOWD_EV_UDP_RELEASE;
	e->oldstate = FLOWD_TCP_ESTABLISHED;
	e->newstate = FLOWD_TCP_CLOSE;
	/* Release runs from close()/exit() of the last holder, or from a deferred fput
	 * in a kernel thread: the task is the owner unless it is a kthread. Where this
	 * program type may not ask (flowd_release_owner == 0), the connecting task
	 * recorded at connect() stands in. */
	if (flowd_release_owner) {
		e->flags = FLOWD_F_SOCK_INFO;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
		flowd_fill_task(e, !(bpf_get_current_task_btf()->flags & PF_KTHREAD));
	}
	bpf_ringbuf_submit(e, 0);
	return 1;
}
