/* hv_guest.h - what any lab host (SVM now, a software trap-and-emulate host
 * later) shares about running the guest kernel: configuration from the command
 * line, loading the guest image, the CPUID view it presents, and decoding the
 * guest's reports (guests/include/lab_guest_abi.h) into records. */
#ifndef HV_GUEST_H
#define HV_GUEST_H

#include "lab.h"
#include "../guests/include/lab_guest_abi.h"

/* Guest GPRs. rax/rsp also live in the VMCB (VMRUN switches them); the SVM
 * loop mirrors rax here so handlers see one register file. svm_run.S uses the
 * offsets of rbx..r15 (HV_GREGS_* below). */
struct hv_gregs {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp;
    u64 r8, r9, r10, r11, r12, r13, r14, r15;
};

struct hv_config {
    const char *mode;       /* host-mode: auto | svm | soft | none */
    u8 signature[12];       /* hv-signature, decoded, NUL-padded */
    int sig_len;            /* bytes given before padding/truncation */
    int intercept_rdtsc;    /* hv-intercept-rdtsc (default 1) */
    int intercept_cpuid;    /* hv-intercept-cpuid (default 1) */
    int npt;                /* hv-npt (default 1: use nested paging if offered) */
    const char *fault;      /* hv-fault: NULL or "unknown-exit" */
};
#define HV_DEFAULT_SIGNATURE "LabRingMinus"

void hv_config_parse(struct hv_config *c);
/* `info hv=none reason=<why> hv.mode=<mode>`: no guest runs, and why. */
void hv_info_none(const struct hv_config *c, const char *why);

struct hv_guest_image {
    u64 load, entry, cr3, stack_top, image_size, mem_size;
    unsigned module;        /* index of the multiboot module it came from */
};
/* Find the guest module, check its header, copy it to its window and zero the
 * rest. Returns 0, or -1 with *why set to a record-ready reason. */
int hv_guest_load(const struct bootinfo *bi, struct hv_guest_image *img, const char **why);

/* The CPUID a guest sees: the host's, with CPUID.1:ECX[31] (hypervisor
 * present) set, SVM hidden, and leaves 0x40000000.. carrying the signature. */
void hv_cpuid(const struct hv_config *c, u32 leaf, u32 subleaf, struct cpuid_regs *r);

/* Host-side state while decoding guest reports. */
struct hv_ctx {
    const struct hv_config *cfg;
    const char *scope;      /* "guest-svm" */
    const char *exit_path;  /* name of the trapping path in cost keys: "vmexit" */
    const char *end;        /* why the guest ended: "done", "panic", ... (NULL: running) */
    const char *entry_via;  /* the host's entry as cpl-enter names it (NULL: "vmrun") */
    /* The pg-* family (LABHC_PG_BEGIN): the guest's probed text [pg_lo, pg_hi); the host logs
     * the guest RIP of each of its exits or traps there (hv_pg_count) until the next batch. */
    u64 pg_lo, pg_hi;
    u64 pg_log[LABHC_PG_LOG];
    unsigned pg_nlog;
};
static inline void hv_pg_count(struct hv_ctx *c, u64 rip)
{
    if (rip - c->pg_lo < c->pg_hi - c->pg_lo && c->pg_nlog < LABHC_PG_LOG)
        c->pg_log[c->pg_nlog++] = rip;
}
/* One OUT to LABHC_PORT: emit the record(s) it carries. Returns 1 when the
 * guest is finished (DONE or PANIC), else 0. */
int hv_guest_report(struct hv_ctx *c, struct hv_gregs *r);

/* CPUID round trips at host CPL0, TSC cycles for `iterations` of CPUID(0). */
u64 hv_native_cpuid_cycles(u64 iterations);

#endif
