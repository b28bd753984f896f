/* COM1, a 16550 UART driven by polling (no interrupts). */
#include "guest.h"

#define UART_THR 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20 /* transmit FIFO empty: 16 bytes may follow */
#define LSR_TEMT 0x40
#define FIFO_DEPTH 16

void serial_init(void)
{
	outb(COM1 + UART_IER, 0x00);
	outb(COM1 + UART_LCR, 0x80); /* DLAB: divisor 1 = 115200 baud */
	outb(COM1 + 0, 0x01);
	outb(COM1 + 1, 0x00);
	outb(COM1 + UART_LCR, 0x03); /* 8N1 */
	outb(COM1 + UART_FCR, 0x07); /* enable and clear the FIFOs */
	outb(COM1 + UART_MCR, 0x03); /* DTR, RTS; OUT2 off: no interrupts */
}

static void wait_thre(void)
{
	/* A UART that never reports an empty FIFO must not hang the guest. */
	for (u32 i = 0; i < 1000000; i++) {
		u8 lsr = inb(COM1 + UART_LSR);
		if (lsr & LSR_THRE || lsr == 0xff)
			return;
		cpu_relax();
	}
}

void serial_write(const char *s, usize n)
{
	while (n) {
		wait_thre();
		usize burst = MIN(n, (usize)FIFO_DEPTH);
		for (usize i = 0; i < burst; i++)
			outb(COM1 + UART_THR, (u8)s[i]);
		s += burst;
		n -= burst;
	}
}

void serial_drain(void)
{
	for (u32 i = 0; i < 1000000; i++) {
		u8 lsr = inb(COM1 + UART_LSR);
		if ((lsr & (LSR_THRE | LSR_TEMT)) == (LSR_THRE | LSR_TEMT) || lsr == 0xff)
			return;
		cpu_relax();
	}
}
