# VMX world switch. u64 hv_vmx_enter(u64 launched [rdi], Gprs *gprs [rsi]).
# Writes HOST_RSP (0x6C14) = the current stack, loads the 15 guest GPRs from *gprs (RAX here,
# the rest through GUEST_GPRS_LOAD of ../gprs.s), and runs VMLAUNCH (launched == 0) or
# VMRESUME. Falls through only on VMfail: returns 1 (VMfailInvalid, CF) or 2 (VMfailValid, ZF).
# A VM exit lands at hv_vmx_exit (HOST_RIP), which stores the guest GPRs back into *gprs
# (GUEST_GPRS_SAVE, then RAX) and returns 0 to the caller of hv_vmx_enter.
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
    GUEST_GPRS_LOAD
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
    GUEST_GPRS_SAVE
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
