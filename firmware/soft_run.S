/* soft_run.S - world switch of the software host (soft.h).
 * In: IRETQ from CPL0 to the guest's CPL1 (or CPL3) frame, SDM Vol. 3A 6.14.3.
 * Out: every guest trap enters the host IDT at CPL0 (exc_dispatch -> soft_trap).
 * Most are emulated right there; for an exit (a report, the guest's end) the
 * hook rewrites the exception frame so isr_common's IRETQ lands on
 * soft_exit_tramp at CPL0 on the stack soft_enter saved: the dispatcher
 * returns normally (no abandoned exception frames) and soft_enter returns.
 * Never `int n`, call gates or lret here (kvm_pvm: docs/platform.md). */
#include "asm.h"

/* struct soft_vcpu offsets: struct exc_frame (lab.h), then ds, es */
#define V_R15 0
#define V_R14 8
#define V_R13 16
#define V_R12 24
#define V_R11 32
#define V_R10 40
#define V_R9  48
#define V_R8  56
#define V_RBP 64
#define V_RDI 72
#define V_RSI 80
#define V_RDX 88
#define V_RCX 96
#define V_RBX 104
#define V_RAX 112
#define V_RIP 136
#define V_CS  144
#define V_RFL 152
#define V_RSP 160
#define V_SS  168
#define V_DS  176
#define V_ES  184

    .text
/* void soft_enter(struct soft_vcpu *v) */
    .globl soft_enter
soft_enter:
    PUSH_CALLEE_SAVED
    mov %rsp, soft_host_rsp(%rip)
    mov %rdi, %rax
    pushq V_SS(%rax)
    pushq V_RSP(%rax)
    pushq V_RFL(%rax)
    pushq V_CS(%rax)
    pushq V_RIP(%rax)
    /* The guest's DS/ES (null or DPL1/3 data): IRETQ keeps a DPL>=CPL segment. */
    mov V_DS(%rax), %rcx
    mov %ecx, %ds
    mov V_ES(%rax), %rcx
    mov %ecx, %es
    mov V_R15(%rax), %r15
    mov V_R14(%rax), %r14
    mov V_R13(%rax), %r13
    mov V_R12(%rax), %r12
    mov V_R11(%rax), %r11
    mov V_R10(%rax), %r10
    mov V_R9(%rax), %r9
    mov V_R8(%rax), %r8
    mov V_RBP(%rax), %rbp
    mov V_RDI(%rax), %rdi
    mov V_RSI(%rax), %rsi
    mov V_RDX(%rax), %rdx
    mov V_RCX(%rax), %rcx
    mov V_RBX(%rax), %rbx
    mov V_RAX(%rax), %rax
    .globl soft_enter_iretq
soft_enter_iretq:                   /* GDB: last host instruction before the guest */
    iretq

/* Landing pad of an exit: CPL0, RSP = soft_host_rsp (the hook put both in
 * the frame). GPRs hold guest values: restore ours and return from soft_enter. */
    .globl soft_exit_tramp
soft_exit_tramp:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    POP_CALLEE_SAVED
    ret

    .data
    .balign 8
    .globl soft_host_rsp
soft_host_rsp: .quad 0
