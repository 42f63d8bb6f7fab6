# The guest program: 64-bit code run at guest-physical 0x10000 (copied there by program.rs).
# Position independent except for the fixed guest-physical layout in program.rs (DATA at
# 0x100000, 32 pages; BIG at 0x400000, 4096 pages). RDI at entry selects the role: 0 = main
# (fill DATA, write every page of BIG, fork, children write DATA, the parent writes BIG),
# 1 = touch memory outside any mapping, 2 = write the read-only code mapping, 3 = read DATA
# (whose second-level entry the hypervisor corrupted on purpose: EPT misconfiguration / NPT
# reserved bit). The main role also prints a line on the debug port 0xE9 (an I/O exit).
# Hypercall ABI: RAX = number (1 report, 2 fork, 3 yield), RDI/RSI/RDX = arguments, result
# in RAX, every other register preserved. The hypercall instruction at hv_guest_hypercall is
# VMCALL; the SVM backend patches it to VMMCALL when loading.
.section .rodata.hv_guest, "a"
.global hv_guest_start
hv_guest_start:
    cmp rdi, 1
    je .Lg_oob
    cmp rdi, 2
    je .Lg_ro
    cmp rdi, 3
    je .Lg_misconfig

    # Fill every qword of DATA with (address ^ SEED).
    mov rbx, 0x100000
    mov rcx, 0x120000
    movabs r8, 0x5EED5EED00000000
.Lg_fill:
    mov rax, rbx
    xor rax, r8
    mov [rbx], rax
    add rbx, 8
    cmp rbx, rcx
    jb .Lg_fill
    # Write the first qword of every page of BIG (0x400000, 4096 pages) with (address ^ SEED).
    mov rbx, 0x400000
    mov rcx, 0x1400000
.Lg_big:
    mov rax, rbx
    xor rax, r8
    mov [rbx], rax
    add rbx, 4096
    cmp rbx, rcx
    jb .Lg_big
    lea rsi, [rip + .Lg_msg]
    mov edx, 0xE9
.Lg_print:
    mov al, [rsi]
    test al, al
    jz .Lg_printed
    out dx, al
    inc rsi
    jmp .Lg_print
.Lg_printed:
    call .Lg_checksum
    mov rsi, rax
    mov edi, 1
    xor edx, edx
    mov eax, 1
    call .Lg_hypercall

    # Fork: RAX = 0 in the parent, 1 or 2 in the children.
    mov eax, 2
    call .Lg_hypercall
    test rax, rax
    jz .Lg_parent

    # Child k writes (address + k) * GOLDEN over 12 pages from DATA + (k - 1) * 8 pages,
    # yielding half way so the two children interleave.
    mov r12, rax
    lea rbx, [rax - 1]
    shl rbx, 15
    add rbx, 0x100000
    lea r13, [rbx + 6 * 4096]
    lea r14, [rbx + 12 * 4096]
    movabs r15, 0x9E3779B97F4A7C15
.Lg_w1:
    lea rax, [rbx + r12]
    imul rax, r15
    mov [rbx], rax
    add rbx, 8
    cmp rbx, r13
    jb .Lg_w1
    mov eax, 3
    call .Lg_hypercall
.Lg_w2:
    lea rax, [rbx + r12]
    imul rax, r15
    mov [rbx], rax
    add rbx, 8
    cmp rbx, r14
    jb .Lg_w2
    call .Lg_checksum
    mov rsi, rax
    mov edi, 2
    mov rdx, r12
    mov eax, 1
    call .Lg_hypercall
    jmp .Lg_halt

.Lg_parent:
    # A write to BIG after the fork: a copy-on-write fault through the closed upper entries.
    mov rax, 0x400008
    movabs rcx, 0xFEED000000000001
    mov [rax], rcx
    call .Lg_checksum
    mov rsi, rax
    mov edi, 3
    xor edx, edx
    mov eax, 1
    call .Lg_hypercall
.Lg_halt:
    hlt
    jmp .Lg_halt

.Lg_oob:
    mov rax, 0x30000000
    mov rax, [rax]
    jmp .Lg_survived
.Lg_ro:
    mov rax, 0x10000
    mov byte ptr [rax], 0x90
    jmp .Lg_survived
.Lg_misconfig:
    mov rax, 0x100000
    mov rax, [rax]
.Lg_survived:
    mov edi, 0xBAD
    xor esi, esi
    xor edx, edx
    mov eax, 1
    call .Lg_hypercall
    jmp .Lg_halt

# RAX = wrapping sum of the qwords of DATA.
.Lg_checksum:
    xor eax, eax
    mov rbx, 0x100000
.Lg_cs:
    add rax, [rbx]
    add rbx, 8
    cmp rbx, 0x120000
    jb .Lg_cs
    ret

.Lg_msg:
    .asciz "filled 32 data pages and wrote all 4096 pages of BIG, asking to fork\n"

.global hv_guest_hypercall
hv_guest_hypercall:
.Lg_hypercall:
    vmcall
    ret
.global hv_guest_end
hv_guest_end:
