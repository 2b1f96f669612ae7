/* realmode.S - RDTSC with CR4.TSD=1 in real-address mode (CR0.PE=0).
 *
 * Done at boot, from 32-bit protected mode with paging off (before long
 * mode): 32-bit PM -> 16-bit PM (code copied below 1 MiB) -> clear CR0.PE ->
 * real mode -> rdtsc -> set CR0.PE -> back to 32-bit PM (SDM Vol. 3A 9.9.2
 * "Switching Back to Real-Address Mode"). A private IVT catches any
 * exception there. SDM Vol. 2B RDTSC: the TSD check applies to protected
 * mode (CPL>0); real-address mode lists no #GP for it.
 * On by default (works under TCG and kvm_pvm); cmdline realmode=0 skips it. */
#include "asm.h"

#define RM_BASE   0x7000        /* blob copied here (below 64 KiB: CS=0) */
#define RM_IVT    0x6800        /* private IVT: 32 vectors */
#define RM_STACK  0x6800        /* real-mode stack grows down from here */
#define RM(x)     (RM_BASE + ((x) - rm_blob))

    .section .boot32, "ax"
    .code32
    .globl realmode_probe32
realmode_probe32:
    /* Opt-out: search "realmode=0" in the multiboot cmdline (flags bit 2). */
    mov mb_magic, %eax
    cmp $0x2BADB002, %eax
    jne 3f
    mov mb_info, %ebx
    testl $4, (%ebx)
    jz 3f
    mov 16(%ebx), %esi              /* cmdline */
1:  cmpb $0, (%esi)
    je 3f
    mov $rm_key, %edi
    mov %esi, %edx
2:  movb (%edi), %al
    test %al, %al
    jz 9f                           /* "realmode=0" given: skip */
    cmpb (%edx), %al
    jne 4f
    inc %edi
    inc %edx
    jmp 2b
4:  inc %esi
    jmp 1b
3:  /* do the excursion */
    pushal
    mov %esp, rm_saved_esp
    sidt rm_saved_idt
    /* copy the 16-bit blob below 1 MiB */
    mov $rm_blob, %esi
    mov $RM_BASE, %edi
    mov $(rm_blob_end - rm_blob), %ecx
    cld
    rep movsb
    /* IVT: vector n -> 0000:RM(rm_vec_n) */
    mov $RM_IVT, %edi
    mov $RM(rm_vecs), %eax
    mov $32, %ecx
5:  mov %eax, (%edi)                /* offset (low 16), segment 0 (high 16) */
    add $8, %eax                    /* each stub is 8 bytes */
    add $4, %edi
    loop 5b
    ljmp $SEL_KCODE16, $RM(rm_pm16)
    .globl realmode_back32
realmode_back32:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov rm_saved_esp, %esp
    lidt rm_saved_idt
    /* results from the low copy into .data */
    movzwl RM(rm_res_faulted), %eax
    mov %eax, realmode_faulted
    movzwl RM(rm_res_vector), %eax
    mov %eax, realmode_vector
    movzwl RM(rm_res_cr0), %eax
    mov %eax, realmode_cr0
    movl $1, realmode_ran
    popal
9:  ret

/* ---- 16-bit blob, executed at RM_BASE ---- */
    .code16
    .balign 16
rm_blob:
rm_pm16:                            /* 16-bit protected mode, CPL0 */
    mov $SEL_KDATA16, %ax           /* 64 KiB limits: real-mode-compatible caches */
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %cr4, %eax
    or $4, %eax                     /* CR4.TSD=1 */
    mov %eax, %cr4
    mov %cr0, %eax
    and $0xfffffffe, %eax           /* CR0.PE=0 (paging is off) */
    mov %eax, %cr0
    ljmp $0, $RM(rm_real)
rm_real:                            /* real-address mode */
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $RM_STACK, %sp
    lidt RM(rm_ivt_desc)
    mov %cr0, %eax
    mov %ax, RM(rm_res_cr0)
    movw $0, RM(rm_res_faulted)
realmode_pre:                       /* GDB witness: stops here, steps the rdtsc (docs/gdb.md) */
    xchg %ax, %ax
    .globl realmode_rdtsc
realmode_rdtsc:                     /* GDB witness (CR0.PE=0, CR4.TSD=1) */
    rdtsc                           /* 2 bytes: the IVT stubs skip it */
    /* back: CR4.TSD=0, CR0.PE=1, far jump to 32-bit code */
    mov %cr4, %eax
    and $0xfffffffb, %eax
    mov %eax, %cr4
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    .byte 0x66, 0xea                /* ljmpl $SEL_KCODE32, $realmode_back32 */
    .long realmode_back32
    .word SEL_KCODE32

/* exception n in real mode: record it, skip the 2-byte rdtsc, iret */
rm_vecs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 8
    movw $\n, %ax
    jmp rm_exc_common
    .endr
    .balign 8
rm_exc_common:
    mov %ax, %cs:RM(rm_res_vector)
    movw $1, %cs:RM(rm_res_faulted)
    mov %sp, %bp
    addw $2, (%bp)                  /* IP of the faulting rdtsc += 2 */
    iret

    .balign 4
rm_ivt_desc:
    .word 32 * 4 - 1
    .long RM_IVT
rm_res_faulted: .word 0
rm_res_vector:  .word 0
rm_res_cr0:     .word 0
rm_blob_end:

    /* Where realmode_rdtsc really executes (the copy below 1 MiB). */
    .globl realmode_rdtsc_copy, realmode_pre_copy
    .set realmode_rdtsc_copy, RM(realmode_rdtsc)
    .set realmode_pre_copy, RM(realmode_pre)

    .code32
    .section .rodata
rm_key: .asciz "realmode=0"

    .data
    .balign 8
    .globl realmode_ran, realmode_faulted, realmode_vector, realmode_cr0
realmode_ran:     .long 0
realmode_faulted: .long 0
realmode_vector:  .long 0
realmode_cr0:     .long 0
rm_saved_esp:     .long 0
rm_saved_idt:     .word 0
                  .long 0, 0
    .text
    .code64
