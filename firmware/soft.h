/* soft.h - the software trap-and-emulate host ("soft host"): runs the same
 * guest kernel as the SVM host (guests/build/guest.bin), deprivileged, the
 * way x86 VMMs did before VT-x/AMD-V: the guest kernel runs at CPL1 (ring
 * compression 0->1; guest user code stays at CPL3), every privileged
 * instruction it executes traps (#GP, SDM Vol. 3A 5.9) into this kernel's
 * exception handlers, which decode and emulate it against a virtual CPU state
 * (CR0/3/4, IDTR/GDTR/TR, IF) and deliver the guest's own exceptions through
 * its virtual IDT. soft.c: setup, run loop, records; soft_trap.c: trap
 * handler, decoder, emulation, exception delivery; soft_run.S: world switch. */
#ifndef SOFT_H
#define SOFT_H

#include "hv_guest.h"

/* hv_main (svm.c) calls this for host-mode=soft, or for host-mode=auto when
 * SVM is absent or disabled; why_soft = NULL (forced) or that SVM reason. */
void soft_main(const struct bootinfo *bi, struct hv_config *cfg, const char *why_soft);

/* ---- internal (soft.c / soft_trap.c / soft_run.S) ---- */

/* Host selectors the guest runs on (lab.h GDT): its DPL0 segments are
 * compressed to ring 1, its DPL3 ones stay ring 3. */
#define SOFT_KCS (SEL_R1CODE | 1)   /* 0x31 */
#define SOFT_KSS (SEL_R1DATA | 1)   /* 0x39 */
#define SOFT_UCS (SEL_UCODE | 3)    /* 0x2b */
#define SOFT_USS (SEL_UDATA | 3)    /* 0x23 */

enum soft_exit { SOFT_EXIT_NONE = 0, SOFT_EXIT_REPORT, SOFT_EXIT_END };
enum soft_mode { SOFT_IDLE = 0, SOFT_GUEST, SOFT_COST };

/* Trap reasons, one obs record each (docs/records.md "Software host"). */
enum soft_reason {
    TR_CPUID, TR_RDTSC, TR_OUT, TR_IN, TR_HLT, TR_CLI, TR_STI, TR_MOV_CR, TR_RDMSR,
    TR_WRMSR, TR_LGDT, TR_LIDT, TR_LTR, TR_LRET, TR_IRETQ, TR_MOV_SREG,
    TR_LLDT, TR_SGDT, TR_SIDT, TR_SLDT, TR_SMSW, TR_STR, TR_POP_SREG, TR_INT, TR_FAR_CALL, TR_FAR_JMP,
    TR_UD2,
    TR_VMMCALL, TR_VMCALL, TR_GP, TR_UD, TR_EXC, TR_UNKNOWN, TR_N
};
extern const char *const soft_reason_names[TR_N];

struct soft_vcpu {
    struct exc_frame f;     /* guest GPRs + IRETQ frame; soft_run.S uses offsets */
    u64 ds, es;             /* guest DS/ES selectors (176, 184) */
    /* virtual privileged state the guest believes it has */
    u64 cr0, cr2, cr3, cr4, cr8, efer, pat;
    u64 gdt_base, idt_base, tss_base;
    u16 gdt_lim, idt_lim, tr, ldtr;
    u16 vcs;                /* the guest's own selector for its kernel code (SOFT_KCS for the CPU) */
    int vif;                /* virtual RFLAGS.IF */
    /* policy */
    int cpuid_faulting;     /* MSR 0x140 bit 0 set while the guest runs */
    int rdtsc_intercept;    /* real CR4.TSD=1 always; emulated RDTSC gets LAB_TSC_MARK */
    int no_emulate_rdtsc;   /* soft-fault=no-emulate-rdtsc: reflect #GP instead */
    int unknown_hlt;        /* soft-fault=unknown-hlt: the decoder "forgets" HLT */
    int no_emulate_umip;    /* soft-fault=no-emulate-umip: SGDT's UMIP #GP reflected, not emulated */
    u64 host_cr4;           /* real CR4 of the host, TSD clear */
    const struct hv_config *cfg;
    struct hv_ctx *ctx;     /* the reports' state (hv_pg_count) */
    /* exit to soft_main */
    int exit;               /* enum soft_exit */
    const char *end;        /* why the guest ended (SOFT_EXIT_END) */
    u64 end_vector, end_err, end_rip, end_cs;
    u8 unemulated[15];
    int unemulated_len;
    /* accounting */
    u64 traps, hlts;
    u64 count[TR_N], reflected[TR_N];
    u32 exc_vectors;        /* bitmask of vectors counted as TR_EXC */
};

extern struct soft_vcpu soft_vcpu;
extern volatile int soft_mode;          /* enum soft_mode: what the hook serves */
extern u64 soft_host_rsp;               /* soft_run.S */

void soft_enter(struct soft_vcpu *v);   /* IRETQ into the guest; returns on exit */
extern char soft_exit_tramp[];          /* CPL0 landing pad of an exit */
int soft_trap(struct exc_frame *f);     /* exc hook for vectors 0-31 */
void soft_set_real_cr4(struct soft_vcpu *v);   /* real CR4.TSD from policy + virtual TSD */

#endif
