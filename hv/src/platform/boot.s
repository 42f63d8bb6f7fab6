# hv boot: multiboot2 header, PVH note, 32-bit entries, long mode.
# Owns: the initial identity map (0-4 GiB, 2 MiB pages), the boot stack, and the GDT (null,
# code64 0x08, data 0x10, TSS 0x18 filled in by Rust). The exception stubs are traps.s.
# Invariant: on entry to kmain paging is on with VA == PA below 4 GiB, SSE is usable,
# interrupts are off (and stay off), and .bss is zero.

.section .multiboot2, "a"
.align 8
mb2_header:
    .long 0xe85250d6
    .long 0
    .long 24
    .long 0x17ADAF12
    .short 0
    .short 0
    .long 8

# PVH (Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY = 18): QEMU's -kernel enters at hv_pvh_start in
# 32-bit protected mode, paging off, EBX = physical address of the hvm_start_info.
.section .note.Xen, "a", @note
.align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long hv_pvh_start

.section .data
.align 16
.global hv_gdt
hv_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0
    .quad 0
hv_gdt_end:
.global hv_gdt_ptr
.align 16
hv_gdt_ptr:
    .short hv_gdt_end - hv_gdt - 1
    .quad hv_gdt
.global hv_mb_magic
hv_mb_magic:
    .long 0
.global hv_mb_info
hv_mb_info:
    .long 0

.section .bss
.align 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pds:
    .skip 4096 * 4
.global hv_stack_bottom
hv_stack_bottom:
    .skip 65536
.global hv_stack_top
hv_stack_top:

.section .text.boot, "ax"
.code32
# PVH entry: mark the boot protocol in EAX (the hvm_start_info magic) and join the common path.
.global hv_pvh_start
hv_pvh_start:
    mov eax, 0x336ec578
    jmp _start
.global _start
_start:
    cli
    cld
    mov dword ptr [hv_mb_magic], eax
    mov dword ptr [hv_mb_info], ebx

    # Zero .bss (page tables and the stack live there).
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb

    # PML4[0] -> PDPT; PDPT[0..4] -> four PDs of 2 MiB pages: identity map of 0-4 GiB.
    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax
    xor ecx, ecx
.Lpdpt_loop:
    mov eax, ecx
    shl eax, 12
    add eax, offset boot_pds
    or eax, 3
    mov dword ptr [boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb .Lpdpt_loop
    xor ecx, ecx
.Lpd_loop:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [boot_pds + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov dword ptr [boot_pds + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jb .Lpd_loop

    mov eax, offset boot_pml4
    mov cr3, eax
    # CR4: PAE | OSFXSR | OSXMMEXCPT (the precompiled core uses SSE).
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    # EFER.LME
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    # CR0: PG | NE | MP | PE, EM clear.
    mov eax, cr0
    and eax, 0xFFFFFFFB
    or eax, 0x80000023
    mov cr0, eax
    lgdt [hv_gdt_ptr]
    mov eax, 0x08
    push eax
    mov eax, offset long_mode
    push eax
    retf

.code64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov rsp, offset hv_stack_top
    xor ebp, ebp
    mov edi, dword ptr [rip + hv_mb_magic]
    mov esi, dword ptr [rip + hv_mb_info]
    call hv_main
.Lhalt:
    cli
    hlt
    jmp .Lhalt
