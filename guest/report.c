/* TEST lines, the DONE line, and how the run ends. */
#include "guest.h"

int tests_passed, tests_failed;

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
	if (pass)
		tests_passed++;
	else
		tests_failed++;
	printf("TEST %s %s %s\n", name, pass ? "PASS" : "FAIL", detail);
}

/*
 * Success: i8042 reset (QEMU -no-reboot and strato --no-reboot exit 0).
 * Failure: isa-debug-exit at 0xf4 (QEMU exits 3), then a triple fault
 * (strato reports a crash).
 */
void finish(void)
{
	printf("DONE pass=%d fail=%d\n", tests_passed, tests_failed);
	serial_drain();
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
