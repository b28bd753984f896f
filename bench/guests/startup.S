/* The start-up benchmark's guest: the smallest PVH program that prints a line and stops.
 *
 * `pvh_common.S` (tests/guests) supplies the PVH note, the entry, COM1 output and the i8042
 * reset. `main` prints one line, then writes to port 0xf4: QEMU's isa-debug-exit (the only way
 * out of `-M microvm`, which has no reset port) exits there with status 1; where nothing
 * listens (strato, or QEMU without the device) the write is ignored and the i8042 reset that
 * follows stops the VM (`--no-reboot` / `-no-reboot`: exit status 0).
 * Output:
 *   STARTUP hello
 */
    .include "pvh_common.S"

main:
    PUTS "STARTUP hello\n"
    xor %eax, %eax
    out %al, $0xf4
    ret
