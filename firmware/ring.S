/* ring.S - entering CPL1/2/3 and coming back to CPL0.
 *
 * Ways in: IRETQ (SDM Vol. 3A 6.14.3 / 5.8: return to an outer privilege
 * level loads CS/SS/RSP from the frame) and SYSRETQ (APM Vol. 2 6.1.1).
 * Ways back: ud2 -> #UD handler at CPL0 (works under TCG and every KVM), or
 * SYSCALL -> syscall_entry (LSTAR). Never int n / call gates / lret: those
 * are emulation failures or #UD under kvm_pvm (docs/platform.md).
 */
#include "asm.h"

    .text
/* void ring_call(u64 cpl, probe_fn fn, void *arg)
 * Saves the kernel context, enters ring `cpl`, calls fn(arg) there. Returns
 * (through ring_resume) once the ring code came back to CPL0. */
    .globl ring_call
ring_call:
    PUSH_CALLEE_SAVED
    mov %rsp, ring_kctx_rsp(%rip)
    mov %rsi, %r12                  /* fn  (callee-saved: survives into the ring) */
    mov %rdx, %r13                  /* arg */
    lea ring_stack_tops(%rip), %rax
    mov (%rax,%rdi,8), %r8          /* this ring's fixed stack */
    lea ring_cs_sels(%rip), %rax
    mov (%rax,%rdi,8), %r9          /* CS with RPL = cpl */
    lea ring_ss_sels(%rip), %rax
    mov (%rax,%rdi,8), %r10         /* SS with RPL = cpl */
    pushq %r10                      /* SS */
    pushq %r8                       /* RSP */
    pushq $0x2                      /* RFLAGS: IF=0, IOPL=0 */
    pushq %r9                       /* CS */
    lea ring_entry(%rip), %rax
    pushq %rax                      /* RIP */
    .globl ring_iretq               /* named for debugging: the IRETQ into ring n */
ring_iretq:
    iretq
/* First instruction executed at CPLn after IRETQ (GDB witness: ring_entry). */
    .globl ring_entry
ring_entry:
    mov %cs, %rax
    mov %rax, ring_state+RS_ENTRY_CS(%rip)
    mov %r13, %rdi
    call *%r12
    /* Back to CPL0: #UD here; exc_dispatch recognises this RIP. */
    .globl ring_return_ud2
ring_return_ud2:
    ud2

/* void probe_call(u64 cpl, void *rip, u64 rax, u64 rcx, u64 use_sysret, u64 rflags)
 * Saves the kernel context like ring_call, then starts a probe stub (probe.h)
 * at `rip` on ring `cpl`'s fixed stack with RAX and RCX as given: CPL0 by a
 * jump, CPL1-3 by IRETQ with RFLAGS as given (IF=0; the IOPL a probe asks
 * for), or SYSRETQ to CPL3. The stub ends in a trap whose
 * handler (exc.c -> probe.c) resumes the kernel context via ring_resume, which
 * returns from this call. */
    .globl probe_call
probe_call:
    PUSH_CALLEE_SAVED
    mov %rsp, ring_kctx_rsp(%rip)
    mov %rsi, %r12                  /* stub */
    mov %rdx, %r13                  /* RAX for the stub */
    mov %rcx, %r14                  /* RCX for the stub */
    mov %r9, %r15                   /* RFLAGS for IRETQ */
    lea ring_stack_tops(%rip), %rax
    mov (%rax,%rdi,8), %r9          /* this ring's fixed stack */
    test %rdi, %rdi
    jnz 1f
    mov %r9, %rsp                   /* CPL0: no privilege change, just go */
    mov %r13, %rax
    mov %r14, %rcx
    jmp *%r12
1:  test %r8, %r8
    jnz 2f
    lea ring_cs_sels(%rip), %rax
    mov (%rax,%rdi,8), %r10         /* CS with RPL = cpl */
    lea ring_ss_sels(%rip), %rax
    mov (%rax,%rdi,8), %r11         /* SS with RPL = cpl */
    pushq %r11                      /* SS */
    pushq %r9                       /* RSP */
    pushq %r15                      /* RFLAGS */
    pushq %r10                      /* CS */
    pushq %r12                      /* RIP */
    mov %r13, %rax
    mov %r14, %rcx
    .globl probe_iretq              /* named for debugging: the IRETQ into a probe stub */
probe_iretq:
    iretq
2:  mov %r12, %rcx                  /* SYSRETQ: RIP=RCX, RFLAGS=R11 (IF=0), RSP unchanged */
    mov $0x2, %r11
    mov %r9, %rsp
    mov %r13, %rax
    sysretq

/* LSTAR target. SDM Vol. 2B SYSCALL: CS = IA32_STAR[47:32] (CPL0), RSP is not
 * switched. The first instruction is a return trap: the CS the CPU pushes for
 * this #UD is the CPL SYSCALL reached (the probe's observation, and the GDB
 * witness's evidence), and the handler resumes the kernel context. */
    .globl syscall_entry
syscall_entry:
    ud2

/* noreturn void ring_resume(u64 via, u64 return_cs)
 * Called at CPL0 (from exc_dispatch or syscall_entry): drop the current
 * stack, restore the kernel context saved by ring_call and return from it. */
    .globl ring_resume
ring_resume:
    mov %rdi, ring_state+RS_VIA(%rip)
    mov %rsi, ring_state+RS_RETURN_CS(%rip)
    mov ring_kctx_rsp(%rip), %rsp
    mov $SEL_KDATA, %eax
    mov %eax, %ss                   /* interrupt from CPL>0 left SS null */
    mov %eax, %ds
    mov %eax, %es
    .globl ring_back_cpl0
ring_back_cpl0:                     /* kernel context restored, CPL0 */
    mov %cs, %rax
    mov %rax, ring_state+RS_RESUME_CS(%rip)
    movq $0, ring_state+RS_ACTIVE(%rip)
    POP_CALLEE_SAVED
    ret

/* void rec_render_cpl3(void): run rec_render_ring3() at CPL3 (native speed
 * under kvm_pvm), come back with int3. isr_stub_3 recognises
 * rec_render_int3_ret and jumps to rec_render_resume without calling
 * exc_dispatch, so this plumbing never shows at the GDB witness points. */
    .globl rec_render_cpl3
rec_render_cpl3:
    PUSH_CALLEE_SAVED
    mov %rsp, render_kctx_rsp(%rip)
    pushq $(SEL_UDATA | 3)
    lea render_stack_top(%rip), %rax
    pushq %rax
    pushq $0x2
    pushq $(SEL_UCODE | 3)
    lea render_entry(%rip), %rax
    pushq %rax
    iretq
render_entry:
    call rec_render_ring3
    int3
    .globl rec_render_int3_ret
rec_render_int3_ret:                /* #BP is a trap: the frame RIP points here */
    ud2
    .globl rec_render_resume
rec_render_resume:
    mov render_kctx_rsp(%rip), %rsp
    mov $SEL_KDATA, %eax
    mov %eax, %ss
    mov %eax, %ds
    mov %eax, %es
    POP_CALLEE_SAVED
    ret

    .data
    .balign 8
    .globl ring_kctx_rsp
ring_kctx_rsp: .quad 0
render_kctx_rsp: .quad 0
ring_cs_sels:
    .quad SEL_KCODE, SEL_R1CODE | 1, SEL_R2CODE | 2, SEL_UCODE | 3
ring_ss_sels:
    .quad SEL_KDATA, SEL_R1DATA | 1, SEL_R2DATA | 2, SEL_UDATA | 3
    .globl ring_stack_tops
ring_stack_tops:
    .quad ring0_stack_top, ring1_stack_top, ring2_stack_top, ring3_stack_top

    .bss
    .balign 16
    .globl ring0_stack_top, ring1_stack_top, ring2_stack_top, ring3_stack_top
ring0_stack: .skip 16384            /* CPL0 probe stubs */
ring0_stack_top:
ring1_stack: .skip 16384
ring1_stack_top:
ring2_stack: .skip 16384
ring2_stack_top:
ring3_stack: .skip 16384
ring3_stack_top:
render_stack: .skip 8192
render_stack_top:
