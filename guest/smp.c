/*
 * Application processors: INIT-SIPI-SIPI through the local APIC (from CPL 3),
 * a real-mode trampoline at AP_TRAMPOLINE, then the same long-mode path as the
 * BSP (start.S) and ap_main() at CPL 3, which reports the APIC ID and parks.
 */
#include "guest.h"

#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310

static volatile u32 ap_apic_id[MAX_CPUS];
static volatile u64 ap_result[MAX_CPUS];
static volatile u32 ap_started;

__attribute__((noreturn)) void ap_main(u64 index)
{
	/* Some native CPL 3 work, checked by the BSP: sum of 0..99999. */
	u64 sum = 0;
	for (volatile u64 i = 0; i < 100000; i++)
		sum += i;
	if (index < MAX_CPUS) {
		ap_apic_id[index] = lapic_id();
		ap_result[index] = sum;
	}
	__atomic_add_fetch(&ap_started, 1, __ATOMIC_SEQ_CST);
	sys_park();
}

/* APIC IDs of the enabled processors in the ACPI MADT, BSP excluded. */
static int madt_apic_ids(u32 *ids, int max)
{
	const struct acpi_header *t = acpi_find_table("APIC");
	if (!t || t->length > 64 * KiB)
		return -1;
	int count = 0;
	const u8 *p = (const u8 *)t + 44, *end = (const u8 *)t + t->length;
	while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
		u32 id = 0xffffffff, flags = 0;
		if (p[0] == 0 && p[1] >= 8) { /* processor local APIC */
			id = p[3];
			flags = *(const u32 *)(p + 4);
		} else if (p[0] == 9 && p[1] >= 16) { /* processor local x2APIC */
			id = *(const u32 *)(p + 4);
			flags = *(const u32 *)(p + 8);
		}
		if (id != 0xffffffff && (flags & 1) && id != bsp_apic_id && count < max)
			ids[count++] = id;
		p += p[1];
	}
	return count;
}

static bool icr_idle(void)
{
	u64 end = deadline_ms(100);
	while (mmio_read32(LAPIC_BASE + LAPIC_ICR_LO) & (1 << 12)) /* delivery pending */
		if (expired(end))
			return false;
	return true;
}

static void send_ipi(u32 apic_id, u32 low)
{
	mmio_write32(LAPIC_BASE + LAPIC_ICR_HI, apic_id << 24);
	mmio_write32(LAPIC_BASE + LAPIC_ICR_LO, low);
	icr_idle();
}

void smp_tests(void)
{
	if (!test_selected("smp"))
		return;
	u32 ids[MAX_CPUS];
	int n;
	const char *source;
	if (cfg.cpus) {
		n = 0;
		for (u32 id = 0; id < cfg.cpus + 1 && n < (int)cfg.cpus - 1 && n < MAX_CPUS - 1; id++)
			if (id != bsp_apic_id)
				ids[n++] = id;
		source = "cmdline";
	} else {
		n = madt_apic_ids(ids, MAX_CPUS - 1);
		source = "madt";
	}
	if (n <= 0) {
		if (test_explicit("smp"))
			test_skip("smp", "only the BSP found (source=%s)", source);
		return;
	}
	/* The trampoline must sit below 1 MiB at a page boundary (SIPI vector = page). */
	memcpy((void *)AP_TRAMPOLINE, ap_trampoline_start,
	       (usize)(ap_trampoline_end - ap_trampoline_start));
	mb();
	for (int i = 0; i < n; i++) {
		send_ipi(ids[i], 0x4500); /* INIT, level assert */
	}
	delay_us(10000);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < n; i++)
			send_ipi(ids[i], 0x4600 | (AP_TRAMPOLINE >> 12)); /* STARTUP */
		delay_us(200);
	}
	u64 end = deadline_ms(cfg.timeout_ms);
	while (ap_started < (u32)n && !expired(end))
		cpu_relax();
	u32 started = ap_started;
	char list[128];
	int len = snprintf(list, sizeof(list), "%u", bsp_apic_id);
	bool ok = started == (u32)n;
	for (u32 i = 1; i <= started && i < MAX_CPUS; i++) {
		len += snprintf(list + len, sizeof(list) - (usize)MIN(len, (int)sizeof(list)), ",%u",
				ap_apic_id[i]);
		if (ap_result[i] != 4999950000UL)
			ok = false;
	}
	test_result("smp", ok, "cpus=%u apic_ids=%s expected=%d source=%s", started + 1, list, n + 1,
		    source);
}
