/* svm.h - AMD SVM definitions: the VMCB layout (AMD APM Vol. 2, Appendix B),
 * intercept bits (15.9-15.13), exit codes (Appendix C) and MSRs (15.30). */
#ifndef SVM_H
#define SVM_H

#include "lab.h"

/* MSRs (APM Vol. 2 15.30) */
#define MSR_VM_CR        0xC0010114
#define VM_CR_LOCK       (1ull << 3)
#define VM_CR_SVMDIS     (1ull << 4)
#define MSR_VM_HSAVE_PA  0xC0010117

/* CPUID 0x8000000A EDX: SVM features (APM Vol. 3, CPUID Fn8000_000A) */
#define SVM_FEAT_NP      (1u << 0)
#define SVM_FEAT_NRIPS   (1u << 3)

/* Intercept vector 3 (VMCB 0x00C), APM Vol. 2 B.1 table B-1 */
#define ICPT3_INTR       (1u << 0)
#define ICPT3_RDTSC      (1u << 14)
#define ICPT3_CPUID      (1u << 18)
#define ICPT3_HLT        (1u << 24)
#define ICPT3_IOIO       (1u << 27)
#define ICPT3_MSR        (1u << 28)
#define ICPT3_SHUTDOWN   (1u << 31)
/* Intercept vector 4 (VMCB 0x010) */
#define ICPT4_VMRUN      (1u << 0)   /* mandatory: VMRUN fails without it (15.5.1) */
#define ICPT4_VMMCALL    (1u << 1)
#define ICPT4_VMLOAD     (1u << 2)
#define ICPT4_VMSAVE     (1u << 3)
#define ICPT4_STGI       (1u << 4)
#define ICPT4_CLGI       (1u << 5)
#define ICPT4_SKINIT     (1u << 6)

/* Exit codes, APM Vol. 2 Appendix C */
#define VMEXIT_EXCP0     0x40        /* + vector */
#define VMEXIT_RDTSC     0x6e
#define VMEXIT_CPUID     0x72
#define VMEXIT_HLT       0x78
#define VMEXIT_IOIO      0x7b
#define VMEXIT_SHUTDOWN  0x7f
#define VMEXIT_VMRUN     0x80
#define VMEXIT_VMMCALL   0x81
#define VMEXIT_VMLOAD    0x82
#define VMEXIT_VMSAVE    0x83
#define VMEXIT_STGI      0x84
#define VMEXIT_CLGI      0x85
#define VMEXIT_SKINIT    0x86
#define VMEXIT_NPF       0x400
#define VMEXIT_INVALID   0xffffffffffffffffull   /* QEMU stores it as 32-bit -1 too */

/* IOIO EXITINFO1 (15.10.2) */
#define IOIO_TYPE_IN     (1u << 0)
#define IOIO_STR         (1u << 2)
#define IOIO_SZ8         (1u << 4)
#define IOIO_SZ16        (1u << 5)
#define IOIO_SZ32        (1u << 6)

/* EVENTINJ (15.20) */
#define EVENTINJ_VALID   (1u << 31)
#define EVENTINJ_TYPE_EXCEPTION (3u << 8)

struct vmcb_seg {
    u16 selector;
    u16 attrib;      /* descriptor bits 47:40 -> 7:0, 55:52 -> 11:8 */
    u32 limit;
    u64 base;
} PACKED;

/* Control area: 0x000-0x3ff. Only the fields this hypervisor uses are named. */
struct vmcb_control {
    u16 icpt_cr_read, icpt_cr_write;    /* 0x000 */
    u16 icpt_dr_read, icpt_dr_write;    /* 0x004 */
    u32 icpt_exceptions;                /* 0x008 */
    u32 icpt_misc3;                     /* 0x00c */
    u32 icpt_misc4;                     /* 0x010 */
    u8  rsvd0[0x40 - 0x14];
    u64 iopm_base_pa;                   /* 0x040 */
    u64 msrpm_base_pa;                  /* 0x048 */
    u64 tsc_offset;                     /* 0x050 */
    u32 asid;                           /* 0x058 */
    u8  tlb_control;                    /* 0x05c */
    u8  rsvd1[3];
    u32 int_ctl;                        /* 0x060: V_TPR, V_IRQ, V_INTR_MASKING(24) */
    u32 int_vector;                     /* 0x064 */
    u64 int_state;                      /* 0x068: interrupt shadow */
    u64 exit_code;                      /* 0x070 */
    u64 exit_info_1;                    /* 0x078 */
    u64 exit_info_2;                    /* 0x080 */
    u64 exit_int_info;                  /* 0x088 */
    u64 np_enable;                      /* 0x090: bit 0 = nested paging */
    u8  rsvd2[0xa8 - 0x98];
    u64 event_inj;                      /* 0x0a8 */
    u64 n_cr3;                          /* 0x0b0 */
    u64 lbr_virt;                       /* 0x0b8 */
    u32 clean_bits;                     /* 0x0c0 */
    u32 rsvd3;
    u64 next_rip;                       /* 0x0c8: valid with NRIPS only */
    u8  insn_len;                       /* 0x0d0 */
    u8  insn_bytes[15];
    u8  rsvd4[0x400 - 0xe0];
} PACKED;

#define INT_CTL_V_INTR_MASKING (1u << 24)

/* State save area: 0x400-0xfff (Appendix B, table B-2). */
struct vmcb_save {
    struct vmcb_seg es, cs, ss, ds, fs, gs;     /* 0x400 */
    struct vmcb_seg gdtr, ldtr, idtr, tr;       /* 0x460 */
    u8  rsvd0[0x4cb - 0x4a0];
    u8  cpl;                                    /* 0x4cb */
    u32 rsvd1;
    u64 efer;                                   /* 0x4d0 */
    u8  rsvd2[0x548 - 0x4d8];
    u64 cr4, cr3, cr0, dr7, dr6, rflags, rip;   /* 0x548 */
    u8  rsvd3[0x5d8 - 0x580];
    u64 rsp;                                    /* 0x5d8 */
    u8  rsvd4[0x5f8 - 0x5e0];
    u64 rax;                                    /* 0x5f8 */
    u64 star, lstar, cstar, sfmask, kernel_gs_base;
    u64 sysenter_cs, sysenter_esp, sysenter_eip;
    u64 cr2;                                    /* 0x640 */
    u8  rsvd5[0x668 - 0x648];
    u64 g_pat;                                  /* 0x668 */
    u8  rsvd6[0x1000 - 0x670];
} PACKED;

struct vmcb {
    struct vmcb_control ctl;
    struct vmcb_save save;
} PACKED;

_Static_assert(sizeof(struct vmcb_control) == 0x400, "VMCB control area size");
_Static_assert(__builtin_offsetof(struct vmcb, save.cpl) == 0x4cb, "VMCB cpl offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.efer) == 0x4d0, "VMCB efer offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.cr4) == 0x548, "VMCB cr4 offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.rsp) == 0x5d8, "VMCB rsp offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.rax) == 0x5f8, "VMCB rax offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.g_pat) == 0x668, "VMCB g_pat offset");
_Static_assert(sizeof(struct vmcb) == 0x1000, "VMCB size");

struct hv_gregs;
/* svm_run.S: one world switch (VMSAVE host, VMLOAD guest, VMRUN, VMSAVE guest,
 * VMLOAD host) with the GPRs VMRUN does not switch loaded from/stored to *g. */
void svm_run(u64 vmcb_pa, u64 host_save_pa, struct hv_gregs *g);

#endif
