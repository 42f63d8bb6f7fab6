# VMX world switch. u64 hv_vmx_enter(u64 launched [rdi], Gprs *gprs [rsi]).
# Writes HOST_RSP (0x6C14) = the current stack, loads the 15 guest GPRs from *gprs, and runs
# VMLAUNCH (launched == 0) or VMRESUME. Falls through only on VMfail: returns 1 (VMfailInvalid,
# CF) or 2 (VMfailValid, ZF). A VM exit lands at hv_vmx_exit (HOST_RIP), which stores the guest
# GPRs back into *gprs and returns 0 to the caller of hv_vmx_enter.
.section .text
.global hv_vmx_enter
hv_vmx_enter:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rsi
    mov rax, 0x6C14
    vmwrite rax, rsp
    test rdi, rdi
    mov rax, [rsi]
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
    jnz .Lvmx_resume
    vmlaunch
    jmp .Lvmx_fail
.Lvmx_resume:
    vmresume
.Lvmx_fail:
    mov eax, 1
    jc .Lvmx_fail_out
    mov eax, 2
.Lvmx_fail_out:
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.global hv_vmx_exit
hv_vmx_exit:
    push rax
    mov rax, [rsp + 8]
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
    pop rbx
    mov [rax], rbx
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    xor eax, eax
    ret
