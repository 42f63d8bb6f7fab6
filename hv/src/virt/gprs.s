# Guest GPR save/restore shared by both world switches (vmx/entry.s, svm/entry.s): two macros
# over the `Gprs` layout of vcpu.rs (rax 0, rbx 8, rcx 16, rdx 24, rsi 32, rdi 40, rbp 48,
# r8..r15 56..112; pinned there by compile-time asserts).
# Neither macro touches RAX (VMX loads it itself; SVM's VMRUN takes it from the VMCB), RSP
# (in the VMCS / VMCB) or RFLAGS (only MOVs: VMX's `test` before the load stays valid).
# Each backend's global_asm! pulls this file in before its entry.s and purges both macros
# after it (.purgem), so the two inclusions never clash.

# GUEST_GPRS_LOAD: rsi = the Gprs pointer. Loads rbx..r15 from it; rsi itself last.
.macro GUEST_GPRS_LOAD
    mov rbx, [rsi + 8]
    mov rcx, [rsi + 16]
    mov rdx, [rsi + 24]
    mov rdi, [rsi + 40]
    mov rbp, [rsi + 48]
    mov r8, [rsi + 56]
    mov r9, [rsi + 64]
    mov r10, [rsi + 72]
    mov r11, [rsi + 80]
    mov r12, [rsi + 88]
    mov r13, [rsi + 96]
    mov r14, [rsi + 104]
    mov r15, [rsi + 112]
    mov rsi, [rsi + 32]
.endm

# GUEST_GPRS_SAVE: rax = the Gprs pointer. Stores rbx..r15 (all but rax) into it.
.macro GUEST_GPRS_SAVE
    mov [rax + 8], rbx
    mov [rax + 16], rcx
    mov [rax + 24], rdx
    mov [rax + 32], rsi
    mov [rax + 40], rdi
    mov [rax + 48], rbp
    mov [rax + 56], r8
    mov [rax + 64], r9
    mov [rax + 72], r10
    mov [rax + 80], r11
    mov [rax + 88], r12
    mov [rax + 96], r13
    mov [rax + 104], r14
    mov [rax + 112], r15
.endm
