/* virtio-net: transmit, checksum offload, receive, and the network benchmarks. */
#include "guest.h"

#define VIRTIO_NET_F_CSUM (1UL << 0)
#define VIRTIO_NET_F_MAC (1UL << 5)
#define VIRTIO_NET_F_STATUS (1UL << 16)
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_S_LINK_UP 1

#define ETHERTYPE_TEST 0x88b5 /* IEEE "local experimental" */
#define BUF_SIZE 2048
#define NET_HDR_LEN 12        /* struct virtio_net_hdr with num_buffers (VERSION_1) */
#define MAX_FRAME 1514
#define PATTERN_OFFSET 40     /* test frames carry byte k == k & 0xff from here on */
#define VIRTIO_NET_F_CTRL_VQ (1UL << 17)
#define VIRTIO_NET_F_MQ (1UL << 22)
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define VIRTIO_NET_OK 0
#define VIRTIO_NET_ERR 1
#define NET_MAX_PAIRS 8       /* more offered: MQ is not negotiated, one pair is used */
#define MQ_FRAMES 2           /* net-mq: frames per pair, each way */
#define MQ_SPORT 41000        /* net-mq: pair k sends UDP from MQ_SPORT + k to MQ_DPORT + k */
#define MQ_DPORT 42000

struct virtio_net_hdr {
	u8 flags;
	u8 gso_type;
	u16 hdr_len;
	u16 gso_size;
	u16 csum_start;
	u16 csum_offset;
	u16 num_buffers;
} __attribute__((packed));

/* One rx/tx queue pair with its buffers. */
struct net_pair {
	struct virtq *rx, *tx;
	u8 *rxbufs;
	u8 *txbufs;
	u16 nrx, ntx;
	u16 *tx_free; /* stack of free transmit buffers */
	u16 ntx_free;
};

struct net {
	struct virtio_dev *vd;
	struct net_pair pair[NET_MAX_PAIRS];
	int max_pairs;       /* max_virtqueue_pairs with VIRTIO_NET_F_MQ, else 1 */
	struct virtq *ctrl;  /* the control queue (with MQ), else NULL */
	u8 *ctrlbuf;         /* class, command, data, then the ack */
	u8 mac[6];
	char macstr[18];
};

static struct net the_net;
static bool net_ready;

static void post_rx(struct net_pair *p, u16 i)
{
	struct vbuf in = {p->rxbufs + (u64)i * BUF_SIZE, BUF_SIZE};
	vq_add(p->rx, NULL, 0, &in, 1, p->rxbufs + (u64)i * BUF_SIZE, false);
}

/* Buffers for one pair; every rx buffer posted. */
static bool pair_init(struct net_pair *p, struct virtq *rx, struct virtq *tx)
{
	p->rx = rx;
	p->tx = tx;
	p->nrx = rx->size;
	p->ntx = tx->size;
	p->rxbufs = heap_alloc((u64)p->nrx * BUF_SIZE, 4096);
	p->txbufs = heap_alloc((u64)p->ntx * BUF_SIZE, 4096);
	p->tx_free = heap_alloc(2UL * p->ntx, 8);
	if (!p->rxbufs || !p->txbufs || !p->tx_free)
		return false;
	p->ntx_free = 0;
	for (u16 i = 0; i < p->ntx; i++)
		p->tx_free[p->ntx_free++] = i;
	for (u16 i = 0; i < p->nrx; i++)
		post_rx(p, i);
	vq_kick(p->rx);
	return true;
}

static struct net *net_open(char *err, usize errlen)
{
	struct net *n = &the_net;
	if (net_ready)
		return n;
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_NET, 0);
	if (!vd) {
		snprintf(err, errlen, "no virtio-net device");
		return NULL;
	}
	memset(n, 0, sizeof(*n));
	n->vd = vd;
	/* With VIRTIO_NET_F_MQ: every pair's queues, then the control queue (5.1.2). Only pair 0
	 * carries frames until the driver sets more pairs (net-mq does). */
	u64 wanted = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
	int pairs = 1;
	u64 offered = virtio_offered(vd);
	if ((offered & VIRTIO_NET_F_MQ) && (offered & VIRTIO_NET_F_CTRL_VQ)) {
		u16 max = virtio_cfg_read16(vd, 8);
		if (max >= 2 && max <= NET_MAX_PAIRS) {
			pairs = max;
			wanted |= VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ;
		}
	}
	int nq = pairs > 1 ? 2 * pairs + 1 : 2;
	if (!virtio_setup(vd, wanted, nq, 256)) {
		snprintf(err, errlen, "dev=%s setup: %s", pci_name(vd->pci), vd->err);
		return NULL;
	}
	n->max_pairs = virtio_has(vd, VIRTIO_NET_F_MQ) ? pairs : 1;
	if (n->max_pairs > 1) {
		n->ctrl = &vd->vq[2 * n->max_pairs];
		n->ctrlbuf = heap_alloc(64, 64);
	}
	if (virtio_has(vd, VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			n->mac[i] = virtio_cfg_read8(vd, (u32)i);
	} else {
		static const u8 fallback[6] = {0x52, 0x54, 0x00, 0x5a, 0x5a, 0x01};
		memcpy(n->mac, fallback, 6);
	}
	snprintf(n->macstr, sizeof(n->macstr), "%02x:%02x:%02x:%02x:%02x:%02x", n->mac[0],
		 n->mac[1], n->mac[2], n->mac[3], n->mac[4], n->mac[5]);
	bool ok = n->max_pairs == 1 || n->ctrlbuf;
	for (int k = 0; k < n->max_pairs && ok; k++)
		ok = pair_init(&n->pair[k], &vd->vq[2 * k], &vd->vq[2 * k + 1]);
	if (!ok) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	net_ready = true;
	return n;
}

static void tx_reclaim(struct net_pair *n)
{
	u8 *done;
	while ((done = vq_get(n->tx, NULL)) != NULL)
		n->tx_free[n->ntx_free++] = (u16)((done - n->txbufs) / BUF_SIZE);
}

/* A free transmit buffer, reclaiming completed ones; NULL if all are in flight. */
static u8 *tx_buffer(struct net_pair *n)
{
	tx_reclaim(n);
	if (!n->ntx_free)
		return NULL;
	return n->txbufs + (u64)n->tx_free[--n->ntx_free] * BUF_SIZE;
}

static void tx_unget(struct net_pair *n, u8 *buf)
{
	n->tx_free[n->ntx_free++] = (u16)((buf - n->txbufs) / BUF_SIZE);
}

static bool tx_idle(struct net_pair *n)
{
	tx_reclaim(n);
	return n->ntx_free == n->ntx;
}

static bool wait_tx_idle(struct net_pair *n, u64 deadline)
{
	while (!tx_idle(n)) {
		if (!vq_wait(n->tx, deadline))
			return tx_idle(n);
	}
	return true;
}

/* Ethernet header (broadcast destination) + "STRATO-NET-<tag> seq=<n> " + pattern. */
static u32 build_test_frame(struct net *n, u8 *frame, u32 len, const char *tag, u64 seq)
{
	len = MAX(len, 60U);
	len = MIN(len, (u32)MAX_FRAME);
	memset(frame, 0xff, 6);
	memcpy(frame + 6, n->mac, 6);
	frame[12] = ETHERTYPE_TEST >> 8;
	frame[13] = ETHERTYPE_TEST & 0xff;
	for (u32 k = 14; k < len; k++)
		frame[k] = (u8)k;
	char text[PATTERN_OFFSET - 14 + 1];
	int t = snprintf(text, sizeof(text), "STRATO-NET-%s seq=%lu ", tag, seq);
	memcpy(frame + 14, text, (usize)MIN(t, (int)sizeof(text) - 1));
	return len;
}

static bool send_frame(struct net_pair *n, u8 *buf, u32 frame_len)
{
	struct vbuf out = {buf, NET_HDR_LEN + frame_len};
	return vq_add(n->tx, &out, 1, NULL, 0, buf, false);
}

static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)sum;
}

static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += (u32)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		sum += (u32)(p[len - 1] << 8);
	return sum;
}

/* Ethernet (broadcast, from our MAC), IPv4 (192.0.2.1 -> 192.0.2.2, header checksum set) and
 * UDP headers (checksum 0) around `plen` bytes of payload; returns the UDP header. */
static u8 *put_udp_frame(struct net *n, u8 *frame, u16 sport, u16 dport, const void *payload,
			 u32 plen)
{
	u32 udp_len = 8 + plen, ip_len = 20 + udp_len;
	memset(frame, 0xff, 6);
	memcpy(frame + 6, n->mac, 6);
	frame[12] = 0x08;
	frame[13] = 0x00;
	u8 *ip = frame + 14;
	static const u8 src[4] = {192, 0, 2, 1}, dst[4] = {192, 0, 2, 2};
	memset(ip, 0, 20);
	ip[0] = 0x45;
	ip[2] = (u8)(ip_len >> 8);
	ip[3] = (u8)ip_len;
	ip[8] = 64;
	ip[9] = 17;
	memcpy(ip + 12, src, 4);
	memcpy(ip + 16, dst, 4);
	u16 ipsum = (u16)~csum_fold(csum_add(0, ip, 20));
	ip[10] = (u8)(ipsum >> 8);
	ip[11] = (u8)ipsum;
	u8 *udp = ip + 20;
	udp[0] = (u8)(sport >> 8);
	udp[1] = (u8)sport;
	udp[2] = (u8)(dport >> 8);
	udp[3] = (u8)dport;
	udp[4] = (u8)(udp_len >> 8);
	udp[5] = (u8)udp_len;
	udp[6] = udp[7] = 0;
	memcpy(udp + 8, payload, plen);
	return udp;
}

/* An IPv4/UDP frame; the UDP checksum is left to the device when `offload`. */
static u32 build_udp_frame(struct net *n, u8 *frame, struct virtio_net_hdr *h, bool offload)
{
	static const char payload[] = "STRATO-NET-CSUM checksum offload test frame";
	u32 plen = sizeof(payload) - 1;
	u32 udp_len = 8 + plen, ip_len = 20 + udp_len;
	u8 *udp = put_udp_frame(n, frame, 40000, 40001, payload, plen);
	u8 *ip = frame + 14;
	/* Pseudo-header: addresses, protocol, UDP length. */
	u32 pseudo = csum_add(0, ip + 12, 8) + 17 + udp_len;
	memset(h, 0, sizeof(*h));
	u16 check;
	if (offload) {
		/* The device sums from csum_start and stores at csum_start + csum_offset;
		 * the field holds the folded pseudo-header sum meanwhile. */
		check = csum_fold(pseudo);
		h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
		h->csum_start = 14 + 20;
		h->csum_offset = 6;
	} else {
		check = (u16)~csum_fold(csum_add(pseudo, udp, udp_len));
		if (check == 0)
			check = 0xffff;
	}
	udp[6] = (u8)(check >> 8);
	udp[7] = (u8)check;
	return 14 + ip_len;
}

/* ---- multiqueue: the control queue and traffic on every pair ---------------------- */
/* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: header and data in their own buffers (as Linux sends
 * them), then the ack. The device's ack, or 0xff if it never answered. */
static u8 ctrl_pairs_set(struct net *n, u16 pairs)
{
	u8 *b = n->ctrlbuf;
	b[0] = VIRTIO_NET_CTRL_MQ;
	b[1] = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
	b[2] = (u8)pairs;
	b[3] = (u8)(pairs >> 8);
	b[4] = 0xff;
	struct vbuf out[2] = {{b, 2}, {b + 2, 2}};
	struct vbuf in = {b + 4, 1};
	if (!vq_add(n->ctrl, out, 2, &in, 1, b, false))
		return 0xff;
	vq_kick(n->ctrl);
	if (!vq_wait_get(n->ctrl, NULL, deadline_ms(cfg.timeout_ms)))
		return 0xff;
	return b[4];
}

