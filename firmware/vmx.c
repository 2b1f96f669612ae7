/* vmx.c - the lab's minimal Intel VMX hypervisor (Intel SDM Vol. 3C chapters 23-27),
 * in the shape of the SVM host (svm.c): detect, enter VMX operation, build one VMCS
 * for the guest kernel (guests/), run it; vmx_run() is the world switch,
 * vmx_handle_exit() the VM-exit dispatcher: one switch, one small handler per exit
 * reason, one common advance-RIP. An exit nobody handles is reported with its reason
 * number and ends the guest, never the host. The host observes and relays. */
#include "vmx.h"
#include "hv_guest.h"

#define SCOPE      "guest-vmx"
#define MAX_EXITS  200000        /* a guest that only exits (a stuck RIP) ends, not hangs */
#define PA(p) ((u64)(p))         /* boot.S identity-maps 0..4 GiB */

/* Global, not static: GDB reads them by name, as svm_vmcb (docs/records.md). */
struct hv_gregs vmx_gregs;
static u8 vmxon_region[4096] ALIGNED(4096);     /* 24.11.5 */
static u8 vmcs_region[4096] ALIGNED(4096);      /* 24.2 */
static u64 ept_pml4[512] ALIGNED(4096);         /* 28.2.2 */
static u64 ept_pdpt[512] ALIGNED(4096);
static u64 ept_pd[512] ALIGNED(4096);

struct vmx_caps {
    u32 rev;                     /* IA32_VMX_BASIC[30:0] */
    int true_ctls;               /* IA32_VMX_BASIC[55]: the TRUE_* control MSRs exist */
    u64 pin, cpu, cpu2, exit, entry;   /* allowed-0 (low) / allowed-1 (high) settings */
    u64 ept_cap;
    u64 feature_control;
};

struct vmx_vcpu {
    struct hv_gregs *g;
    struct hv_config *cfg;
    struct hv_ctx ctx;
    u64 exits;
};

/* ---- exit accounting (same records as svm.c: vmexit reason=<name> obs=<count>) ---- */
struct exit_stat { u32 reason; const char *name; u64 count; };
static struct exit_stat exit_stats[] = {
    { EXIT_CPUID, "cpuid", 0 },       { EXIT_RDTSC, "rdtsc", 0 },
    { EXIT_HLT, "hlt", 0 },           { EXIT_IO, "io", 0 },
    { EXIT_VMCALL, "vmcall", 0 },     { EXIT_TRIPLE_FAULT, "triple-fault", 0 },
    { EXIT_EPT_VIOLATION, "ept-violation", 0 }, { EXIT_EPT_MISCONFIG, "ept-misconfig", 0 },
    { EXIT_INVALID_GUEST_STATE, "invalid-guest-state", 0 },
};
#define NSTATS (sizeof exit_stats / sizeof exit_stats[0])
static u64 vmx_insn_count, unknown_count;
static u32 unknown_reason;

static int is_vmx_insn(u32 r)
{
    return (r >= EXIT_VMCLEAR && r <= EXIT_VMXON) || r == EXIT_INVEPT || r == EXIT_INVVPID;
}

static void count_exit(u32 reason)
{
    for (unsigned i = 0; i < NSTATS; i++)
        if (exit_stats[i].reason == reason) {
            exit_stats[i].count++;
            return;
        }
    if (is_vmx_insn(reason)) {
        vmx_insn_count++;
        return;
    }
    unknown_count++;
    unknown_reason = reason;
}

/* ---- handlers: return 1 = skip the instruction, 0 = resume at the same RIP,
 * END = end the guest ---- */
#define END (-1)

static void end_info(struct vmx_vcpu *v, const char *why, u32 reason)
{
    rec_begin("info");
    rec_str("guest.end", why);
    rec_hex("guest.exit_code", reason);
    rec_hex("guest.exit_qualification", vmread(EXIT_QUALIFICATION));
    rec_hex("guest.exit_intr_info", vmread(EXIT_INTR_INFO));
    rec_hex("guest.rip", vmread(GUEST_RIP));
    rec_u64("guest.cpl", (vmread(GUEST_SS_AR) >> 5) & 3);   /* CPL = SS.DPL (24.4.1) */
    rec_end();
    v->ctx.end = why;
}

/* CPUID exits unconditionally (25.1.2). hv-intercept-cpuid=0 asks for a host that
 * passes the processor's own answer through, as an SVM host without the intercept. */
static int h_cpuid(struct vmx_vcpu *v)
{
    struct cpuid_regs r;
    if (v->cfg->intercept_cpuid)
        hv_cpuid(v->cfg, (u32)v->g->rax, (u32)v->g->rcx, &r);
    else
        cpuid((u32)v->g->rax, (u32)v->g->rcx, &r);
    v->g->rax = r.eax;                  /* 32-bit results zero-extend */
    v->g->rbx = r.ebx;
    v->g->rcx = r.ecx;
    v->g->rdx = r.edx;
    return 1;
}

static int h_rdtsc(struct vmx_vcpu *v)
{
    u64 t = rdtsc() + LAB_TSC_MARK;     /* recognisable, deltas exact */
    v->g->rax = (u32)t;
    v->g->rdx = t >> 32;
    return 1;
}

static int h_hlt(struct vmx_vcpu *v)
{
    (void)v;
    return 1;                           /* counted, then resumed after it */
}

/* I/O (27.2.1 table 27-5): size-1 in [2:0], IN in [3], string in [4], port in [31:16]. */
static int h_io(struct vmx_vcpu *v)
{
    u64 q = vmread(EXIT_QUALIFICATION);
    u32 port = (u32)(q >> 16) & 0xffff;

    if (q & IOQ_STRING) {               /* INS/OUTS: not emulated */
        rec_begin("info");
        rec_str("guest.end", "unsupported-io");
        rec_hex("guest.io_port", port);
        rec_hex("guest.rip", vmread(GUEST_RIP));
        rec_end();
        v->ctx.end = "unsupported-io";
        return END;
    }
    if (!(q & IOQ_IN)) {
        if (port == LABHC_PORT && hv_guest_report(&v->ctx, v->g))
            return END;                 /* the guest said DONE (or PANIC) */
        return 1;                       /* other OUTs: dropped */
    }
    /* IN from any port: an empty bus reads all ones */
    unsigned size = (unsigned)(q & IOQ_SIZE_MASK) + 1;
    u64 mask = size == 4 ? 0xffffffffull : size == 2 ? 0xffffull : 0xffull;
    v->g->rax = size == 4 ? mask : (v->g->rax & ~mask) | mask;
    return 1;
}

/* VMX instructions: VMX is hidden from the guest (hv_cpuid), so they are #UD for it,
 * as on a processor without VMX (event injection, 24.8.3 / 26.6). */
static int h_vmx_insn(struct vmx_vcpu *v)
{
    (void)v;
    vmwrite(ENTRY_INTR_INFO, INTR_VALID | INTR_TYPE_HW_EXCEPTION | 6);
    return 0;
}

/* VMCALL: the same ping the SVM host answers for VMMCALL. */
static int h_vmcall(struct vmx_vcpu *v)
{
    v->g->rax = v->g->rax == LABHC_VMMCALL_PING ? LABHC_VMMCALL_PONG : ~0ull;
    return 1;
}

