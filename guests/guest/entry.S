/* entry.S - guest kernel: image header, 64-bit entry, its own GDT, exception
 * stubs, ring-3 trampolines and page tables. The host starts us already in
 * long mode (CPL0, CR3 = guest_pml4, see lab_guest_abi.h); everything else is
 * ours, so our exceptions go through our own IDT, not the host's. */
#include "lab_guest_abi.h"

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x23
#define SEL_UCODE 0x2b

    .section .text.header, "ax"
    .globl guest_header
guest_header:                       /* offsets: LABG_OFF_* */
    .ascii LABG_MAGIC
    .quad __load_addr
    .quad guest_start
    .quad guest_pml4
    .quad guest_stack_top
    .quad __image_size
    .quad __mem_size

    .text
    .globl guest_start
guest_start:
    lea guest_stack_top(%rip), %rsp
    xor %edi, %edi
    mov %cs, %di                    /* CS as the host handed it: cpl-enter via=vmrun */
    /* The guest kernel's first privileged instruction: under the software host it
     * traps at the guest's real CPL1 (lab/catalogue.py stub guest_kernel). */
    .globl probe_insn_guest_kernel, probe_done_guest_kernel
probe_insn_guest_kernel:
    lgdt guest_gdtr(%rip)
probe_done_guest_kernel:
    pushq $SEL_KCODE                /* reload CS from our own GDT (same ring) */
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    call guest_main
2:  hlt
    jmp 2b

/* Exception stubs 0..31: push a dummy error code where the CPU does not
 * (so struct gframe is uniform), then the vector. */
.macro VEC n, err
    .balign 16
    .globl guest_isr_stub_\n         /* the GDB witness stops here (TCG, SVM guest) */
guest_isr_stub_\n:
vec_\n:
    .if \err == 0
    pushq $0
    .endif
    pushq $\n
    jmp trap_common
.endm
    VEC 0,0;  VEC 1,0;  VEC 2,0;  VEC 3,0;  VEC 4,0;  VEC 5,0;  VEC 6,0;  VEC 7,0
    VEC 8,1;  VEC 9,0;  VEC 10,1; VEC 11,1; VEC 12,1; VEC 13,1; VEC 14,1; VEC 15,0
    VEC 16,0; VEC 17,1; VEC 18,0; VEC 19,0; VEC 20,0; VEC 21,1; VEC 22,0; VEC 23,0
    VEC 24,0; VEC 25,0; VEC 26,0; VEC 27,0; VEC 28,0; VEC 29,1; VEC 30,1; VEC 31,0

    .section .rodata
    .balign 8
    .globl guest_vec_table
guest_vec_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad vec_\n
    .endr

    .text
/* Frame layout = struct gframe (guest.c). 15 GPRs + vector + error + 5-word
 * hardware frame keep RSP 16-aligned at the call. */
    .globl guest_trap_common
trap_common:
guest_trap_common:
    push %rax; push %rbx; push %rcx; push %rdx; push %rsi; push %rdi; push %rbp
    push %r8;  push %r9;  push %r10; push %r11; push %r12; push %r13; push %r14; push %r15
    mov %rsp, %rdi
    cld
    call guest_trap                 /* returns only if it wants a plain IRETQ */
    pop %r15;  pop %r14;  pop %r13;  pop %r12; pop %r11; pop %r10; pop %r9; pop %r8
    pop %rbp;  pop %rdi;  pop %rsi;  pop %rdx; pop %rcx; pop %rbx; pop %rax
    add $16, %rsp
    iretq

/* int guest_setjmp(struct gjmp *b) / void guest_longjmp(struct gjmp *b, int v):
 * how an exception handler resumes the probe's CPL0 context. */
    .globl guest_setjmp
guest_setjmp:
    mov %rbx, 0(%rdi);  mov %rbp, 8(%rdi);  mov %r12, 16(%rdi)
    mov %r13, 24(%rdi); mov %r14, 32(%rdi); mov %r15, 40(%rdi)
    lea 8(%rsp), %rax;  mov %rax, 48(%rdi)  /* rsp after our return */
    mov (%rsp), %rax;   mov %rax, 56(%rdi)  /* return address */
    xor %eax, %eax
    ret
    .globl guest_longjmp
guest_longjmp:
    mov 0(%rdi), %rbx;  mov 8(%rdi), %rbp;  mov 16(%rdi), %r12
    mov 24(%rdi), %r13; mov 32(%rdi), %r14; mov 40(%rdi), %r15
    mov 48(%rdi), %rsp
    mov %esi, %eax
    jmp *56(%rdi)

/* void guest_enter_user(u64 rip, u64 rsp): IRETQ to CPL3 (never `int n`, see
 * docs/platform.md); the ring-3 code comes back with ud2 or a fault. IF stays 0. */
    .globl guest_enter_user
guest_enter_user:
    pushq $SEL_UDATA
    push %rsi
    pushq $0x2
    pushq $SEL_UCODE
    push %rdi
    iretq

