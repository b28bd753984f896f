/* strato-guest: types, hardware access, and the interfaces between the C files. */
#ifndef STRATO_GUEST_H
#define STRATO_GUEST_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char i8;
typedef int i32;
typedef long i64;
typedef unsigned long usize;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define KiB 1024UL
#define MiB (1024UL * 1024UL)
#define GiB (1024UL * MiB)

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_end(ap) __builtin_va_end(ap)
#define va_arg(ap, type) __builtin_va_arg(ap, type)

/* ---- Port I/O (CPL 3 with IOPL 3) and MMIO ------------------------------ */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Plain mov instructions of the right width: what a VMM's MMIO decoder expects. */
static inline u8 mmio_read8(u64 a)
{
	u8 v;
	__asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
	return v;
}
static inline u16 mmio_read16(u64 a)
{
	u16 v;
	__asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline u32 mmio_read32(u64 a)
{
	u32 v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline void mmio_write8(u64 a, u8 v) { __asm__ volatile("movb %0, (%1)" ::"q"(v), "r"(a) : "memory"); }
static inline void mmio_write16(u64 a, u16 v) { __asm__ volatile("movw %0, (%1)" ::"r"(v), "r"(a) : "memory"); }
static inline void mmio_write32(u64 a, u32 v) { __asm__ volatile("movl %0, (%1)" ::"r"(v), "r"(a) : "memory"); }

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* ---- Syscalls into the few CPL 0 paths in start.S (see layout.h) --------- */
static inline u64 syscall3(u64 nr, u64 a, u64 b, u64 c)
{
	u64 ret;
	__asm__ volatile("call syscall_trap" : "=a"(ret), "+D"(a), "+S"(b), "+d"(c) : "a"(nr) : "rcx", "memory");
	return ret;
}
/* Sleep until an interrupt, unless *word already differs from seen. */
static inline void sys_wait(volatile u64 *word, u64 seen) { syscall3(SYS_WAIT, (u64)word, seen, 0); }
static inline void sys_set_if(bool enabled) { syscall3(SYS_SET_IF, enabled, 0, 0); }
static inline void sys_flush_tlb(void) { syscall3(SYS_FLUSH_TLB, 0, 0, 0); }
static inline void sys_wrmsr(u32 msr, u64 v) { syscall3(SYS_WRMSR, msr, (u32)v, v >> 32); }
static inline u64 sys_rdmsr(u32 msr) { return syscall3(SYS_RDMSR, msr, 0, 0); }
static inline __attribute__((noreturn)) void sys_park(void)
{
	syscall3(SYS_PARK, 0, 0, 0);
	__builtin_unreachable();
}
static inline __attribute__((noreturn)) void sys_triple_fault(void)
{
	syscall3(SYS_TRIPLE_FAULT, 0, 0, 0);
	__builtin_unreachable();
}

/* ---- start.S / linker symbols ---------------------------------------------- */
extern u8 __image_start[], __bss_start[], __bss_end[], _end[];
extern u8 isr_table[], ap_trampoline_start[], ap_trampoline_end[];
extern u64 gdt[], pml4[], pdpt_low[], pd_low[];
extern volatile u32 irq_counts[256]; /* per vector, incremented by the stubs */
extern volatile u64 irq_seq;         /* every device/timer interrupt */

/* ---- lib.c ---------------------------------------------------------------- */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
void *memmove(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, usize n);
bool str_starts(const char *s, const char *prefix);
int vsnprintf(char *buf, usize size, const char *fmt, va_list ap);
int snprintf(char *buf, usize size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
bool parse_u64(const char *s, u64 *out); /* decimal or 0x hex; K/M/G suffixes */
u64 rand64(u64 *state);                  /* xorshift64* */
u32 pattern_word(u32 seed, u64 sector, u32 index);

/* Bump allocator over the RAM after the image (identity mapped). */
void heap_init(u64 start, u64 end);
void *heap_alloc(u64 size, u64 align); /* zeroed; NULL when exhausted */
u64 heap_free_bytes(void);

/* ---- serial.c: COM1, polled ---------------------------------------------- */
#define COM1 0x3f8
void serial_init(void);
void serial_write(const char *s, usize n);
void serial_drain(void);

/* ---- time.c: TSC ---------------------------------------------------------- */
extern u64 tsc_khz;
extern const char *tsc_source;
void time_init(void);
static inline u64 ms_to_tsc(u64 ms) { return ms * tsc_khz; }
static inline u64 deadline_ms(u64 ms) { return rdtsc() + ms_to_tsc(ms); }
static inline bool expired(u64 deadline) { return (i64)(rdtsc() - deadline) >= 0; }
u64 tsc_to_us(u64 ticks);
void delay_us(u64 us);

/* ---- cmdline.c ------------------------------------------------------------- */
#define MAX_BENCHES 8
struct bench_cfg {
	char name[32];
	u64 qd, bs, seconds, ops, size, indirect, region;
	u64 port, addr; /* pio-exits / mmio-exits targets (0: the default) */
};
struct config {
	char cmdline[1024];
	char tests[256];   /* comma list; empty = everything that finds its device */
	bool tests_given;
	bool irq_msix;     /* irq=msix (default) or irq=poll */
	u64 cpus;          /* cpus=N: try APIC IDs 1..N-1 (0 = use ACPI MADT) */
	u64 timeout_ms;    /* one device operation */
	u64 host_timeout_ms; /* waiting for the host (READY lines) */
	u64 net_rx_frames;
	u64 bar64;          /* move 64-bit BARs here (testing high MMIO) */
	char fault[8];      /* raise this exception on purpose (testing the crash path) */
	bool verbose;
	bool host_answers;  /* host=1: checks that wait for the host run by default too */
	bool end_poweroff;  /* end=poweroff: a passing run ends in S5 instead of a reset */
	int nbench;
	struct bench_cfg bench[MAX_BENCHES];
};
extern struct config cfg;
void cmdline_parse(const char *cmdline);
bool test_selected(const char *name);
bool test_explicit(const char *name); /* named in tests= (not by default) */
bool test_named(const char *name);    /* named itself: not by "all" or a family */

/* ---- report.c: TEST lines ---------------------------------------------------- */
extern int tests_passed, tests_failed, tests_skipped;
void test_result(const char *name, bool pass, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void test_skip(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool host_check_selected(const char *name, const char *waits_for);
__attribute__((noreturn)) void finish(void);
__attribute__((noreturn)) void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- boot info (main.c) ----------------------------------------------------- */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};
struct hvm_memmap_entry {
	u64 addr, size;
	u32 type, reserved;
};
#define HVM_START_MAGIC 0x336ec578
extern u64 boot_rsdp;
extern u32 bsp_apic_id;

/* ---- acpi.c ------------------------------------------------------------------ */
struct acpi_header {
	char sig[4];
	u32 length;
	u8 revision, checksum;
	char oem[6], oem_table[8];
	u32 oem_rev, creator, creator_rev;
} __attribute__((packed));
const struct acpi_header *acpi_find_table(const char *sig); /* "APIC", "FACP", "DSDT", ... */

/* ---- paging.c ------------------------------------------------------------- */
bool map_mmio(u64 addr, u64 size); /* identity, uncached, user-accessible */

/* ---- lapic.c ---------------------------------------------------------------- */
#define LAPIC_BASE 0xfee00000UL
void pic_disable(void);
void lapic_init(void);
u32 lapic_id(void);
void wait_for_interrupt(u64 seen_seq); /* sleep unless irq_seq moved past seen_seq */

/* ---- pci.c ------------------------------------------------------------------ */
struct pci_bar {
	u64 addr, size;
	bool io, is64, prefetch;
};
struct pci_dev {
	u8 bus, dev, fn, hdr;
	u16 vendor, device, subsys_vendor, subsys;
	u8 class, subclass, progif, rev;
	struct pci_bar bar[6];
	bool claimed;
};
#define MAX_PCI 64
extern struct pci_dev pci_devs[MAX_PCI];
extern int pci_count;
u32 pci_read32(struct pci_dev *d, u8 off);
u16 pci_read16(struct pci_dev *d, u8 off);
u8 pci_read8(struct pci_dev *d, u8 off);
void pci_write32(struct pci_dev *d, u8 off, u32 v);
void pci_write16(struct pci_dev *d, u8 off, u16 v);
void pci_write8(struct pci_dev *d, u8 off, u8 v);
u8 pci_find_cap(struct pci_dev *d, u8 id, u8 start);
void pci_scan(void);
void pci_test(void);
const char *pci_name(struct pci_dev *d); /* "BB:DD.F" (static buffer per device) */

/* ---- virtio (virtio.c) -------------------------------------------------- */
#include "virtio.h"

/* ---- device tests and benchmarks ---------------------------------------- */
void blk_tests(void);
void net_tests(void);
void rng_tests(void);
void console_tests(void);
void console_note(const char *line); /* a line on the virtio console, once it is set up */
void irq_tests(void);
void smp_tests(void);
void reboot_tests(void); /* tests=reboot: a marker on the disk survives a reset */
void highmem_tests(void); /* tests=highmem: RAM above 4 GiB */
void memmap_save(struct hvm_start_info *si);
void power_tests(void); /* tests=power: the GED power button, then S5 at the end */
extern bool power_off_at_end;
void acpi_power_off(void);
void run_bench(struct bench_cfg *b);
void blk_bench(struct bench_cfg *b);
void net_bench(struct bench_cfg *b);
bool exits_bench(struct bench_cfg *b); /* pio-exits, mmio-exits, idle; false: not one */
bool faults_bench(struct bench_cfg *b); /* blk-flushstorm, serial-flood; false: not one */
__attribute__((noreturn)) void ap_main(u64 index);

#endif
