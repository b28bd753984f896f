/* Touching guest-physical addresses that are not RAM and where no device is, from 32-bit
 * protected mode with paging off. In a 64 MiB VM, 3 GiB - 4 KiB (0xBFFFF000) is above RAM and
 * below the MMIO hole; 0xD0000000 is in the hole. Each access is an MMIO exit that nothing
 * claims: writes are dropped, reads return all-ones, and the VM keeps running. A burst of
 * FLOOD writes then checks that strato's log stays bounded.
 * Output:
 *   HIGH <8>
 *   HOLE <8>
 *   FLOOD done
 *   BYE
 */
    .include "pvh_common.S"

    .set ABOVE_RAM, 0xbffff000
    .set MMIO_HOLE, 0xd0000000
    .set FLOOD, 200

main:
    movl $0xa5a5a5a5, ABOVE_RAM
    PUTS "HIGH "
    mov ABOVE_RAM, %eax
    mov $8, %ecx
    call puthex
    PUTS "\nHOLE "
    mov MMIO_HOLE, %eax
    mov $8, %ecx
    call puthex
    PUTS "\n"

    mov $FLOOD, %ecx
    mov $ABOVE_RAM, %edi
1:  mov %ecx, (%edi)
    add $4, %edi
    loop 1b
    PUTS "FLOOD done\nBYE\n"
    ret
