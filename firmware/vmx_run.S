/* vmx_run.S - the VMX world switch. SDM Vol. 3C 26 (VM entry) loads the guest's
 * RSP/RIP/RFLAGS and control/segment state from the VMCS, 27.5 (VM exit) loads the
 * host's from the host-state area (HOST_RSP, HOST_RIP = vmx_exit_entry); no GPR
 * other than RSP is switched by the processor, so they are loaded from and stored
 * to struct hv_gregs here. */

/* struct hv_gregs (hv_guest.h): rax rbx rcx rdx rsi rdi rbp r8..r15 */
#define G_RAX 0
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
#define HOST_RSP 0x6c14

    .text
/* int vmx_run(struct hv_gregs *g, int launched) */
    .globl vmx_run
    .type vmx_run, @function
vmx_run:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rdi                       /* 0(%rsp): g; HOST_RSP points here */

    mov $HOST_RSP, %eax
    vmwrite %rsp, %rax              /* the exit lands on this stack, g on top */
    jbe 9f                          /* VMWRITE failed: report it as an entry failure */

    test %esi, %esi                 /* launched? (flags survive the MOVs below) */
    mov G_RBX(%rdi), %rbx
    mov G_RCX(%rdi), %rcx
    mov G_RDX(%rdi), %rdx
    mov G_RSI(%rdi), %rsi
    mov G_RBP(%rdi), %rbp
    mov G_R8(%rdi),  %r8
    mov G_R9(%rdi),  %r9
    mov G_R10(%rdi), %r10
    mov G_R11(%rdi), %r11
    mov G_R12(%rdi), %r12
    mov G_R13(%rdi), %r13
    mov G_R14(%rdi), %r14
    mov G_R15(%rdi), %r15
    mov G_RAX(%rdi), %rax
    mov G_RDI(%rdi), %rdi
    jnz 1f
    .globl vmx_vmlaunch_insn
vmx_vmlaunch_insn:
    vmlaunch                        /* first entry for a clear VMCS (26.1) */
    jmp 9f
1:
    .globl vmx_vmresume_insn
vmx_vmresume_insn:
    vmresume
9:  /* the entry failed: CF=1 VMfailInvalid, else ZF=1 VMfailValid (30.2) */
    mov $1, %eax
    jc 8f
    mov $2, %eax
8:  add $8, %rsp
    jmp 7f

/* VM exit: RSP = HOST_RSP (g on top), RFLAGS = 0x2, every other GPR the guest's. */
    .globl vmx_exit_entry
vmx_exit_entry:
    xchg %rdi, 0(%rsp)              /* rdi = g; the slot keeps the guest's rdi */
    mov %rax, G_RAX(%rdi)
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
    pop %rax
    mov %rax, G_RDI(%rdi)
    xor %eax, %eax
7:  pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
    .size vmx_run, . - vmx_run
