/* A virtio 1.x driver for the modern PCI transport with split virtqueues. */
#ifndef STRATO_GUEST_VIRTIO_H
#define STRATO_GUEST_VIRTIO_H

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* Transport features. */
#define VIRTIO_F_INDIRECT_DESC (1UL << 28)
#define VIRTIO_F_EVENT_IDX (1UL << 29)
#define VIRTIO_F_VERSION_1 (1UL << 32)
#define VIRTIO_F_ACCESS_PLATFORM (1UL << 33)

/* Device types (virtio ids). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

#define VIRTIO_MSI_NO_VECTOR 0xffff

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[]; /* then used_event */
};
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct virtq_used_elem {
	u32 id;
	u32 len;
};
struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[]; /* then avail_event */
};
#define VIRTQ_USED_F_NO_NOTIFY 1

#define VQ_MAX_SIZE 256
#define VQ_MAX_INDIRECT 16

/* One element of a request: a guest-physical buffer (identity mapped). */
struct vbuf {
	const void *addr;
	u32 len;
};

struct virtio_dev;

struct virtq {
	struct virtio_dev *dev;
	u16 index;
	u16 size;
	bool ready;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	u16 free_head, num_free;
	u16 avail_idx;   /* next avail slot (shadow of avail->idx) */
	u16 kicked_idx;  /* avail_idx at the last notification decision */
	u16 last_used;
	u64 notify_addr;
	u16 msix_entry;  /* VIRTIO_MSI_NO_VECTOR in polling mode */
	u8 vector;       /* CPU vector of that entry, 0 if none */
	void **tokens;
	struct virtq_desc *indirect; /* VQ_MAX_INDIRECT descriptors per head */
	u64 notifications, completions, bad_used;
};

struct virtio_dev {
	struct pci_dev *pci;
	u32 type;
	u64 common, notify, isr, devcfg;
	u32 notify_mult, notify_len, devcfg_len;
	u8 msix_cap;
	u16 msix_size;
	u64 msix_table, msix_pba;
	bool msix;        /* MSI-X enabled and vectors assigned */
	u64 dev_features, features;
	u16 num_queues;
	u16 config_entry; /* MSI-X entry for config changes */
	u8 config_vector;
	u8 vec_base, vec_count; /* CPU vectors owned by this device */
	struct virtq *vq;
	int nvq;
	char err[96];     /* why setup failed */
};

/* Common configuration structure offsets (virtio 1.x, 4.1.4.3). */
#define VCOMMON_DFSELECT 0
#define VCOMMON_DF 4
#define VCOMMON_GFSELECT 8
#define VCOMMON_GF 12
#define VCOMMON_MSIX 16
#define VCOMMON_NUMQ 18
#define VCOMMON_STATUS 20
#define VCOMMON_CFGGEN 21
#define VCOMMON_Q_SELECT 22
#define VCOMMON_Q_SIZE 24
#define VCOMMON_Q_MSIX 26
#define VCOMMON_Q_ENABLE 28
#define VCOMMON_Q_NOFF 30
#define VCOMMON_Q_DESCLO 32
#define VCOMMON_Q_DESCHI 36
#define VCOMMON_Q_AVAILLO 40
#define VCOMMON_Q_AVAILHI 44
#define VCOMMON_Q_USEDLO 48
#define VCOMMON_Q_USEDHI 52

#define MAX_VIRTIO 16
extern struct virtio_dev virtio_devs[MAX_VIRTIO];
extern int virtio_count;

void virtio_probe(void); /* find virtio devices among the PCI devices */
struct virtio_dev *virtio_find(u32 type, int nth);
const char *virtio_type_name(u32 type);
/* Reset, negotiate (wanted & offered), set up nq queues (MSI-X or polling), DRIVER_OK. */
bool virtio_setup(struct virtio_dev *d, u64 wanted, int nq, u16 max_qsize);
u64 virtio_offered(struct virtio_dev *d); /* device features, read after a reset */
extern bool vector_given[256];
void virtio_reset(struct virtio_dev *d);
u8 virtio_cfg_read8(struct virtio_dev *d, u32 off);
u16 virtio_cfg_read16(struct virtio_dev *d, u32 off);
u32 virtio_cfg_read32(struct virtio_dev *d, u32 off);
u64 virtio_cfg_read64(struct virtio_dev *d, u32 off);
bool virtio_has(struct virtio_dev *d, u64 feature);
void msix_mask(struct virtio_dev *d, u16 entry, bool masked);
bool msix_pending(struct virtio_dev *d, u16 entry);

/* Split virtqueue. */
bool vq_add(struct virtq *q, const struct vbuf *out, int nout, const struct vbuf *in, int nin,
	    void *token, bool indirect);
void vq_kick(struct virtq *q);
void *vq_get(struct virtq *q, u32 *len);
bool vq_has_used(struct virtq *q);
bool vq_wait(struct virtq *q, u64 deadline); /* until a used buffer is there */
void *vq_wait_get(struct virtq *q, u32 *len, u64 deadline);
bool vq_can_indirect(struct virtq *q);

#endif
