# SVM world switch. u64 hv_svm_run(u64 vmcb_pa [rdi], Gprs *gprs [rsi]).
# Loads the guest GPRs (GUEST_GPRS_LOAD of ../gprs.s: all but RAX and RSP, which VMRUN takes
# from the VMCB), runs VMRUN, and on #VMEXIT stores them back (GUEST_GPRS_SAVE). Host
# callee-saved registers are preserved on the stack; RSP and RAX are restored by the processor
# from the host save area.
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
    GUEST_GPRS_LOAD
    clgi
    vmrun rax
    mov rax, [rsp + 8]
    GUEST_GPRS_SAVE
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
