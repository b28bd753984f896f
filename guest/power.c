/*
 * tests=power: the power button, as Linux's ACPI button driver sees it on a hardware-reduced
 * machine. The DSDT's ACPI0013 Generic Event Device gives the event register (its
 * OperationRegion) and the interrupt (its _CRS Extended Interrupt); the MADT the IOAPIC. The
 * guest routes that interrupt to VEC_GED, prints READY power, waits for the host to press the
 * button, reads the event register (bit 3: power button) and, after DONE, powers off: the
 * FADT's sleep control register (or PM1a control block) with SLP_TYP from \_S5 and SLP_EN.
 */
#include "guest.h"

#define GED_POWER_BUTTON (1 << 3)
#define AML_SCAN 512 /* how far past a name the guest looks for its parts */

bool power_off_at_end;
static u16 sleep_port;
static bool sleep_is_pm1; /* PM1a_CNT (16-bit, SLP_TYP << 10) vs sleep control (8-bit) */
static u8 s5_type;

static const u8 *find_bytes(const u8 *p, const u8 *end, const void *s, usize n)
{
	for (; p + n <= end; p++)
		if (!memcmp(p, s, n))
			return p;
	return NULL;
}

/* An AML integer: ZeroOp, OneOp, Byte/Word/DWord/QWordPrefix. */
static bool aml_integer(const u8 *p, const u8 *end, u64 *v)
{
	static const u8 sizes[] = {[0x0a] = 1, [0x0b] = 2, [0x0c] = 4, [0x0e] = 8};
	if (p >= end)
		return false;
	if (p[0] == 0x00 || p[0] == 0x01) {
		*v = p[0];
		return true;
	}
	if (p[0] > 0x0e || !sizes[p[0]] || p + 1 + sizes[p[0]] > end)
		return false;
	*v = 0;
	for (int i = sizes[p[0]] - 1; i >= 0; i--)
		*v = *v << 8 | p[1 + i];
	return true;
}

/* The GED's register address and interrupt, from the AML after its _HID "ACPI0013". */
static bool find_ged(const struct acpi_header *dsdt, u64 *addr, u32 *irq)
{
	const u8 *start = (const u8 *)dsdt + sizeof(*dsdt), *end = (const u8 *)dsdt + dsdt->length;
	const u8 *hid = find_bytes(start, end, "ACPI0013", 8);
	if (!hid)
		return false;
	const u8 *limit = MIN(end, hid + AML_SCAN);
	/* Extended Interrupt Descriptor: 0x89, length 6, flags, count 1, the GSI. */
	static const u8 ext_irq[] = {0x89, 0x06, 0x00};
	const u8 *d = find_bytes(hid, limit, ext_irq, sizeof(ext_irq));
	if (!d || d + 9 > limit || d[4] < 1)
		return false;
	*irq = *(const u32 *)(d + 5);
	/* OperationRegion (ExtOpPrefix 0x5b, 0x80), a NameSeg, SystemMemory (0), the offset. */
	for (const u8 *p = hid; p + 8 <= limit; p++)
		if (p[0] == 0x5b && p[1] == 0x80 && p[6] == 0x00 && aml_integer(p + 7, limit, addr))
			return *addr >= 3 * GiB && *addr < 4 * GiB; /* mapped uncached by start.S */
	return false;
}

/* SLP_TYP for S5: the first element of the \_S5 package (5 when there is none). */
static u8 find_s5(const struct acpi_header *dsdt)
{
	const u8 *start = (const u8 *)dsdt + sizeof(*dsdt), *end = (const u8 *)dsdt + dsdt->length;
	const u8 *p = find_bytes(start, end, "_S5_", 4);
	u64 v;
	if (!p || p + 6 > end || p[4] != 0x12) /* PackageOp */
		return 5;
	p += 5 + 1 + (p[5] >> 6); /* PkgLength: lead byte and its follow-on bytes */
	p += 1;                    /* NumElements */
	return aml_integer(p, end, &v) ? (u8)v : 5;
}

