/* isr.S - exception entry stubs. Every vector goes to isr_common, which
 * builds a struct exc_frame and calls the C dispatcher exc_dispatch().
 * Exceptions from CPL1/2/3 arrive on TSS.RSP0 (SDM Vol. 3A 6.12.1,
 * 6.14.4/6.14.5 64-bit stack switching; #DF uses IST1). */
#include "asm.h"

    .text
    .cfi_sections .debug_frame
/* Each stub starts with a 2-byte no-op (66 90): the GDB witness's breakpoint sits on it, and
 * the witness resumes the CPU past it, which needs no single step over the breakpoint
 * (under TCG each stop flushes QEMU's translations, and a single step is one more: docs/gdb.md). */
/* Unwind info: a stub's frame is the one the CPU pushed (SDM Vol. 3A 6.14.2), with no caller
 * GDB could find by prologue analysis; `.cfi_undefined rip` makes the stub GDB's outermost
 * frame, so a stop there reads no code or stack to unwind a caller (the witness reads the
 * CPU's frame itself, and `bt` shows no invented caller). `size`: the frame's bytes. */
.macro IRET_FRAME_CFI size
    .cfi_startproc simple
    .cfi_def_cfa %rsp, \size
    .cfi_undefined %rip
.endm
.macro ISR_NOERR n
    .globl isr_stub_\n
    .balign 16
isr_stub_\n:
    IRET_FRAME_CFI 40
    xchg %ax, %ax
    pushq $0
    .cfi_adjust_cfa_offset 8
    pushq $\n
    .cfi_adjust_cfa_offset 8
    jmp isr_common
    .cfi_endproc
.endm
.macro ISR_ERR n
    .globl isr_stub_\n
    .balign 16
isr_stub_\n:
    IRET_FRAME_CFI 48
    xchg %ax, %ax
    pushq $\n
    .cfi_adjust_cfa_offset 8
    jmp isr_common
    .cfi_endproc
.endm

/* The stubs have a 4 KiB page of their own: QEMU's TCG runs every instruction of a page that
 * holds a breakpoint as a translation block of its own (and translates it again after each
 * stop), and the witness's breakpoints sit on these stubs; the paths every probe runs
 * (isr_common, probe_call, the ring helpers) must not share their page (docs/gdb.md). */
    .balign 4096
/* Vectors that push an error code: 8, 10-14, 17, 21, 29, 30 (SDM Vol. 3A 6.15). */
ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
/* #BP: fast path for the record renderer's return from CPL3 (records.c). */
    .globl isr_stub_3
    .balign 16
isr_stub_3:
    cmpq $rec_render_int3_ret, (%rsp)
    je rec_render_resume
    .globl isr_stub_3_exc           /* any other #BP (the GDB witness stops here) */
isr_stub_3_exc:
    xchg %ax, %ax
    pushq $0
    pushq $3
    jmp isr_common
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31
ISR_NOERR 128
    .balign 4096

    .globl isr_common
isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    mov %rsp, %rdi          /* struct exc_frame * (16-byte aligned: 22 qwords) */
    call exc_dispatch
    .globl isr_return
isr_return:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    add $16, %rsp           /* vector, error code */
    iretq

    .section .rodata
    .balign 8
    .globl isr_stub_table
isr_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_stub_\n
    .endr