/* Returns 1 to resume the guest, 0 to end it. GDB: `break vmx_handle_exit`. */
int vmx_handle_exit(struct vmx_vcpu *v)
{
    u32 full = (u32)vmread(EXIT_REASON);
    u32 reason = full & 0xffff;         /* basic exit reason (24.9.1) */
    int r;

    count_exit(reason);
    if (full & EXIT_ENTRY_FAILURE) {
    fault_linger_guest();    /* 26.7: the entry failed on guest state or MSR loading */
        end_info(v, reason == EXIT_INVALID_GUEST_STATE ? "invalid-guest-state" : "vmentry-failed", reason);
        return 0;
    }
    hv_pg_count(&v->ctx, vmread(GUEST_RIP));
    switch (reason) {
    case EXIT_CPUID:          r = h_cpuid(v); break;
    case EXIT_RDTSC:          r = h_rdtsc(v); break;
    case EXIT_HLT:            r = h_hlt(v); break;
    case EXIT_IO:             r = h_io(v); break;
    case EXIT_VMCALL:         r = h_vmcall(v); break;
    case EXIT_TRIPLE_FAULT:   end_info(v, "shutdown", reason); r = END; break;   /* 25.2 */
    case EXIT_EPT_VIOLATION:  end_info(v, "ept-violation", reason); r = END; break;  /* outside its window */
    case EXIT_EPT_MISCONFIG:  end_info(v, "ept-misconfig", reason); r = END; break;
    default:
        if (is_vmx_insn(reason)) {
            r = h_vmx_insn(v);
            break;
        }
        end_info(v, "unknown-exit", reason);   /* hv-fault=unknown-exit: reason 0 (#UD) */
        r = END;
    }
    if (r == END)
        return 0;
    if (r > 0)   /* the one advance-RIP: the VM-exit instruction length (27.2.4) */
        vmwrite(GUEST_RIP, vmread(GUEST_RIP) + vmread(EXIT_INSN_LEN));
    if (++v->exits >= MAX_EXITS) {
        end_info(v, "exit-limit", reason);
        return 0;
    }
    return 1;
}

/* ---- setup ---- */
/* 23.6: CPUID.1:ECX[5]; 23.7: IA32_FEATURE_CONTROL must allow VMXON outside SMX,
 * and is locked (by firmware, or here) before VMXON. */
static const char *vmx_detect(struct vmx_caps *c)
{
    struct cpuid_regs r;

    cpuid(1, 0, &r);
    if (!(r.ecx & (1u << 5)))
        return "no-vmx";
    u64 fc = rdmsr(MSR_FEATURE_CONTROL);
    if ((fc & FC_LOCK) && !(fc & FC_VMXON_OUTSIDE_SMX))
        return "vmx-disabled";
    c->feature_control = fc;
    u64 basic = rdmsr(MSR_VMX_BASIC);
    c->rev = (u32)basic & 0x7fffffff;
    c->true_ctls = (basic & VMX_BASIC_TRUE_CTLS) != 0;
    /* A.3-A.5: the TRUE_* MSRs, where they exist, allow the default1 bits to be 0. */
    c->pin = rdmsr(c->true_ctls ? MSR_VMX_TRUE_PINBASED : MSR_VMX_PINBASED);
    c->cpu = rdmsr(c->true_ctls ? MSR_VMX_TRUE_PROCBASED : MSR_VMX_PROCBASED);
    c->exit = rdmsr(c->true_ctls ? MSR_VMX_TRUE_EXIT : MSR_VMX_EXIT);
    c->entry = rdmsr(c->true_ctls ? MSR_VMX_TRUE_ENTRY : MSR_VMX_ENTRY);
    c->cpu2 = (c->cpu >> 32) & CPU_SECONDARY ? rdmsr(MSR_VMX_PROCBASED2) : 0;
    c->ept_cap = (c->cpu2 >> 32) & CPU2_EPT ? rdmsr(MSR_VMX_EPT_VPID_CAP) : 0;
    return NULL;
}

/* A.3: a control bit may be 0 only if clear in the low half (allowed-0), may be 1
 * only if set in the high half (allowed-1). Returns the wanted bits made legal;
 * *missing gets wanted bits the processor does not allow. */
static u32 adjust(u64 msr, u32 want, u32 *missing)
{
    u32 v = (want | (u32)msr) & (u32)(msr >> 32);
    *missing |= want & ~v;
    return v;
}

