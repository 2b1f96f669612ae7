/* boot.S - multiboot v1 entry (32-bit protected mode, paging off, as QEMU's
 * multiboot loader leaves us), page tables, long mode, GDT.
 * No ring changes here: IRET to CPL>0 in 32-bit mode is an emulation
 * failure under kvm_pvm (docs/platform.md). */
#include "asm.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003     /* page-align modules, want mem info; no address fields */

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
    /* Control registers as the loader left them (reported as info). */
    mov %cr0, %eax
    mov %eax, boot_cr0
    mov %cr4, %eax
    mov %eax, boot_cr4
    mov $0xC0000080, %ecx
    rdmsr
    mov %eax, boot_efer
    mov %edx, boot_efer+4

    lgdt gdt_ptr
    ljmp $SEL_KCODE32, $1f
1:  mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %esp

    /* .bss is not zeroed here: the ELF loader zero-fills p_memsz beyond
     * p_filesz (QEMU does). Under kvm_pvm every CPL0 instruction is
     * emulated (~1000 cycles), so boot code must stay short. */

    /* Optional excursion to real mode (RDTSC with CR4.TSD=1, CR0.PE=0). */
    call realmode_probe32

    /* Page tables are static (below, in .data): no loop at boot. */

    /* Long mode: CR4.PAE, CR3, EFER.LME (+SCE for SYSCALL), CR0.PG
     * (SDM Vol. 3A 9.8.5 "Initializing IA-32e Mode"). */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x101, %eax             /* LME | SCE */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    ljmp $SEL_KCODE, $long_entry

    .code64
    .text
long_entry:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov mb_magic(%rip), %edi
    mov mb_info(%rip), %esi
    call kmain
    /* kmain does not return */
    mov $LAB_EXIT_PANIC, %al
    mov $0x501, %dx
    outb %al, %dx
4:  hlt
    jmp 4b

/* ---- GDT (see include/lab.h for the selector layout) ---- */
    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00AF9A000000FFFF        /* 0x08 64-bit code DPL0 */
    .quad 0x00CF92000000FFFF        /* 0x10 data DPL0 (flat, also 32-bit) */
    .quad 0x00CFFA000000FFFF        /* 0x18 32-bit code DPL3 (SYSRET base) */
    .quad 0x00CFF2000000FFFF        /* 0x20 data DPL3 */
    .quad 0x00AFFA000000FFFF        /* 0x28 64-bit code DPL3 */
    .quad 0x00AFBA000000FFFF        /* 0x30 64-bit code DPL1 */
    .quad 0x00CFB2000000FFFF        /* 0x38 data DPL1 */
    .quad 0x00AFDA000000FFFF        /* 0x40 64-bit code DPL2 */
    .quad 0x00CFD2000000FFFF        /* 0x48 data DPL2 */
    .quad 0, 0                      /* 0x50 64-bit TSS, filled by cpu_init() */
    .quad 0x00CF9A000000FFFF        /* 0x60 32-bit code DPL0 (boot) */
    .quad 0x00CF92000000FFFF        /* 0x68 32-bit data DPL0 */
    .quad 0x00009A000000FFFF        /* 0x70 16-bit code DPL0, base 0, limit 64K */
    .quad 0x000092000000FFFF        /* 0x78 16-bit data DPL0, base 0, limit 64K */
gdt_end:
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt                       /* 32-bit lgdt reads the low 4 bytes */

    .globl mb_magic, mb_info, boot_cr0, boot_cr4, boot_efer
    .balign 8
mb_magic:  .quad 0
mb_info:   .quad 0
boot_cr0:  .quad 0
boot_cr4:  .quad 0
boot_efer: .quad 0

/* Page tables: identity map 0..4 GiB with 2 MiB pages. U/S=1 at every level
 * so CPL3 code can run anywhere (SDM Vol. 3A 4.6: user-mode access needs U/S=1
 * in every paging-structure entry). P|RW|US = 0x7, PS adds 0x80. */
    .data
    .balign 4096
    .globl pml4, pdpt, pd
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7, pd + 0x1000 + 0x7, pd + 0x2000 + 0x7, pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set frame, 0
    .rept 2048
    .quad frame + 0x87
    .set frame, frame + 0x200000
    .endr

    .bss
    .balign 16
    .globl boot_stack, boot_stack_top
boot_stack: .skip 32768
boot_stack_top:
