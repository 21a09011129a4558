/*
 * The libvirt tests' guest: a 512-byte boot sector, no OS. Assembled by tests/libvirt_harness/guest.py with
 *   as --32 --defsym MEM_KIB=<n> --defsym DISK_SECTORS=<n> --defsym PACE=<0|1> [--defsym SUBTICKS=<2^n>] ...
 *
 * Each pass of its loop:
 *   - writes the pass number into one dword of MEM_KIB KiB worth of 4 KiB pages: MEM_KIB KiB of guest memory
 *     dirtied per pass, cycling through [2 MiB, 2 MiB + MEM_SPAN_KIB KiB) (default MEM_SPAN_KIB = MEM_KIB: the
 *     same pages every pass, a hot set; a larger span makes a stream, each pass going on where the last ended);
 *   - writes DISK_SECTORS sectors of its boot disk (BIOS int 13h AH=43h, CHUNK sectors per call), cycling through
 *     sectors [DISK_LBA0, DISK_LBA0 + DISK_SPAN), each chunk stamped with the pass number so the data changes;
 *   - with PACE=1, makes at most one pass per BIOS timer tick (18.2 Hz) since boot, so the rates are the
 *     per-pass amounts x 18.2/s (as long as a pass fits in a tick);
 *   - with SUBTICKS=k > 1, programs the timer (PIT channel 0) k times faster, so a paced guest makes k passes
 *     per 55 ms and spreads its writes over the tick instead of making them in one burst; it then writes its
 *     disk on every k-th pass only, so the disk rate is DISK_SECTORS x 18.2/s still. (The BIOS's tick count
 *     wraps at midnight, 1,573,040 ticks: after 90 minutes at k = 16, when the pacing stops; tests' guests
 *     live minutes.)
 *
 * Counters at 1 MiB, read from outside with `xp /4wx 0x100000` (HMP):
 *   0x100000 passes completed; 0x100004 sectors written; 0x100008 disk write errors.
 *
 * Memory above 1 MiB is reached from real mode through "unreal mode": FS gets a 4 GiB limit from a flat
 * protected-mode descriptor, and real mode keeps the limit. Re-entered every pass because BIOS calls may reset it.
 */
        .code16
        .text
        .globl _start

        .set COUNTERS, 0x100000
        .set MEM_START, 0x200000
        .set CHUNK, 32
        .ifndef DISK_LBA0
        .set DISK_LBA0, 2048
        .endif
        .ifndef DISK_SPAN
        .set DISK_SPAN, 32768
        .endif
        .ifndef MEM_SPAN_KIB
        .set MEM_SPAN_KIB, MEM_KIB
        .endif
        .ifndef SUBTICKS
        .set SUBTICKS, 1
        .endif
        .set MEM_PAGES, (MEM_KIB + 3) / 4
        .set MEM_SPAN_BYTES, ((MEM_SPAN_KIB + 3) / 4) * 4096
        .set BUF_SEG, 0x1000

_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        ljmp    $0, $1f
1:      mov     %dl, boot_drive
        lgdt    gdt_desc
        call    unreal
        xor     %ebx, %ebx              /* EBX: pass number */
        addr32 movl    %ebx, %fs:COUNTERS
        addr32 movl    %ebx, %fs:COUNTERS + 4
        addr32 movl    %ebx, %fs:COUNTERS + 8
        xor     %ebp, %ebp              /* EBP: next sector offset in the span */
        .if SUBTICKS > 1
        mov     $0x36, %al              /* PIT channel 0, lo/hi byte, mode 3: divisor 65536 / SUBTICKS */
        out     %al, $0x43
        mov     $(65536 / SUBTICKS), %ax
        out     %al, $0x40
        mov     %ah, %al
        out     %al, $0x40
        .endif
        movl    0x46c, %eax
        movl    %eax, tick0

pass:
        inc     %ebx
        /* memory: one dword per 4 KiB page, MEM_PAGES pages from where the last pass ended, wrapping */
        movl    mem_off, %edi
        mov     $MEM_PAGES, %ecx
2:      test    %ecx, %ecx
        jz      3f
        movl    %ebx, %fs:MEM_START(%edi)
        add     $4096, %edi
        cmp     $MEM_SPAN_BYTES, %edi
        jb      1f
        xor     %edi, %edi
1:      dec     %ecx
        jmp     2b
3:      movl    %edi, mem_off
        /* disk: DISK_SECTORS sectors, CHUNK per BIOS call (with SUBTICKS, on every SUBTICKS-th pass) */
        mov     $DISK_SECTORS, %esi
        .if SUBTICKS > 1
        test    $(SUBTICKS - 1), %ebx
        jz      4f
        xor     %esi, %esi
        .endif
4:      test    %esi, %esi
        jz      6f
        pushal                          /* the BIOS may not keep the 32-bit registers */
        push    $BUF_SEG
        pop     %es
        movl    %ebx, %es:0             /* stamp the chunk with the pass number */
        movl    %ebp, %es:4
        mov     %ebp, %eax
        add     $DISK_LBA0, %eax
        movl    %eax, dap_lba
        mov     $dap, %si
        mov     boot_drive, %dl
        mov     $0x4300, %ax
        int     $0x13
        jnc     5f
        addr32 incl    %fs:COUNTERS + 8
5:      popal
        call    unreal
        addr32 addl    $CHUNK, %fs:COUNTERS + 4
        add     $CHUNK, %ebp
        cmp     $DISK_SPAN, %ebp
        jb      7f
        xor     %ebp, %ebp
7:      sub     $CHUNK, %esi
        ja      4b
6:
        addr32 movl    %ebx, %fs:COUNTERS
        .if PACE
8:      movl    0x46c, %eax             /* BIOS ticks since boot: at most one pass per tick, catching up */
        subl    tick0, %eax
        cmp     %ebx, %eax
        jae     9f
        sti
        hlt
        jmp     8b
9:
        .endif
        jmp     pass

/* FS := flat 4 GiB data segment, then back to real mode (the limit stays). */
unreal:
        cli
        push    %eax
        mov     %cr0, %eax
        or      $1, %al
        mov     %eax, %cr0
        jmp     1f
1:      mov     $8, %ax
        mov     %ax, %fs
        mov     %cr0, %eax
        and     $0xfe, %al
        mov     %eax, %cr0
        jmp     2f
2:      xor     %ax, %ax
        mov     %ax, %fs
        mov     %ax, %ds
        pop     %eax
        sti
        ret

        .p2align 3
gdt:    .quad   0
        .quad   0x00cf92000000ffff      /* flat data, 4 GiB, writable */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt
dap:    .byte   0x10, 0
        .word   CHUNK
        .word   0, BUF_SEG
dap_lba:
        .quad   0
tick0:  .long   0
mem_off:
        .long   0
boot_drive:
        .byte   0x80

        .org    510
        .word   0xaa55
