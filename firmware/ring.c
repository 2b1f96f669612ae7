/* ring.c - run_at_cpl() and try_call() on top of ring.S. */
#include "lab.h"

volatile struct ring_state ring_state;
extern struct exc_result ring_fault;
extern volatile int try_call_active;
void ring_call(u64 cpl, probe_fn fn, void *arg);

struct exc_result run_at_cpl(int cpl, probe_fn fn, void *arg)
{
    ring_state.via = RING_VIA_NONE;
    ring_state.return_cs = ring_state.resume_cs = ring_state.entry_cs = 0;
    if (cpl == 0) {
        ring_state.entry_cs = read_cs();
        fn(arg);
        ring_state.return_cs = ring_state.resume_cs = read_cs();
        return EXC_OK;
    }
    if (cpl < 0 || cpl > 3)
        panic("run_at_cpl: bad cpl");
    ring_fault = EXC_OK;
    ring_state.active = 1;
    ring_call((u64)cpl, fn, arg);
    return ring_fault;
}

/* try_call: same kernel-context save/restore as ring_call, at CPL0.
 * ring_call with cpl 0 is not used for this (it would IRETQ); instead we
 * reuse ring_resume's context by running fn on the current stack. */
void try_call_enter(probe_fn fn, void *arg);   /* ring.S-like helper below */

__asm__(
    ".text\n"
    ".globl try_call_enter\n"
    "try_call_enter:\n"
    "  pushq %rbx; pushq %rbp; pushq %r12; pushq %r13; pushq %r14; pushq %r15\n"
    "  mov %rsp, try_kctx_rsp(%rip)\n"
    "  mov %rdi, %rax\n"
    "  mov %rsi, %rdi\n"
    "  call *%rax\n"
    "  jmp 1f\n"
    ".globl try_call_resume\n"
    "try_call_resume:\n"
    "  mov try_kctx_rsp(%rip), %rsp\n"
    "1:\n"
    "  popq %r15; popq %r14; popq %r13; popq %r12; popq %rbp; popq %rbx\n"
    "  ret\n"
    ".data\n.balign 8\n"
    "try_kctx_rsp: .quad 0\n"
    ".text\n");

struct exc_result try_call(probe_fn fn, void *arg)
{
    ring_fault = EXC_OK;
    try_call_active = 1;
    try_call_enter(fn, arg);
    try_call_active = 0;
    return ring_fault;
}