/* Ring-3 stubs, named as the host's (lab/catalogue.py): probe_insn_<name> is
 * the probed code, probe_done_<name> the ud2 right after it; #UD there means
 * "the probe's instruction completed" (to the guest and to the GDB witness). */
    .globl probe_insn_guest_enter, probe_done_guest_enter
probe_insn_guest_enter:
    xor %eax, %eax
    mov %cs, %ax
    mov %rax, user_cs(%rip)         /* all guest pages are U/S=1 */
probe_done_guest_enter:
    ud2

/* The UMIP instructions (SDM Vol. 3A 2.5), on the user stack. */
.macro GUEST_UMIP_STUB name, insn
    .globl probe_insn_guest_\name, probe_done_guest_\name
probe_insn_guest_\name:
    \insn
probe_done_guest_\name:
    ud2
.endm
    GUEST_UMIP_STUB sgdt, "sgdt -16(%rsp)"
    GUEST_UMIP_STUB sidt, "sidt -16(%rsp)"
    GUEST_UMIP_STUB sldt, "sldt %ax"
    GUEST_UMIP_STUB smsw, "smsw %ax"
    GUEST_UMIP_STUB str, "str %ax"

/* void guest_cpuid(u32 leaf, u32 out[4]): CPUID (subleaf 0) at a label of its own, so the GDB
 * witness sees the CPU exit on it (guest_cpuid_insn) and the registers the guest got back
 * (guest_cpuid_done); out = EAX, EBX, ECX, EDX. */
    .globl guest_cpuid, guest_cpuid_insn, guest_cpuid_done
guest_cpuid:
    push %rbx
    mov %rsi, %r8
    mov %edi, %eax
    xor %ecx, %ecx
guest_cpuid_insn:
    cpuid
guest_cpuid_done:
    mov %eax, 0(%r8)
    mov %ebx, 4(%r8)
    mov %ecx, 8(%r8)
    mov %edx, 12(%r8)
    pop %rbx
    ret

    .globl probe_insn_guest_rdtsc, probe_done_guest_rdtsc
probe_insn_guest_rdtsc:
    rdtsc
probe_done_guest_rdtsc:
    ud2

/* The Popek-Goldberg family (guest.c probe_pg): one sensitive instruction each, run at the
 * guest kernel's CPL (0 as it believes; 1 under the software host). Between pg_text_start and
 * pg_text_end nothing else can trap (the gate targets, whose LRETQ/IRETQ trap under the software
 * host, live outside it): the host counts its traps/exits there (LABHC_PG_BEGIN). Each returns
 * what the instruction showed (RAX). */
#define SEL_LDT  0x40
#define SEL_GATE 0x80                   /* and 0x90: past the host kernel's GDT limit (firmware lab.h) */
    .globl pg_text_start, pg_text_end
pg_text_start:
.macro PG_DTR name, insn
    .globl pg_\name
pg_\name:
    sub $24, %rsp
pg_at_\name:
    \insn 8(%rsp)
    mov 10(%rsp), %rax                  /* the base */
    add $24, %rsp
    ret
.endm
.macro PG_SEL16 name, insn
    .globl pg_\name
pg_\name:
    xor %eax, %eax
pg_at_\name:
    \insn %ax
    movzwl %ax, %eax
    ret
.endm
    PG_DTR sgdt, sgdt
    PG_DTR sidt, sidt
    PG_SEL16 sldt, sldt
    PG_SEL16 smsw, smsw
    PG_SEL16 str, str
    PG_SEL16 mov, "mov %cs,"           /* MOV from CS: its RPL is the CPL */

    .globl pg_pushf
pg_pushf:
pg_at_pushf:
    pushfq
    pop %rax
    ret
    .globl pg_popf                      /* rdi = the RFLAGS to load; returns them read back */
pg_popf:
    push %rdi
pg_at_popf:
    popfq
    pushfq
    pop %rax
    ret
/* LAR/LSL: bit 63 = ZF, low bits = what the instruction loaded (LAR masked 00F0FF00H,
 * SDM Vol. 2A LAR: bits 19:16 are undefined). VERR/VERW: ZF. */
    .globl pg_lar
pg_lar:
    mov $SEL_KCODE, %ecx
    xor %edx, %edx
pg_at_lar:
    lar %cx, %edx
    setz %cl
    movzbl %cl, %eax
    shl $63, %rax
    and $0x00f0ff00, %edx
    or %rdx, %rax
    ret
    .globl pg_lsl
pg_lsl:
    mov $SEL_KDATA, %ecx
    xor %edx, %edx
pg_at_lsl:
    lsl %cx, %edx
    setz %cl
    movzbl %cl, %eax
    shl $63, %rax
    or %rdx, %rax
    ret
.macro PG_VER name
    .globl pg_\name
pg_\name:
    mov $SEL_KDATA, %ecx
    xor %eax, %eax
pg_at_\name:
    \name %cx
    setz %al
    ret
