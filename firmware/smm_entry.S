/* smm_entry.S - ring -2 (SMM) from the kernel's side (smm.c), and the lab's own SMI handler.
 *
 * smm_raise: one OUT with every general register holding a known pattern, then every
 * register stored back: an SMI the OUT raised (APM_CNT, port 0xB2) must leave them as they
 * were, for RSM restores the interrupted state from the SMRAM save area (SDM Vol. 3C 32.5,
 * 32.10). The `jmp` after the OUT ends QEMU's translation block, so TCG takes the pending SMI
 * there, before the registers are stored (an SMI is recognised at an instruction boundary,
 * SDM Vol. 3C 32.2); the save area's RIP is therefore smm_raise_out or smm_raise_landed.
 *
 * smm_blob: the lab's SMI handler, copied to SMBASE+0x8000 while SMRAM is open (D_OPEN). It
 * runs in SMM's real-address-like mode (SDM Vol. 3C 32.5.1 Table 32-4: CS = SMBASE>>4 with
 * base SMBASE, EIP 0x8000, the other segments base 0 with 4 GiB limits, CR0.PE=PG=0), counts
 * its entries and copies the interrupted state from the save area into the kernel's mailbox
 * (smm_mbox, physical = virtual), may change the saved RBX (ring -2 altering ring 0), and
 * leaves by RSM. The save area is the AMD64 layout (APM Vol. 2 10.2.3 Table 10-2), the one
 * QEMU's TCG and KVM write for every 64-bit vCPU (docs/platform.md "SMM"). */
#include "asm.h"

    .text
    .code64
/* void smm_raise(const u64 in[16], u64 out[17], u16 port, u8 value)
 * in/out order: rax rbx rcx rdx rsi rdi rbp r8..r15; out[16] = RFLAGS after. rax's low byte
 * becomes `value`, rdx's low 16 bits `port` (the OUT's operands). */
    .globl smm_raise, smm_raise_out, smm_raise_landed, smm_raise_end
smm_raise:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rsi                   /* out */
    mov %rdx, %r8               /* port */
    mov %rcx, %r9               /* value */
    mov %rdi, %rax              /* in */
    mov 8(%rax), %rbx
    mov 16(%rax), %rcx
    mov 24(%rax), %rdx
    mov 32(%rax), %rsi
    mov 40(%rax), %rdi
    mov 48(%rax), %rbp
    mov 72(%rax), %r10
    mov 80(%rax), %r11
    mov 88(%rax), %r12
    mov 96(%rax), %r13
    mov 104(%rax), %r14
    mov 112(%rax), %r15
    mov %r8w, %dx               /* port into DX's low 16 bits */
    push 56(%rax)               /* r8 */
    push 64(%rax)               /* r9 */
    mov %r9b, %r8b              /* value, kept while RAX is reloaded */
    mov 0(%rax), %rax
    mov %r8b, %al
    pop %r9
    pop %r8
smm_raise_out:
    outb %al, %dx
    jmp smm_raise_landed        /* ends the translation block: a pending SMI is taken here */
smm_raise_landed:
    push %rax
    mov 8(%rsp), %rax           /* out */
    mov %rbx, 8(%rax)
    mov %rcx, 16(%rax)
    mov %rdx, 24(%rax)
    mov %rsi, 32(%rax)
    mov %rdi, 40(%rax)
    mov %rbp, 48(%rax)
    mov %r8, 56(%rax)
    mov %r9, 64(%rax)
    mov %r10, 72(%rax)
    mov %r11, 80(%rax)
    mov %r12, 88(%rax)
    mov %r13, 96(%rax)
    mov %r14, 104(%rax)
    mov %r15, 112(%rax)
    pushfq
    pop %rbx
    mov %rbx, 128(%rax)
    pop %rbx                    /* the RAX the OUT left */
    mov %rbx, 0(%rax)
    pop %rsi
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
smm_raise_end:
    ret

/* The handler. Offsets in the mailbox (struct smm_mbox, smm.c) and in the save area. */
#define MB_ENTRIES   0
#define MB_CS        4
#define MB_CR0       8
#define MB_ALTER     12
#define MB_CLOBBER   16
#define MB_KEY       20
#define MB_REV       24
#define MB_SMBASE    28
#define MB_RIP       32
#define MB_RBX       40
#define MB_CR3       48
#define MB_RSP       56
#define MB_EFER      64
#define SAVE         0xfe00      /* the state save area: SMBASE + 0xFE00 (SMBASE + 0x8000 + 0x7E00) */
#define SV_REV       (SAVE + 0xfc)
#define SV_SMBASE    (SAVE + 0x100)
#define SV_CR3       (SAVE + 0x150)
#define SV_RIP       (SAVE + 0x178)
#define SV_R12       (SAVE + 0x198)
#define SV_RSP       (SAVE + 0x1d8)
#define SV_RBX       (SAVE + 0x1e0)
#define SV_EFER      (SAVE + 0xd0)

/* One dword of the save area (ESI) into the mailbox (EDI), through EAX; a qword as its two
 * dwords (the handler runs in SMM's 16-bit mode with 32-bit addressing). */
.macro save_to_mbox sv, mb
    addr32 movl \sv(%esi), %eax
    addr32 movl %eax, \mb(%edi)
.endm
.macro save_to_mbox64 sv, mb
    save_to_mbox \sv, \mb
    save_to_mbox \sv+4, \mb+4
.endm

    .section .rodata
    .globl smm_blob, smm_blob_end, smm_blob_mbox
    .code16
smm_blob:
    mov %cs, %ax
    movzwl %ax, %esi
    shl $4, %esi                            /* SMBASE = CS base = CS << 4 (SDM Table 32-4) */
    movl %cs:(0x8000 + smm_blob_mbox - smm_blob), %edi
    addr32 incl MB_ENTRIES(%edi)
    addr32 movw %ax, MB_CS(%edi)
    mov %cr0, %eax                          /* a CPL0 instruction: SMM runs at CPL0 */
    addr32 movl %eax, MB_CR0(%edi)
    save_to_mbox SV_REV, MB_REV
    save_to_mbox SV_SMBASE, MB_SMBASE
    save_to_mbox64 SV_RIP, MB_RIP
    save_to_mbox64 SV_RBX, MB_RBX
    save_to_mbox64 SV_CR3, MB_CR3
    save_to_mbox64 SV_RSP, MB_RSP
    save_to_mbox SV_EFER, MB_EFER
    addr32 cmpl $0, MB_ALTER(%edi)
    je 1f
    addr32 movl MB_KEY(%edi), %eax          /* ring -2 changes the kernel's RBX: RSM loads it */
    addr32 xorl %eax, SV_RBX(%esi)
1:  addr32 cmpl $0, MB_CLOBBER(%edi)
    je 2f
    addr32 notl SV_R12(%esi)                /* negative control: a handler that loses R12 */
    /* For the GDB witness's stop at the copy's RSM (smm_rsm_copy): whether this entry alters and
     * the entries so far, in registers RSM is about to reload from the save area anyway. */
2:  addr32 movl MB_ALTER(%edi), %ebx
    addr32 movl MB_ENTRIES(%edi), %ecx
smm_blob_rsm:
    rsm
    .balign 4
smm_blob_mbox:
    .long 0                                 /* the mailbox's physical address (smm.c) */
smm_blob_end:
    .code64
/* Where the kernel copies the handler (smm.c: SeaBIOS's SMBASE A0000h + 8000h) and its RSM there,
 * as absolute ELF symbols for the GDB witness (docs/gdb.md): QEMU's gdbstub matches a breakpoint
 * on the linear address (smm_rsm_copy), GDB the stop on RIP, which in SMM is the offset from
 * CS.base (smm_rsm_rip). SeaBIOS's own entry there is a 5-byte far jump, so only the lab's
 * handler executes smm_rsm_copy. */
    .globl smm_rsm_copy, smm_rsm_rip
    .set smm_rsm_copy, 0xa8000 + (smm_blob_rsm - smm_blob)
    .set smm_rsm_rip, 0x8000 + (smm_blob_rsm - smm_blob)
