/* TEST lines, the DONE line, and how the run ends. */
#include "guest.h"

int tests_passed, tests_failed, tests_skipped;
static char failed_names[96]; /* for the console summary */

void test_result(const char *name, bool pass, const char *fmt, ...)
{
	char detail[320];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	/* One line per result, whatever the detail holds. */
	for (char *p = detail; *p; p++)
		if (*p == '\n' || *p == '\r' || (u8)*p < 0x20 || (u8)*p > 0x7e)
			*p = '?';
	if (pass) {
		tests_passed++;
	} else {
		tests_failed++;
		usize n = strlen(failed_names);
		snprintf(failed_names + n, sizeof(failed_names) - n, "%s%s", n ? "," : "", name);
	}
	printf("TEST %s %s %s\n", name, pass ? "PASS" : "FAIL", detail);
}

/* A check that did not run, and why: neither a pass nor a failure. */
void test_skip(const char *name, const char *fmt, ...)
{
	char detail[320];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	tests_skipped++;
	printf("TEST %s SKIP %s\n", name, detail);
}

/* Checks that wait for the host run by default only with host=1; named in tests= they always
 * run. A default run without host=1 says so instead of waiting for input nobody sends. */
bool host_check_selected(const char *name, const char *waits_for)
{
	if (test_explicit(name) || (cfg.host_answers && test_selected(name)))
		return true;
	if (test_selected(name))
		test_skip(name, "waits for %s: run with host=1 or tests=%s", waits_for, name);
	return false;
}

/*
 * Success: i8042 reset (QEMU -no-reboot and strato --no-reboot exit 0), or ACPI S5 after a
 * passing power check or with end=poweroff (the default for an empty command line).
 * Failure: isa-debug-exit at 0xf4 (QEMU exits 3), then a triple fault
 * (strato reports a crash).
 */
void finish(void)
{
	printf("DONE pass=%d fail=%d skip=%d\n", tests_passed, tests_failed, tests_skipped);
	char note[224];
	snprintf(note, sizeof(note),
		 "strato-guest: DONE pass=%d fail=%d skip=%d%s%s (TEST lines on the serial port)\n",
		 tests_passed, tests_failed, tests_skipped, tests_failed ? " failed=" : "",
		 failed_names);
	console_note(note);
	serial_drain();
	if (tests_failed == 0 && (power_off_at_end || cfg.end_poweroff))
		acpi_power_off(); /* returns only if the VM is still running */
	if (tests_failed == 0) {
		outb(0x64, 0xfe);
		delay_us(100000);
		outb(0xcf9, 0x02); /* if there is no i8042: the PCI reset control register */
		outb(0xcf9, 0x06);
		delay_us(100000);
		sys_park();
	}
	outb(DEBUG_EXIT_PORT, EXIT_TESTS_FAILED);
	sys_triple_fault();
}

void fatal(const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	printf("FATAL %s\n", msg);
	tests_failed++;
	finish();
}
