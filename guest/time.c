/*
 * TSC frequency, from the first source that answers: the hypervisor's CPUID
 * leaf 0x40000010, kvmclock's scale factors, a 10 ms PIT channel 2 gate, or a
 * guess. The host timestamps benchmark lines itself; the guest only needs the
 * TSC to bound its waits and to size time-based benchmarks.
 */
#include "guest.h"

u64 tsc_khz;
const char *tsc_source = "none";

static bool from_cpuid_leaf(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (a < 0x40000010 || a > 0x400000ff)
		return false;
	cpuid(0x40000010, 0, &a, &b, &c, &d);
	if (a == 0)
		return false;
	tsc_khz = a;
	tsc_source = "cpuid";
	return true;
}

struct pvclock {
	u32 version, pad0;
	u64 tsc_timestamp, system_time;
	u32 tsc_to_system_mul;
	i8 tsc_shift;
	u8 flags, pad[2];
} __attribute__((packed));

static struct pvclock kvmclock __attribute__((aligned(64)));

static bool from_kvmclock(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	/* "KVMKVMKVM\0\0\0" */
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d)
		return false;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	if (!(a & (1 << 3))) /* KVM_FEATURE_CLOCKSOURCE2 */
		return false;
	sys_wrmsr(0x4b564d01, (u64)&kvmclock | 1); /* MSR_KVM_SYSTEM_TIME_NEW */
	u64 spins = 1000000;
	while (*(volatile u32 *)&kvmclock.tsc_to_system_mul == 0 && spins--)
		cpu_relax();
	u32 mul = *(volatile u32 *)&kvmclock.tsc_to_system_mul;
	i8 shift = *(volatile i8 *)&kvmclock.tsc_shift;
	sys_wrmsr(0x4b564d01, 0); /* stop the updates */
	if (mul == 0)
		return false;
	/* ns = ((tsc << shift) * mul) >> 32, so Hz = 1e9 * 2^32 / mul / 2^shift */
	u64 khz = (1000000UL << 32) / mul;
	if (shift > 0)
		khz >>= shift;
	else
		khz <<= -shift;
	if (khz < 100000)
		return false;
	tsc_khz = khz;
	tsc_source = "kvmclock";
	return true;
}

static bool from_pit(void)
{
	/* Channel 2, mode 0, gate through port 0x61, speaker off: count 11932 = 10 ms. */
	u8 p61 = inb(0x61);
	if (p61 == 0xff)
		return false;
	outb(0x61, (p61 & ~0x02) | 0x01);
	outb(0x43, 0xb0);
	outb(0x42, 11932 & 0xff);
	outb(0x42, 11932 >> 8);
	u64 t0 = rdtsc();
	u64 loops = 0;
	bool fired = false;
	/* Bounded twice: by reads, and by ~2-5 s of TSC whatever its rate. */
	while (loops < 5000000 && rdtsc() - t0 < 10000000000UL) {
		loops++;
		if (inb(0x61) & 0x20) {
			fired = true;
			break;
		}
	}
	u64 t1 = rdtsc();
	outb(0x61, p61);
	if (!fired)
		return false;
	u64 khz = (t1 - t0) / 10;
	if (khz < 100000 || loops < 2)
		return false;
	tsc_khz = khz;
	tsc_source = "pit";
	return true;
}

void time_init(void)
{
	if (from_cpuid_leaf() || from_kvmclock() || from_pit())
		return;
	tsc_khz = 2000000;
	tsc_source = "guess";
}

u64 tsc_to_us(u64 ticks)
{
	return ticks * 1000 / tsc_khz;
}

void delay_us(u64 us)
{
	u64 end = rdtsc() + us * tsc_khz / 1000;
	while (!expired(end))
		cpu_relax();
}
