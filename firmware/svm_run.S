/* svm_run.S - the world switch. APM Vol. 2 15.5: VMRUN saves host RAX/RSP/
 * RIP/RFLAGS and segment/control state to VM_HSAVE_PA and #VMEXIT restores
 * them; all other GPRs keep the guest's values across the exit, and FS/GS/TR/
 * LDTR/KernelGSBase/STAR.. are neither saved nor restored, hence VMSAVE/VMLOAD
 * of a host save area around it (15.5.2). GIF stays 0 (CLGI) from before the
 * host save to after the host load, so nothing runs on half-switched state. */

/* struct hv_gregs (hv_guest.h): rax rbx rcx rdx rsi rdi rbp r8..r15 */
#define G_RBX 8
#define G_RCX 16
#define G_RDX 24
#define G_RSI 32
#define G_RDI 40
#define G_RBP 48
#define G_R8  56
#define G_R9  64
#define G_R10 72
#define G_R11 80
#define G_R12 88
#define G_R13 96
#define G_R14 104
#define G_R15 112

    .text
/* void svm_run(u64 vmcb_pa, u64 host_save_pa, struct hv_gregs *g) */
    .globl svm_run
    .type svm_run, @function
svm_run:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rdx                       /* 16(%rsp): g */
    push %rsi                       /*  8(%rsp): host save area */
    push %rdi                       /*  0(%rsp): guest VMCB */

    clgi
    mov 8(%rsp), %rax
    vmsave %rax                     /* host FS/GS/TR/LDTR/... */
    mov 0(%rsp), %rax
    vmload %rax                     /* guest FS/GS/TR/LDTR/... */

    mov 16(%rsp), %rax
    mov G_RBX(%rax), %rbx
    mov G_RCX(%rax), %rcx
    mov G_RDX(%rax), %rdx
    mov G_RSI(%rax), %rsi
    mov G_RDI(%rax), %rdi
    mov G_RBP(%rax), %rbp
    mov G_R8(%rax),  %r8
    mov G_R9(%rax),  %r9
    mov G_R10(%rax), %r10
    mov G_R11(%rax), %r11
    mov G_R12(%rax), %r12
    mov G_R13(%rax), %r13
    mov G_R14(%rax), %r14
    mov G_R15(%rax), %r15
    mov 0(%rsp), %rax               /* VMRUN takes the VMCB's physical address in RAX */
    .globl svm_vmrun_insn
svm_vmrun_insn:
    vmrun %rax
    /* #VMEXIT lands here: RAX/RSP are the host's again, the rest are the guest's. */
    .globl svm_vmexit_return
svm_vmexit_return:
    xchg %rdi, 16(%rsp)             /* rdi = g; the slot keeps the guest's rdi */
    mov %rbx, G_RBX(%rdi)
    mov %rcx, G_RCX(%rdi)
    mov %rdx, G_RDX(%rdi)
    mov %rsi, G_RSI(%rdi)
    mov %rbp, G_RBP(%rdi)
    mov %r8,  G_R8(%rdi)
    mov %r9,  G_R9(%rdi)
    mov %r10, G_R10(%rdi)
    mov %r11, G_R11(%rdi)
    mov %r12, G_R12(%rdi)
    mov %r13, G_R13(%rdi)
    mov %r14, G_R14(%rdi)
    mov %r15, G_R15(%rdi)
    mov 16(%rsp), %rax
    mov %rax, G_RDI(%rdi)

    mov 0(%rsp), %rax
    vmsave %rax                     /* guest FS/GS/TR/... back into its VMCB */
    mov 8(%rsp), %rax
    vmload %rax                     /* host's again */
    stgi

    add $24, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
    .size svm_run, . - svm_run
