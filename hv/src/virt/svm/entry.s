# SVM world switch. u64 hv_svm_run(u64 vmcb_pa [rdi], Gprs *gprs [rsi]).
# Loads the guest GPRs (except RAX and RSP, which VMRUN takes from the VMCB), runs VMRUN, and
# on #VMEXIT stores the guest GPRs back. Host callee-saved registers are preserved on the stack;
# RSP and RAX are restored by the processor from the host save area.
.section .text
.global hv_svm_run
hv_svm_run:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rsi
    push rdi
    mov rax, rdi
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
    clgi
    vmrun rax
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
    stgi
    add rsp, 16
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    xor eax, eax
    ret
