/* lies.S - the CPU-side pieces of the negative controls only a witness that sees the CPU
 * execute the probed instruction can catch (firmware/Makefile VARIANTS, docs/gdb.md). In the
 * normal build this file is empty. */
#include "asm.h"

    .text
#ifdef LAB_LIE_INT
/* IDT gate 0x4d (DPL3, cpu.c), reached by the `int $0x4d` lie-int puts in RDTSC's stub: make
 * it look like the #GP(0) RDTSC raises. A software INT pushes no error code and the RIP after
 * itself (SDM Vol. 2A INT n): push a fake error code, point the frame's RIP back at the INT. */
    .globl lie_fake_gp
lie_fake_gp:
    pushq $0
    subq $2, 8(%rsp)
    jmp isr_stub_13
#endif

#ifdef LAB_LIE_FRAME
/* void lie_forge_gp(void *rip): instead of entering CPL3, build on TSS.RSP0 the frame the CPU
 * would push for a #GP(0) at `rip` at CPL3 (SDM Vol. 3A 6.14.2: SS, RSP, RFLAGS, CS, RIP and the
 * error code, RSP0 aligned to 16) and jump to the #GP stub. Saves the kernel context as
 * probe_call does, so the handler's ring_resume returns from this call. */
    .globl lie_forge_gp
lie_forge_gp:
    PUSH_CALLEE_SAVED
    mov %rsp, ring_kctx_rsp(%rip)
    mov tss+4(%rip), %rsp           /* TSS.RSP0 */
    and $-16, %rsp
    pushq $(SEL_UDATA | 3)
    lea ring3_stack_top(%rip), %rax
    pushq %rax
    pushq $0x2
    pushq $(SEL_UCODE | 3)
    pushq %rdi
    pushq $0
    jmp isr_stub_13
#endif