/* Host TR base from its 16-byte GDT descriptor (SDM Vol. 3A 7.2.3). */
static u64 host_tr_base(u64 gdt_base, u16 sel)
{
    const u8 *d = (const u8 *)(gdt_base + (sel & ~7u));
    u32 hi;
    memcpy(&hi, d + 8, 4);
    return (u64)d[2] | (u64)d[3] << 8 | (u64)d[4] << 16 | (u64)d[7] << 24 | (u64)hi << 32;
}

struct dtr { u16 limit; u64 base; } PACKED;

static u64 fixed(u64 v, u32 msr0, u32 msr1) { return (v | rdmsr(msr0)) & rdmsr(msr1); }

/* 26.2.2-26.2.4: the host-state area: where a VM exit returns to. */
static void vmcs_host_state(void)
{
    struct dtr gdt, idt;
    u16 tr;
    __asm__ volatile("sgdt %0" : "=m"(gdt));
    __asm__ volatile("sidt %0" : "=m"(idt));
    __asm__ volatile("str %0" : "=r"(tr));
    vmwrite(HOST_CR0, read_cr0());
    vmwrite(HOST_CR3, read_cr3());
    vmwrite(HOST_CR4, read_cr4());
    vmwrite(HOST_CS_SEL, SEL_KCODE);
    vmwrite(HOST_SS_SEL, SEL_KDATA);
    vmwrite(HOST_DS_SEL, SEL_KDATA);
    vmwrite(HOST_ES_SEL, SEL_KDATA);
    vmwrite(HOST_FS_SEL, 0);
    vmwrite(HOST_GS_SEL, 0);
    vmwrite(HOST_TR_SEL, tr);
    vmwrite(HOST_FS_BASE, rdmsr(MSR_FS_BASE));
    vmwrite(HOST_GS_BASE, rdmsr(MSR_GS_BASE));
    vmwrite(HOST_TR_BASE, host_tr_base(gdt.base, tr));
    vmwrite(HOST_GDTR_BASE, gdt.base);
    vmwrite(HOST_IDTR_BASE, idt.base);
    vmwrite(HOST_SYSENTER_CS, rdmsr(MSR_SYSENTER_CS));
    vmwrite(HOST_SYSENTER_ESP, rdmsr(MSR_SYSENTER_ESP));
    vmwrite(HOST_SYSENTER_EIP, rdmsr(MSR_SYSENTER_EIP));
    vmwrite(HOST_RIP, PA(vmx_exit_entry));
}

static void guest_seg(u32 sel_f, u16 sel, u32 ar)
{
    /* Encodings step by 2 per register (Appendix B): ES, CS, SS, DS, FS, GS, LDTR, TR. */
    u32 i = (sel_f - GUEST_ES_SEL) / 2;
    vmwrite(sel_f, sel);
    vmwrite(GUEST_ES_BASE + 2 * i, 0);
    vmwrite(GUEST_ES_LIMIT + 2 * i, ar & 0x10000 ? 0 : sel_f == GUEST_TR_SEL ? 0x67 : 0xffffffff);
    vmwrite(GUEST_ES_AR + 2 * i, ar);
}

/* The guest starts in 64-bit mode at CPL0 with its own page tables and no GDT/IDT
 * yet (it loads its own first), as under svm.c. Guest-state rules: 26.3.1
 * (checks on the guest-state area), access-rights format 24.4.1. */
