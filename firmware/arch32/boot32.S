/* boot32.S - the 32-bit host kernel's entry (CPU models without long mode).
 * Multiboot v1 leaves us in 32-bit protected mode, paging off: we stay there.
 * A flat GDT with code/data for rings 0-3 (same selectors as the 64-bit
 * kernel, include/asm.h), a 32-bit TSS (ESP0: SDM Vol. 3A 8.2.1, 6.12.1) and
 * a 32-bit IDT whose stubs are named isr_stub_<n> like the 64-bit ones (the
 * GDB witness stops there, docs/gdb.md). No paging: segment limits and DPLs
 * alone let ring 3 code run anywhere (SDM Vol. 3A 5.2). */
#include "asm.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003     /* page-align modules, want mem info */

    .section .multiboot, "a"
    .balign 4
    .globl mb_header
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .boot32, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    mov %eax, mb_magic
    mov %ebx, mb_info
    mov %cr0, %eax
    mov %eax, boot_cr0
    mov %cr4, %eax
    mov %eax, boot_cr4
    lgdt gdt_ptr
    ljmp $SEL_KCODE, $1f
1:  mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %esp
    /* RDTSC with CR4.TSD=1 in real mode (realmode.S, shared with the 64-bit
     * kernel); it comes back on SEL_KCODE32: reload the kernel's CS. */
    call realmode_probe32
    ljmp $SEL_KCODE, $2f
2:  xor %ebp, %ebp
    pushl mb_info
    pushl mb_magic
    call kmain32
    mov $LAB_EXIT_PANIC, %al
    mov $0x501, %dx
    outb %al, %dx
3:  hlt
    jmp 3b

/* ---- exception entry: the CPU pushed EIP, CS, EFLAGS (and ESP, SS from
 * CPL>0; SDM Vol. 3A 6.12.1), and the error code for 8, 10-14, 17, 21, 29, 30 ---- */
    .text
/* Each stub starts with the 2-byte no-op (66 90) the GDB witness may resume past, as in the
 * 64-bit kernel's isr.S (docs/gdb.md). */
.macro ISR_NOERR n
    .globl isr_stub_\n
    .balign 16
isr_stub_\n:
    xchg %ax, %ax
    pushl $0
    pushl $\n
    jmp isr_common
.endm
.macro ISR_ERR n
    .globl isr_stub_\n
    .balign 16
isr_stub_\n:
    xchg %ax, %ax
    pushl $\n
    jmp isr_common
.endm

/* A page of their own, as in isr.S: TCG runs a page holding a breakpoint one instruction per
 * translation block. */
    .balign 4096
ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
    .globl isr_stub_3, isr_stub_3_exc   /* _exc: the 64-bit kernel's name for the witness's #BP stop */
    .balign 16
isr_stub_3:
isr_stub_3_exc:
    xchg %ax, %ax
    pushl $0
    pushl $3
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
    .balign 4096

isr_common:
    pushal                          /* struct frame32 (main32.c) */
    cld
    push %esp
    call exc_dispatch32
    add $4, %esp
    popal
    add $8, %esp                    /* vector, error code */
    iret

    .section .rodata
    .balign 4
    .globl isr_stub_table
isr_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long isr_stub_\n
    .endr

/* ---- probe stubs (probe.c): the 64-bit ring.S's probe_call, for 32-bit ----
 * void probe_call(u64 cpl, void *rip, u64 rax, u64 rcx, u64 sysret, u64 rflags)
 * (cdecl: each u64 is two stack words, low first). CPL0 by a jump, CPL1-3 by
 * IRET to an outer privilege level (SDM Vol. 2A IRET: EIP, CS, EFLAGS, ESP,
 * SS). The stub's return trap (ud2) brings the CPU back to CPL0 through the
 * IDT; exc_dispatch32 then resumes the kernel context with ring_resume. */
    .text
    .globl probe_call
probe_call:
    push %ebp
    push %ebx
    push %esi
    push %edi
    mov %esp, ring_kctx_esp
    mov 20(%esp), %edi              /* cpl */
    mov 28(%esp), %esi              /* stub */
    cmpl $0, 48(%esp)               /* SYSRETQ: 64-bit mode only (no such row here) */
    jne probe_no_sysret
    mov 56(%esp), %ebx              /* EFLAGS for the IRET */
    mov 32(%esp), %eax              /* EAX for the stub */
    mov 40(%esp), %ecx              /* ECX for the stub */
    mov ring_stack_tops(,%edi,4), %edx
    test %edi, %edi
    jnz 1f
    mov %edx, %esp                  /* CPL0: no privilege change, just go */
    jmp *%esi
1:  pushl ring_ss_sels(,%edi,4)     /* SS with RPL = cpl */
    push %edx                       /* ESP */
    push %ebx                       /* EFLAGS */
    pushl ring_cs_sels(,%edi,4)     /* CS with RPL = cpl */
    push %esi                       /* EIP */
    .globl probe_iret               /* named for debugging: the IRET into a probe stub */
probe_iret:
    iret
probe_no_sysret:
    push $sysret_msg
    call panic

/* noreturn void ring_resume(void): drop the exception's stack, restore the
 * kernel context probe_call saved and return from probe_call. */
    .globl ring_resume
ring_resume:
    mov ring_kctx_esp, %esp
    mov $SEL_KDATA, %eax
    mov %eax, %ds                   /* a trap from CPL3 left the user's data selectors */
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    .globl ring_back_cpl0
ring_back_cpl0:
    pop %edi
    pop %esi
    pop %ebx
    pop %ebp
    ret

/* probe.c names the 64-bit LSTAR entry; the 32-bit table has no SYSCALL rows. */
    .globl syscall_entry
syscall_entry:
    ud2

/* records.c renders at CPL3 when rec_fast_ready is set; this kernel never sets
 * it (a 32-bit IRET to CPL3 is what kvm_pvm cannot run), so this is only the
 * symbol: the renderer runs in place. */
    .globl rec_render_cpl3
rec_render_cpl3:
    jmp rec_render_ring3

    .section .rodata
sysret_msg: .asciz "probe_call: SYSRETQ needs 64-bit mode"

/* ---- GDT: the 64-bit kernel's selectors (include/asm.h), 32-bit segments ---- */
    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00CF9A000000FFFF        /* 0x08 code DPL0 */
    .quad 0x00CF92000000FFFF        /* 0x10 data DPL0 */
    .quad 0x00CFFA000000FFFF        /* 0x18 code DPL3 */
    .quad 0x00CFF2000000FFFF        /* 0x20 data DPL3 */
    .quad 0x00CFFA000000FFFF        /* 0x28 code DPL3 (SEL_UCODE) */
    .quad 0x00CFBA000000FFFF        /* 0x30 code DPL1 */
    .quad 0x00CFB2000000FFFF        /* 0x38 data DPL1 */
    .quad 0x00CFDA000000FFFF        /* 0x40 code DPL2 */
    .quad 0x00CFD2000000FFFF        /* 0x48 data DPL2 */
    .quad 0, 0                      /* 0x50 32-bit TSS, filled by cpu_init32() */
    .quad 0x00CF9A000000FFFF        /* 0x60 code DPL0 (realmode.S returns here) */
    .quad 0x00CF92000000FFFF        /* 0x68 data DPL0 */
    .quad 0x00009A000000FFFF        /* 0x70 16-bit code DPL0 (real-mode trip) */
    .quad 0x000092000000FFFF        /* 0x78 16-bit data DPL0 */
gdt_end:
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .globl mb_magic, mb_info, boot_cr0, boot_cr4
    .balign 4
mb_magic:  .long 0
mb_info:   .long 0
boot_cr0:  .long 0
boot_cr4:  .long 0
    .globl ring_kctx_esp
ring_kctx_esp: .long 0
ring_cs_sels:
    .long SEL_KCODE, SEL_R1CODE | 1, SEL_R2CODE | 2, SEL_UCODE | 3
ring_ss_sels:
    .long SEL_KDATA, SEL_R1DATA | 1, SEL_R2DATA | 2, SEL_UDATA | 3
    .globl ring_stack_tops
ring_stack_tops:
    .long ring0_stack_top, ring1_stack_top, ring2_stack_top, ring3_stack_top

    .bss
    .balign 16
boot_stack: .skip 32768
boot_stack_top:
ring0_stack: .skip 16384            /* CPL0 probe stubs */
ring0_stack_top:
ring1_stack: .skip 16384
ring1_stack_top:
ring2_stack: .skip 16384
ring2_stack_top:
ring3_stack: .skip 16384
ring3_stack_top:
