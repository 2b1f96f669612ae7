/* Constants shared by the .S files (keep in sync with lab.h). */
#ifndef LAB_ASM_H
#define LAB_ASM_H
#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UCODE32 0x18
#define SEL_UDATA   0x20
#define SEL_UCODE   0x28
#define SEL_R1CODE  0x30
#define SEL_R1DATA  0x38
#define SEL_R2CODE  0x40
#define SEL_R2DATA  0x48
#define SEL_TSS     0x50
#define SEL_KCODE32 0x60
#define SEL_KDATA32 0x68
#define SEL_KCODE16 0x70
#define SEL_KDATA16 0x78
#define LAB_EXIT_PANIC 4
/* struct ring_state offsets */
#define RS_ACTIVE    0
#define RS_VIA       8
#define RS_RETURN_CS 16
#define RS_RESUME_CS 24
#define RS_ENTRY_CS  32
#define RING_VIA_UD         1
#define RING_VIA_SYSCALL    2
#define RING_VIA_SYSCALL_UD 3
/* SysV callee-saved registers, saved around a switch into ring code or a guest
 * and restored when the kernel context resumes (the pop order mirrors the push). */
#ifdef __ASSEMBLER__
.macro PUSH_CALLEE_SAVED
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
.endm
.macro POP_CALLEE_SAVED
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
.endm
#endif

#endif