.endm
    PG_VER verr
    PG_VER verw
    .globl pg_pop                       /* POP FS of the DPL0 data selector: loaded or not */
pg_pop:
    pushq $SEL_KDATA
pg_at_pop:
    pop %fs
    mov $1, %eax
    ret
    .globl pg_push                      /* PUSH FS (guest.c loaded SEL_KDATA): the selector */
pg_push:
pg_at_push:
    push %fs
    pop %rax
    movzwl %ax, %eax
    ret
/* Far CALL / JMP through the DPL0 call gate SEL_GATE (guest.c), INT through a DPL0 interrupt
 * gate (vector 0x40), far RET to the same ring: CALL and INT return the CS the CPU pushed. */
    .globl pg_call, pg_call_target
pg_call:
pg_at_call:
    lcall *pg_far(%rip)
    mov pg_seen(%rip), %rax
    ret
    .globl pg_jmp, pg_jmp_target
pg_jmp:
pg_at_jmp:
    ljmp *pg_far_jmp(%rip)
pg_jmp_back:
    mov $1, %eax
    ret
    .globl pg_int, pg_int_target
pg_int:
pg_at_int:
    int $0x40
    mov pg_seen(%rip), %rax
    ret
    .globl pg_ret
pg_ret:
    pushq $SEL_KCODE
    lea 1f(%rip), %rax
    push %rax
pg_at_ret:
    lretq
1:  mov $1, %eax
    ret
pg_text_end:

/* The probed instruction of each, in LABHC_PG_* order: the host counts its traps/exits there. */
    .section .rodata
    .balign 8
    .globl pg_at
pg_at:
    .irp n, sgdt, sidt, sldt, smsw, str, pushf, popf, lar, lsl, verr, verw, pop, push, call, jmp, int, ret, mov
    .quad pg_at_\n
    .endr
    .text
pg_call_target:
    mov 8(%rsp), %rax                   /* a 64-bit call gate pushes CS, RIP as quadwords */
    mov %rax, pg_seen(%rip)
    lretq
pg_int_target:
    mov 8(%rsp), %rax                   /* frame: RIP, CS, RFLAGS, RSP, SS */
    mov %rax, pg_seen(%rip)
    iretq
pg_jmp_target:
    jmp pg_jmp_back

/* void guest_set_rflags(u64 rflags): IRETQ to the next instruction, same ring, with these
 * RFLAGS: how a kernel sets its IOPL (SDM Vol. 2A IRET). */
    .globl guest_set_rflags
guest_set_rflags:
    mov %rsp, %rcx
    xor %eax, %eax
    mov %ss, %ax
    push %rax
    push %rcx
    push %rdi
    pushq $SEL_KCODE
    lea 1f(%rip), %rax
    push %rax
    iretq
1:  ret

    .data
    .balign 8
pg_far:
    .long 0                             /* a gate's offset is the gate's: this one is ignored */
    .word SEL_GATE
pg_far_jmp:
    .long 0
    .word SEL_GATE + 16
    .globl pg_seen
pg_seen:
    .quad 0
    .text

/* Identity map of the first 1 GiB with 2 MiB pages, U/S=1 everywhere so ring-3
 * stubs and their stack need no separate mapping. Under nested paging the host
 * backs only our 2 MiB window (APM Vol. 2 15.25). */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl guest_pml4
guest_pml4:
    .quad guest_pdpt + 0x7
    .fill 511, 8, 0
guest_pdpt:
    .quad guest_pd + 0x7
    .fill 511, 8, 0
guest_pd:
    .set .Lpdi, 0
    .rept 512
    .quad (.Lpdi << 21) + 0x87      /* P RW US PS */
    .set .Lpdi, .Lpdi + 1
    .endr

    .data
    .balign 16
    .globl guest_gdt, guest_gdt_tss
guest_gdt:
    .quad 0
    .quad 0x00209b0000000000        /* 0x08 64-bit code DPL0 */
    .quad 0x00cf93000000ffff        /* 0x10 data DPL0 */
    .quad 0                         /* 0x18 unused */
    .quad 0x00cff3000000ffff        /* 0x20 data DPL3 */
    .quad 0x0020fb0000000000        /* 0x28 64-bit code DPL3 */
guest_gdt_tss:
    .quad 0, 0                      /* 0x30 64-bit TSS, filled by guest.c */
    .globl guest_gdt_ldt, guest_gdt_gate
guest_gdt_ldt:
    .quad 0, 0                      /* 0x40 LDT descriptor, filled by guest.c */
    .fill 6, 8, 0                   /* 0x50-0x7f unused */
guest_gdt_gate:
    .quad 0, 0                      /* 0x80 64-bit call gate to pg_call_target, filled by guest.c */
    .quad 0, 0                      /* 0x90 64-bit call gate to pg_jmp_target */
guest_gdt_end:
    .balign 8
guest_gdtr:
    .word guest_gdt_end - guest_gdt - 1
    .quad guest_gdt

    .bss
    .balign 16
    .space 16384
    .globl guest_stack_top
guest_stack_top:
