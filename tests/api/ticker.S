/* A small real-mode guest for the API tests: a 200 Hz clock (the in-kernel PIT through the
 * in-kernel PIC) wakes a halted vCPU; on each tick the guest reports its tick count on port
 * 0x500 and reads the "button" port 0x501: 1 asks it to power off, 2 to reset, through port
 * 0x502. The PIC and PIT are emulated in the kernel, so only the ticker ports reach strato:
 * 400 exits a second whatever the speed of the host. Loaded at 0x1000, cs = 0. */
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    movw $tick, 0x20 * 4            /* IVT entry of vector 0x20 (IRQ0 once remapped) */
    movw $0, 0x20 * 4 + 2
    mov $0x11, %al                  /* master PIC: ICW1..ICW4, vectors 0x20-0x27 */
    out %al, $0x20
    mov $0x20, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xfe, %al                  /* only IRQ0 unmasked */
    out %al, $0x21
    mov $0x11, %al                  /* slave PIC: initialised, all masked */
    out %al, $0xa0
    mov $0x28, %al
    out %al, $0xa1
    mov $0x02, %al
    out %al, $0xa1
    mov $0x01, %al
    out %al, $0xa1
    mov $0xff, %al
    out %al, $0xa1
    mov $0x34, %al                  /* PIT channel 0, mode 2, 1193182 / 5966 = 200 Hz */
    out %al, $0x43
    mov $(5966 & 0xff), %al
    out %al, $0x40
    mov $(5966 >> 8), %al
    out %al, $0x40
    sti
idle:
    hlt
    jmp idle

tick:
    push %ax
    push %dx
    incw ticks
    mov ticks, %ax
    mov $0x500, %dx
    out %ax, %dx
    mov $0x501, %dx
    in %dx, %al
    test %al, %al
    jnz button
    mov $0x20, %al                  /* end of interrupt */
    out %al, $0x20
    pop %dx
    pop %ax
    iret
button:
    mov $0x502, %dx
    out %al, %dx                    /* 1: power off, 2: reset */
1:  cli
    hlt
    jmp 1b

ticks:
    .word 0