/* IPv4/UDP of flow `pair` (192.0.2.1:MQ_SPORT+pair -> 192.0.2.2:MQ_DPORT+pair), broadcast:
 * the host answers each flow, and the tap's flow steering brings the answers to this pair. */
static u32 build_mq_frame(struct net *n, u8 *frame, int pair, int seq)
{
	char payload[48];
	int plen = snprintf(payload, sizeof(payload), "STRATO-NET-MQ pair=%d seq=%d ", pair, seq);
	u32 ip_len = 20 + 8 + (u32)plen;
	/* no UDP checksum (IPv4 allows it) */
	put_udp_frame(n, frame, (u16)(MQ_SPORT + pair), (u16)(MQ_DPORT + pair), payload, (u32)plen);
	return MAX(14 + ip_len, 60U);
}

/* The pair a host answer names ("STRATO-NET-MQ-RX pair=<k> "), or -1 for other frames. */
static int mq_answer_pair(const u8 *f, u32 flen)
{
	static const char tag[] = "STRATO-NET-MQ-RX pair=";
	const u32 at = 14 + 20 + 8;
	if (flen < at + sizeof(tag) || f[12] != 0x08 || f[13] != 0x00 || f[23] != 17)
		return -1;
	if (memcmp(f + at, tag, sizeof(tag) - 1))
		return -1;
	u8 d = f[at + sizeof(tag) - 1];
	return d >= '0' && d <= '9' ? d - '0' : -1;
}

/*
 * net-mq (only when the device offers VIRTIO_NET_F_MQ): out-of-range pair counts (0, max+1)
 * are refused with VIRTIO_NET_ERR, max pairs accepted with VIRTIO_NET_OK; MQ_FRAMES frames go
 * out on every pair; with the host answering (host=1 or tests=net-mq), READY net-mq asks it to
 * answer each pair's flow, and every pair must receive its answers. Back to one pair at the
 * end, so later checks and benchmarks find every frame on pair 0.
 */
static void net_mq_test(struct net *n, const char *dev)
{
	int pairs = n->max_pairs;
	u8 ack0 = ctrl_pairs_set(n, 0), ack_big = ctrl_pairs_set(n, (u16)(pairs + 1));
	u8 ack = ctrl_pairs_set(n, (u16)pairs);
	bool ctrl_ok = ack0 == VIRTIO_NET_ERR && ack_big == VIRTIO_NET_ERR && ack == VIRTIO_NET_OK;
	u32 tx[NET_MAX_PAIRS] = {0}, rx[NET_MAX_PAIRS] = {0};
	for (int k = 0; k < pairs; k++) {
		struct net_pair *p = &n->pair[k];
		for (int s = 0; s < MQ_FRAMES; s++) {
			u8 *buf = tx_buffer(p);
			if (!buf)
				break;
			memset(buf, 0, NET_HDR_LEN);
			if (!send_frame(p, buf, build_mq_frame(n, buf + NET_HDR_LEN, k, s))) {
				tx_unget(p, buf);
				break;
			}
			tx[k]++;
		}
		vq_kick(p->tx);
	}
	bool tx_ok = true;
	for (int k = 0; k < pairs; k++)
		tx_ok = wait_tx_idle(&n->pair[k], deadline_ms(cfg.timeout_ms)) && tx_ok &&
			tx[k] == MQ_FRAMES;
	bool with_host = cfg.host_answers || test_named("net-mq");
	u32 got = 0, wrong = 0, other = 0;
	bool rx_ok = true;
	if (with_host) {
		printf("READY net-mq mac=%s pairs=%d frames=%d sport=%d dport=%d\n", n->macstr, pairs,
		       MQ_FRAMES, MQ_SPORT, MQ_DPORT);
		/* One pair at a time, sleeping until its interrupt (as net-rx does): a queue that
		 * completes work raises its own vector, which the irq check verifies. */
		u64 deadline = deadline_ms(cfg.host_timeout_ms);
		for (int k = 0; k < pairs; k++) {
			struct net_pair *p = &n->pair[k];
			while (rx[k] < MQ_FRAMES && vq_wait(p->rx, deadline)) {
				u8 *buf;
				u32 len;
				while ((buf = vq_get(p->rx, &len)) != NULL) {
					u32 flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;
					int named = mq_answer_pair(buf + NET_HDR_LEN, flen);
					if (named < 0) {
						other++;
					} else {
						got++;
						rx[k]++;
						wrong += named != k;
					}
					post_rx(p, (u16)((buf - p->rxbufs) / BUF_SIZE));
				}
				vq_kick(p->rx);
			}
		}
		for (int k = 0; k < pairs; k++)
			rx_ok = rx_ok && rx[k] > 0;
		rx_ok = rx_ok && got >= (u32)(pairs * MQ_FRAMES);
	}
	u8 ack1 = ctrl_pairs_set(n, 1);
	char txs[64] = "", rxs[64] = "";
	int tl = 0, rl = 0;
	for (int k = 0; k < pairs; k++) {
		tl += snprintf(txs + tl, sizeof(txs) - (usize)tl, "%s%u", k ? "," : "", tx[k]);
		rl += snprintf(rxs + rl, sizeof(rxs) - (usize)rl, "%s%u", k ? "," : "", rx[k]);
	}
	test_result("net-mq", ctrl_ok && tx_ok && rx_ok && ack1 == VIRTIO_NET_OK,
		    "dev=%s pairs=%d queues=%u ctrl=%s set0=%u set_over=%u set_max=%u set1=%u tx=%s "
		    "rx=%s wrong_pair=%u other=%u",
		    dev, pairs, n->vd->num_queues, ctrl_ok ? "ok" : "bad", ack0, ack_big, ack, ack1,
		    txs, with_host ? rxs : "host", wrong, other);
}

void net_tests(void)
{
	bool want_tx = test_selected("net-tx"), want_csum = test_selected("net-csum");
	bool want_mq = test_selected("net-mq");
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_NET, 0);
	if (!vd) {
		if (test_explicit("net"))
			test_skip("net", "no virtio-net device");
		return;
	}
	bool want_rx = host_check_selected("net-rx", "frames sent by the host to the tap");
	if (!want_tx && !want_csum && !want_rx && !want_mq)
		return;
	char err[128];
	struct net *n = net_open(err, sizeof(err));
	if (!n) {
		test_result("net", false, "%s", err);
		return;
	}
	struct net_pair *p0 = &n->pair[0];
	const char *dev = pci_name(vd->pci);
	u16 status = virtio_has(vd, VIRTIO_NET_F_STATUS) ? virtio_cfg_read16(vd, 6) : 1;
	printf("INFO net dev=%s mac=%s link=%s features=0x%lx offered=0x%lx msix=%d rxq=%u txq=%u "
	       "queues=%u pairs=%d\n",
	       dev, n->macstr, status & VIRTIO_NET_S_LINK_UP ? "up" : "down", vd->features,
	       vd->dev_features, vd->msix, p0->rx->size, p0->tx->size, vd->num_queues,
	       n->max_pairs);

	if (want_tx) {
		static const u32 sizes[] = {60, 128, 1514, 64, 300, 1000, 61, 1514};
		u32 sent = 0;
		u64 bytes = 0;
		for (u32 i = 0; i < ARRAY_SIZE(sizes); i++) {
			u8 *buf = tx_buffer(p0);
			if (!buf)
				break;
			memset(buf, 0, NET_HDR_LEN);
			u32 len = build_test_frame(n, buf + NET_HDR_LEN, sizes[i], "TX", i);
			if (!send_frame(p0, buf, len))
				break;
			sent++;
			bytes += len;
		}
		vq_kick(p0->tx);
		bool done = wait_tx_idle(p0, deadline_ms(cfg.timeout_ms));
		test_result("net-tx", done && sent == ARRAY_SIZE(sizes),
			    "dev=%s frames=%u bytes=%lu mac=%s completed=%d", dev, sent, bytes,
			    n->macstr, done);
	}

	if (want_csum) {
		bool offload = virtio_has(vd, VIRTIO_NET_F_CSUM);
		u8 *buf = tx_buffer(p0);
		u32 len = buf ? build_udp_frame(n, buf + NET_HDR_LEN, (struct virtio_net_hdr *)buf,
						offload)
			      : 0;
		bool ok = buf && send_frame(p0, buf, len);
		vq_kick(p0->tx);
		ok = ok && wait_tx_idle(p0, deadline_ms(cfg.timeout_ms));
		test_result("net-csum", ok, "dev=%s offload=%d bytes=%u", dev, offload, len);
	}

	if (want_rx) {
		/* The host sends frames of ETHERTYPE_TEST with "STRATO-NET-RX seq=<n> "
		 * after it sees this line; everything else on the wire is recycled. */
		printf("READY net-rx mac=%s frames=%lu\n", n->macstr, cfg.net_rx_frames);
		u64 deadline = deadline_ms(cfg.host_timeout_ms);
		u64 got = 0, other = 0, bad = 0, bytes = 0;
		while (got < cfg.net_rx_frames && vq_wait(p0->rx, deadline)) {
			u8 *buf;
			u32 len;
			while ((buf = vq_get(p0->rx, &len)) != NULL) {
				u8 *f = buf + NET_HDR_LEN;
				u32 flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;
				if (flen >= 60 && f[12] == (ETHERTYPE_TEST >> 8) &&
				    f[13] == (ETHERTYPE_TEST & 0xff) &&
				    !memcmp(f + 14, "STRATO-NET-RX", 13)) {
					bool pattern_ok = flen <= MAX_FRAME + 4;
					for (u32 k = PATTERN_OFFSET; k < flen && pattern_ok; k++)
						pattern_ok = f[k] == (u8)k;
					if (pattern_ok) {
						got++;
						bytes += flen;
					} else {
						bad++;
					}
				} else {
					other++;
				}
				post_rx(p0, (u16)((buf - p0->rxbufs) / BUF_SIZE));
			}
			vq_kick(p0->rx);
		}
		test_result("net-rx", got >= cfg.net_rx_frames && bad == 0,
			    "dev=%s frames=%lu bytes=%lu other=%lu corrupt=%lu", dev, got, bytes, other,
			    bad);
	}
	if (want_mq && n->ctrl)
		net_mq_test(n, dev);
	else if (test_named("net-mq"))
		test_skip("net-mq", "dev=%s no VIRTIO_NET_F_MQ (offered=0x%lx, pairs=%u)", dev,
			  vd->dev_features, virtio_cfg_read16(vd, 8));
	if (p0->rx->bad_used || p0->tx->bad_used)
		test_result("net", false, "dev=%s the device returned bad used elements (rx=%lu tx=%lu)",
			    dev, p0->rx->bad_used, p0->tx->bad_used);
}

/* ---- benchmarks: net-tx (size=, qd=), net-rx (host-driven) ------------------------ */
void net_bench(struct bench_cfg *bc)
{
	char err[128];
	struct net *n = net_open(err, sizeof(err));
	if (!n) {
		test_result("bench", false, "%s: %s", bc->name, err);
		return;
	}
	struct net_pair *p0 = &n->pair[0];
	u64 seconds = bc->ops && !bc->seconds ? 0 : bc->seconds;
	if (!strcmp(bc->name, "net-tx")) {
		u32 size = (u32)MIN(MAX(bc->size, 60UL), (u64)MAX_FRAME);
		u64 qd = bc->qd > 1 ? MIN(bc->qd, (u64)p0->ntx) : p0->ntx;
		u64 ops = 0, bytes = 0, inflight_limit = qd, notif0 = p0->tx->notifications;
		u32 irqs0 = p0->tx->vector ? irq_counts[p0->tx->vector] : 0;
		printf("BENCH-START net-tx size=%u qd=%lu irq=%s\n", size, qd,
		       p0->tx->vector ? "msix" : "poll");
		u64 t0 = rdtsc(), end = t0 + ms_to_tsc(seconds * 1000);
		u64 seq = 0;
		for (;;) {
			if ((bc->ops && ops >= bc->ops) || (seconds && expired(end)))
				break;
			u64 batch = 0;
			u8 *buf;
			while (batch < inflight_limit && (!bc->ops || ops + batch < bc->ops) &&
			       (buf = tx_buffer(p0)) != NULL) {
				memset(buf, 0, NET_HDR_LEN);
				u32 len = build_test_frame(n, buf + NET_HDR_LEN, size, "BENCH", seq++);
				if (!send_frame(p0, buf, len)) {
					tx_unget(p0, buf);
					break;
				}
				batch++;
				bytes += len;
			}
			ops += batch;
			vq_kick(p0->tx);
			if (!batch && !vq_wait(p0->tx, deadline_ms(cfg.timeout_ms))) {
				printf("WARN net-tx: transmit queue stalled\n");
				break;
			}
		}
		bool drained = wait_tx_idle(p0, deadline_ms(cfg.timeout_ms));
		u64 us = tsc_to_us(rdtsc() - t0);
		printf("BENCH-END net-tx ops=%lu bytes=%lu guest_us=%lu notifications=%lu irqs=%u\n", ops,
		       bytes, us, p0->tx->notifications - notif0,
		       (p0->tx->vector ? irq_counts[p0->tx->vector] : 0) - irqs0);
		if (!drained)
			test_result("bench", false, "net-tx: frames still in flight at the end");
		return;
	}
	if (!strcmp(bc->name, "net-rx")) {
		/* The host floods frames after READY and ends with a "STRATO-NET-END" frame. */
		printf("READY net-rx-bench mac=%s\n", n->macstr);
		u64 ops = 0, bytes = 0, t0 = 0, end = 0;
		u32 irqs0 = p0->rx->vector ? irq_counts[p0->rx->vector] : 0;
		bool started = false, finished = false;
		u64 idle_deadline = deadline_ms(cfg.host_timeout_ms);
		while (!finished) {
			if (!vq_wait(p0->rx, started && seconds ? MIN(end, idle_deadline) : idle_deadline))
				break;
			u8 *buf;
			u32 len;
			while ((buf = vq_get(p0->rx, &len)) != NULL) {
				u8 *f = buf + NET_HDR_LEN;
				u32 flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;
				if (flen >= 30 && f[12] == (ETHERTYPE_TEST >> 8) &&
				    f[13] == (ETHERTYPE_TEST & 0xff)) {
					if (!memcmp(f + 14, "STRATO-NET-END", 14)) {
						finished = true;
					} else {
						if (!started) {
							printf("BENCH-START net-rx irq=%s\n",
							       p0->rx->vector ? "msix" : "poll");
							started = true;
							t0 = rdtsc();
							end = t0 + ms_to_tsc(seconds * 1000);
						}
						ops++;
						bytes += flen;
					}
				}
				post_rx(p0, (u16)((buf - p0->rxbufs) / BUF_SIZE));
			}
			vq_kick(p0->rx);
			idle_deadline = deadline_ms(cfg.host_timeout_ms);
			if (started && ((seconds && expired(end)) || (bc->ops && ops >= bc->ops)))
				finished = true;
		}
		if (!started)
			printf("BENCH-START net-rx irq=%s\n", p0->rx->vector ? "msix" : "poll");
		u64 us = started ? tsc_to_us(rdtsc() - t0) : 0;
		printf("BENCH-END net-rx ops=%lu bytes=%lu guest_us=%lu irqs=%u\n", ops, bytes, us,
		       (p0->rx->vector ? irq_counts[p0->rx->vector] : 0) - irqs0);
		if (!ops)
			test_result("bench", false, "net-rx: no frame received");
		return;
	}
	test_result("bench", false, "unknown benchmark %s", bc->name);
}