static void vmcs_guest_state(const struct hv_guest_image *img, u64 cr4_shadow)
{
    u64 cr0 = fixed(CR0_PG | CR0_PE | (1ull << 5) | (1ull << 4), MSR_VMX_CR0_FIXED0, MSR_VMX_CR0_FIXED1);
    vmwrite(GUEST_CR0, cr0);
    vmwrite(CR0_SHADOW, cr0);
    vmwrite(GUEST_CR3, img->cr3);
    /* CR4.VMXE must stay 1 in VMX operation (A.8): owned by the host (mask) and
     * read as 0 by the guest (shadow), whose own CR4 writes leave it alone (25.3). */
    vmwrite(GUEST_CR4, fixed(cr4_shadow, MSR_VMX_CR4_FIXED0, MSR_VMX_CR4_FIXED1));
    vmwrite(CR4_MASK, CR4_VMXE);
    vmwrite(CR4_SHADOW, cr4_shadow);
    vmwrite(GUEST_DR7, 0x400);
    vmwrite(GUEST_RSP, img->stack_top);
    vmwrite(GUEST_RIP, img->entry);
    vmwrite(GUEST_RFLAGS, 0x2);                 /* IF=0 */
    guest_seg(GUEST_CS_SEL, 0x08, 0xa09b);      /* P S code R A, L=1, G=1 */
    guest_seg(GUEST_SS_SEL, 0x10, 0xc093);      /* P S data W A, D/B, G; DPL0 = CPL0 */
    guest_seg(GUEST_DS_SEL, 0x10, 0xc093);
    guest_seg(GUEST_ES_SEL, 0x10, 0xc093);
    guest_seg(GUEST_FS_SEL, 0, 0x10000);        /* unusable */
    guest_seg(GUEST_GS_SEL, 0, 0x10000);
    guest_seg(GUEST_LDTR_SEL, 0, 0x10000);
    guest_seg(GUEST_TR_SEL, 0, 0x008b);         /* busy 64-bit TSS: 26.3.1.2 */
    vmwrite(GUEST_GDTR_BASE, 0);
    vmwrite(GUEST_GDTR_LIMIT, 0);
    vmwrite(GUEST_IDTR_BASE, 0);
    vmwrite(GUEST_IDTR_LIMIT, 0);
    vmwrite(GUEST_DEBUGCTL, 0);
    vmwrite(GUEST_SYSENTER_CS, 0);
    vmwrite(GUEST_SYSENTER_ESP, 0);
    vmwrite(GUEST_SYSENTER_EIP, 0);
    vmwrite(GUEST_INTERRUPTIBILITY, 0);
    vmwrite(GUEST_ACTIVITY, 0);                 /* active */
    vmwrite(GUEST_PENDING_DBG, 0);
    vmwrite(VMCS_LINK_POINTER, ~0ull);          /* 26.3.1.5: no shadow VMCS */
}

/* EPT (28.2): the guest's physical space is only its 2 MiB window, mapped 1:1 with one
 * 2 MiB page (R/W/X, write-back when offered); anything else is an EPT violation. */
static u64 ept_init(u64 cap)
{
    u64 wb = cap & EPT_CAP_WB ? 6 : 0;
    memset(ept_pml4, 0, sizeof ept_pml4);
    memset(ept_pdpt, 0, sizeof ept_pdpt);
    memset(ept_pd, 0, sizeof ept_pd);
    ept_pml4[0] = PA(ept_pdpt) | 7;
    ept_pdpt[0] = PA(ept_pd) | 7;
    ept_pd[LABG_WINDOW_BASE >> 21] = LABG_WINDOW_BASE | 7 | wb << 3 | 1u << 7;
    return PA(ept_pml4) | 3u << 3 | wb;         /* 24.6.11: 4-level walk, memory type */
}

static void report_exits(void)
{
    for (unsigned i = 0; i < NSTATS; i++) {
        if (!exit_stats[i].count)
            continue;
        rec_obs_begin(SCOPE, "vmexit");
        rec_str("reason", exit_stats[i].name);
        rec_u64("obs", exit_stats[i].count);
        rec_u64("code", exit_stats[i].reason);
        rec_end();
    }
    if (vmx_insn_count) {
        rec_obs_begin(SCOPE, "vmexit");
        rec_str("reason", "vmx-insn");
        rec_u64("obs", vmx_insn_count);
        rec_end();
    }
    if (unknown_count) {
        rec_obs_begin(SCOPE, "vmexit");
        rec_str("reason", "unknown");
        rec_u64("obs", unknown_count);
        rec_u64("code", unknown_reason);
        rec_end();
    }
}