/* The FADT's sleep control register (hardware-reduced) or its PM1a control block. */
static bool find_sleep_register(void)
{
	const struct acpi_header *fadt = acpi_find_table("FACP");
	if (!fadt)
		return false;
	const u8 *f = (const u8 *)fadt;
	/* SLEEP_CONTROL_REG: a Generic Address Structure at 244 (ACPI 5+), System I/O = 1. */
	if (fadt->length >= 256 && f[244] == 1 && *(const u64 *)(f + 248)) {
		sleep_port = (u16) * (const u64 *)(f + 248);
		sleep_is_pm1 = false;
		return true;
	}
	if (fadt->length >= 68 && *(const u32 *)(f + 64)) {
		sleep_port = (u16) * (const u32 *)(f + 64);
		sleep_is_pm1 = true;
		return true;
	}
	return false;
}

static u64 ioapic_base(void)
{
	const struct acpi_header *madt = acpi_find_table("APIC");
	if (madt && madt->length <= 64 * KiB) {
		const u8 *p = (const u8 *)madt + 44, *end = (const u8 *)madt + madt->length;
		for (; p + 2 <= end && p[1] >= 2 && p + p[1] <= end; p += p[1])
			if (p[0] == 1 && p[1] >= 12 && *(const u32 *)(p + 8) == 0)
				return *(const u32 *)(p + 4); /* the IOAPIC whose GSI base is 0 */
	}
	return 0xfec00000UL;
}

/* Route IOAPIC pin `gsi` to VEC_GED on the BSP: fixed, physical, edge, active high. */
static void ioapic_route(u64 base, u32 gsi)
{
	mmio_write32(base, 0x10 + 2 * gsi + 1);
	mmio_write32(base + 0x10, bsp_apic_id << 24);
	mmio_write32(base, 0x10 + 2 * gsi);
	mmio_write32(base + 0x10, VEC_GED);
}

void power_tests(void)
{
	if (!test_named("power"))
		return;
	const struct acpi_header *dsdt = acpi_find_table("DSDT");
	u64 ged = 0;
	u32 irq = 0;
	if (!dsdt || !find_ged(dsdt, &ged, &irq) || irq >= 24) {
		test_skip("power", "no ACPI Generic Event Device (ACPI0013) in the DSDT");
		return;
	}
	if (!find_sleep_register()) {
		test_result("power", false, "ged=0x%lx irq=%u: the FADT has no sleep control register",
			    ged, irq);
		return;
	}
	s5_type = find_s5(dsdt);
	u64 ioapic = ioapic_base();
	ioapic_route(ioapic, irq);
	u32 before = irq_counts[VEC_GED];
	printf("READY power ged=0x%lx irq=%u\n", ged, irq);
	u64 deadline = deadline_ms(cfg.host_timeout_ms);
	for (;;) {
		u64 seq = irq_seq;
		if (irq_counts[VEC_GED] != before || expired(deadline))
			break;
		wait_for_interrupt(seq);
	}
	u32 irqs = irq_counts[VEC_GED] - before;
	u8 events = mmio_read8(ged); /* reading clears the pending bits */
	bool ok = irqs >= 1 && (events & GED_POWER_BUTTON);
	test_result("power", ok,
		    "ged=0x%lx irq=%u ioapic=0x%lx vector=0x%x irqs=%u events=0x%02x sleep=%s@0x%x "
		    "s5=%u",
		    ged, irq, ioapic, VEC_GED, irqs, events, sleep_is_pm1 ? "pm1a" : "sleep-control",
		    sleep_port, s5_type);
	power_off_at_end = ok;
}

/* S5 as Linux's acpi_hw_legacy_sleep / acpi_hw_extended_sleep write it; returns if ignored. */
void acpi_power_off(void)
{
	if (!sleep_port) {
		const struct acpi_header *dsdt = acpi_find_table("DSDT");
		if (!find_sleep_register()) {
			printf("WARN no ACPI sleep register for S5: resetting instead\n");
			return;
		}
		s5_type = dsdt ? find_s5(dsdt) : 5;
	}
	if (sleep_is_pm1)
		outw(sleep_port, (u16)((s5_type & 7) << 10 | 1 << 13));
	else
		outb(sleep_port, (u8)((s5_type << 2 & 0x1c) | 0x20));
	delay_us(100000);
	printf("WARN still running after S5 (port 0x%x): resetting instead\n", sleep_port);
}
