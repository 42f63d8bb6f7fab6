# Host exception entry stubs and their table (hv_isr_table, read by traps.rs to build the IDT).
# Invariant: every stub leaves the frame traps.rs's ExceptionFrame describes (vector, error code
# - zero where the CPU pushes none -, then the CPU's RIP/CS/RFLAGS/RSP/SS) and calls
# hv_exception, which never returns.
# Stubs: push a zero error code where the CPU does not, then the vector, then call
# hv_exception(frame) with a 16-byte aligned stack.
.section .text
.irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
hv_isr_\n:
    push 0
    push \n
    jmp hv_isr_common
.endr
.irp n, 8,10,11,12,13,14,17,21,29,30
hv_isr_\n:
    push \n
    jmp hv_isr_common
.endr
hv_isr_common:
    mov rdi, rsp
    and rsp, -16
    call hv_exception
    ud2

.section .rodata
.align 8
.global hv_isr_table
hv_isr_table:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad hv_isr_\n
.endr