static void entry_failed(struct vmx_vcpu *v, int rc, int launched)
{
    rec_begin("info");
    rec_str("guest.end", launched ? "vmresume-failed" : "vmlaunch-failed");
    /* 30.4: the VM-instruction error number (VMfailValid only) */
    rec_u64("guest.vm_instruction_error", rc == 2 ? vmread(VM_INSTRUCTION_ERROR) : 0);
    rec_str("guest.vmfail", rc == 2 ? "valid" : "invalid");
    rec_end();
    v->ctx.end = launched ? "vmresume-failed" : "vmlaunch-failed";
}

/* hv_main (svm.c) calls this for host-mode=vmx, or for host-mode=auto on a processor
 * with VMX. Returns 0 when the VMX host ran (or reported why not), -1 when VMX is
 * absent or disabled (auto then tries SVM and the software host); *why says why. */
int vmx_main(const struct bootinfo *bi, struct hv_config *cfg, const char **why)
{
    static struct vmx_caps caps;
    struct hv_guest_image img;

    *why = vmx_detect(&caps);
    if (*why)
        return -1;
    if (hv_guest_load(bi, &img, why)) {
        hv_info_none(cfg, *why);
        return 0;
    }

    /* Controls (24.6-24.8), each adjusted to what the processor allows (A.3-A.5). */
    int no_rdtsc = cfg->fault && !strcmp(cfg->fault, "no-rdtsc-exit");   /* negative control */
    int want_ept = cfg->npt && (caps.ept_cap & EPT_CAP_WALK4) && (caps.ept_cap & EPT_CAP_2M);
    /* A VPID tags the guest's TLB entries, so VM entries and exits need not flush them
     * (28.1); without one every transition starts the guest on an empty TLB. */
    int want_vpid = (caps.cpu2 >> 32 & CPU2_VPID) != 0;
    u32 missing = 0;
    u32 pin = adjust(caps.pin, 0, &missing);
    u32 cpu = adjust(caps.cpu, CPU_HLT_EXITING | CPU_UNCOND_IO_EXITING |
                     (cfg->intercept_rdtsc && !no_rdtsc ? CPU_RDTSC_EXITING : 0) |
                     (want_ept || want_vpid ? CPU_SECONDARY : 0), &missing);
    u32 cpu2 = cpu & CPU_SECONDARY
             ? adjust(caps.cpu2, (want_ept ? CPU2_EPT : 0) | (want_vpid ? CPU2_VPID : 0), &missing) : 0;
    u32 exitc = adjust(caps.exit, EXIT_HOST_64, &missing);
    u32 entry = adjust(caps.entry, ENTRY_IA32E_GUEST, &missing);
    int use_ept = (cpu2 & CPU2_EPT) != 0;

    rec_begin("info");
    rec_str("hv", "vmx");
    rec_str("hv.mode", cfg->mode);
    rec_hex("hv.vmcs_rev", caps.rev);
    rec_u64("hv.true_controls", (u64)caps.true_ctls);
    rec_hex("hv.feature_control", caps.feature_control);
    rec_u64("hv.ept", (u64)use_ept);
    rec_u64("hv.ept_offered", (caps.cpu2 >> 32 & CPU2_EPT) ? 1 : 0);
    rec_u64("hv.vpid", (cpu2 & CPU2_VPID) ? 1 : 0);
    rec_hex("hv.controls_missing", missing);
    rec_bytes("hv.signature", cfg->signature, 12);
    rec_u64("hv.signature_given", (u64)cfg->sig_len);
    rec_u64("hv.intercept_cpuid", (u64)cfg->intercept_cpuid);
    rec_u64("hv.intercept_rdtsc", (u64)cfg->intercept_rdtsc);
    rec_str("hv.fault", cfg->fault ? cfg->fault : "none");
    rec_hex("guest.load", img.load);
    rec_hex("guest.entry", img.entry);
    rec_hex("guest.mem_size", img.mem_size);
    rec_end();
    if (missing) {                      /* a control the host needs is not offered */
        hv_info_none(cfg, "vmx-controls");
        return 0;
    }

    /* 23.7 / 23.8: lock IA32_FEATURE_CONTROL if firmware did not; CR0/CR4 fixed bits
     * (A.7, A.8) with CR4.VMXE; then VMXON with the revision id in its region (24.11.5). */
    if (!(caps.feature_control & FC_LOCK))
        wrmsr(MSR_FEATURE_CONTROL, caps.feature_control | FC_LOCK | FC_VMXON_OUTSIDE_SMX);
    u64 cr0 = read_cr0(), cr4 = read_cr4();
    write_cr0(fixed(cr0, MSR_VMX_CR0_FIXED0, MSR_VMX_CR0_FIXED1));
    write_cr4(fixed(cr4 | CR4_VMXE, MSR_VMX_CR4_FIXED0, MSR_VMX_CR4_FIXED1));
    memset(vmxon_region, 0, sizeof vmxon_region);
    memset(vmcs_region, 0, sizeof vmcs_region);
    memcpy(vmxon_region, &caps.rev, 4);
    memcpy(vmcs_region, &caps.rev, 4);
    const char *fail = vmx_on(PA(vmxon_region)) ? "vmxon-failed"
                     : vmx_clear(PA(vmcs_region)) ? "vmclear-failed"      /* 24.11.3: launch state clear */
                     : vmx_ptrld(PA(vmcs_region)) ? "vmptrld-failed" : NULL;
    if (fail) {
        write_cr4(cr4);
        write_cr0(cr0);
        hv_info_none(cfg, fail);
        return 0;
    }

    vmwrite(PIN_CONTROLS, pin);
    vmwrite(CPU_CONTROLS, cpu);
    if (cpu & CPU_SECONDARY)
        vmwrite(CPU_CONTROLS2, cpu2);
    vmwrite(EXIT_CONTROLS, exitc);
    vmwrite(ENTRY_CONTROLS, entry);
    /* Negative control: intercept #UD (exit reason 0), which has no handler. The
     * guest's first ud2 (its CPL3 round trip) then exits to the unknown-exit path. */
    vmwrite(EXCEPTION_BITMAP, cfg->fault && !strcmp(cfg->fault, "unknown-exit") ? 1u << 6 : 0);
    vmwrite(CR0_MASK, 0);
    if (use_ept)
        vmwrite(EPT_POINTER, ept_init(caps.ept_cap));
    if (cpu2 & CPU2_VPID)
        vmwrite(VPID, 1);                       /* 0 is the host's (26.2.1.1) */
    vmcs_host_state();
    vmcs_guest_state(&img, CR4_PAE);

    struct vmx_vcpu v = {
        .g = &vmx_gregs, .cfg = cfg,
        .ctx = { .cfg = cfg, .scope = SCOPE, .exit_path = "vmexit", .end = NULL, .entry_via = "vmentry" },
    };
    memset(&vmx_gregs, 0, sizeof vmx_gregs);
    u64 t0 = rdtsc();
    int launched = 0;
    for (;;) {
        int rc = vmx_run(&vmx_gregs, launched);
        if (rc) {
            entry_failed(&v, rc, launched);
            break;
        }
        launched = 1;
        if (!vmx_handle_exit(&v))
            break;
    }
    u64 cycles = rdtsc() - t0;

    vmx_clear(PA(vmcs_region));
    vmx_off();
    write_cr4(cr4);
    write_cr0(cr0);
    report_exits();
    rec_begin("info");
    u64 total = unknown_count + vmx_insn_count;
    for (unsigned i = 0; i < NSTATS; i++)
        total += exit_stats[i].count;
    rec_u64("hv.exits", total);
    rec_u64("hv.guest_cycles", cycles);
    rec_str("hv.guest_end", v.ctx.end ? v.ctx.end : "?");
    rec_end();
    return 0;
}
