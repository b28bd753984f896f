/* ACPI tables: RSDP -> XSDT (or RSDT) -> a table by signature; the FADT's DSDT. */
#include "guest.h"

static bool checksum_ok(const void *p, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum += ((const u8 *)p)[i];
	return sum == 0;
}

static const u8 *find_rsdp(void)
{
	if (boot_rsdp && boot_rsdp < 4 * GiB && !memcmp((void *)boot_rsdp, "RSD PTR ", 8))
		return (const u8 *)boot_rsdp;
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((void *)a, "RSD PTR ", 8) && checksum_ok((void *)a, 20))
			return (const u8 *)a;
	return NULL;
}

static const struct acpi_header *table_at(u64 addr)
{
	if (!addr || addr >= 4 * GiB)
		return NULL;
	const struct acpi_header *t = (const void *)addr;
	if (t->length < sizeof(*t) || t->length > 1 * MiB)
		return NULL;
	return t;
}

const struct acpi_header *acpi_find_table(const char *sig)
{
	const u8 *rsdp = find_rsdp();
	if (!rsdp)
		return NULL;
	u64 root;
	int entry_size;
	if (rsdp[15] >= 2 && *(const u64 *)(rsdp + 24)) {
		root = *(const u64 *)(rsdp + 24); /* XSDT */
		entry_size = 8;
	} else {
		root = *(const u32 *)(rsdp + 16); /* RSDT */
		entry_size = 4;
	}
	const struct acpi_header *rh = table_at(root);
	if (!rh || rh->length > 64 * KiB)
		return NULL;
	const struct acpi_header *fadt = NULL;
	u32 n = (rh->length - (u32)sizeof(*rh)) / (u32)entry_size;
	for (u32 i = 0; i < n; i++) {
		const u8 *e = (const u8 *)rh + sizeof(*rh) + i * (u32)entry_size;
		const struct acpi_header *t = table_at(entry_size == 8 ? *(const u64 *)e : *(const u32 *)e);
		if (!t)
			continue;
		if (!memcmp(t->sig, sig, 4))
			return t;
		if (!memcmp(t->sig, "FACP", 4))
			fadt = t;
	}
	/* The DSDT is not in the XSDT: the FADT points at it (X_DSDT, else DSDT). */
	if (fadt && !memcmp(sig, "DSDT", 4)) {
		const u8 *f = (const u8 *)fadt;
		u64 x = fadt->length >= 148 ? *(const u64 *)(f + 140) : 0;
		return table_at(x ? x : *(const u32 *)(f + 40));
	}
	return NULL;
}
