/* svm.c - the lab's minimal AMD SVM hypervisor (AMD APM Vol. 2, chapter 15).
 *
 * hv_main (called by kmain after the host probes) detects SVM, loads the guest
 * kernel from a multiboot module, builds one VMCB and runs it: svm_run() is
 * the world switch, svm_handle_exit() the #VMEXIT dispatcher: one switch, one
 * small handler per exit reason, one common advance-RIP. An exit nobody
 * handles is reported with its code and ends the guest, never the host.
 * The host observes and relays; it judges nothing. */
#include "svm.h"
#include "hv_guest.h"
#include "soft.h"
#include "vmx.h"

#define SCOPE      "guest-svm"
#define ASID       1             /* ASID 0 is the host's: VMRUN fails with it (15.5.1) */
#define MAX_EXITS  200000        /* a guest that only exits (a stuck RIP) ends, not hangs */
#define GUEST_PAT  0x0007040600070406ull   /* power-on PAT (used when nested paging is on) */

/* VMRUN/VMLOAD/VMSAVE take physical addresses: boot.S identity-maps 0..4 GiB,
 * so a pointer is its own physical address. */
#define PA(p) ((u64)(p))

/* Global, not static: GDB reads them by name (docs/records.md, "Hypervisor"). */
struct vmcb svm_vmcb ALIGNED(4096);             /* the guest's VMCB */
struct hv_gregs svm_gregs;                      /* guest GPRs VMRUN does not switch */
static u8 svm_host_save[4096] ALIGNED(4096);    /* VMSAVE/VMLOAD of host FS/GS/TR/.. */
static u8 svm_hsave[4096] ALIGNED(4096);        /* VM_HSAVE_PA (15.30.4) */
static u8 svm_iopm[3 * 4096] ALIGNED(4096);     /* 15.10.1: one bit per port, all set */
static u8 svm_msrpm[2 * 4096] ALIGNED(4096);    /* unused (MSR intercept off), kept valid */
static u64 npt_pml4[512] ALIGNED(4096);         /* nested page tables (15.25) */
static u64 npt_pdpt[512] ALIGNED(4096);
static u64 npt_pd[512] ALIGNED(4096);

struct svm_feat {
    u32 rev, nasid, edx;
};

struct svm_vcpu {
    struct vmcb *vmcb;
    struct hv_gregs *g;
    struct hv_config *cfg;
    struct hv_ctx ctx;
    int nrips;
    u64 exits;
};

/* ---- exit accounting ---- */
struct exit_stat { u64 code; const char *name; u64 count; };
static struct exit_stat exit_stats[] = {
    { VMEXIT_CPUID, "cpuid", 0 },     { VMEXIT_RDTSC, "rdtsc", 0 },
    { VMEXIT_HLT, "hlt", 0 },         { VMEXIT_IOIO, "ioio", 0 },
    { VMEXIT_VMMCALL, "vmmcall", 0 }, { VMEXIT_SHUTDOWN, "shutdown", 0 },
    { VMEXIT_VMRUN, "vmrun", 0 },     { VMEXIT_VMLOAD, "vmload", 0 },
    { VMEXIT_VMSAVE, "vmsave", 0 },   { VMEXIT_STGI, "stgi", 0 },
    { VMEXIT_CLGI, "clgi", 0 },       { VMEXIT_SKINIT, "skinit", 0 },
    { VMEXIT_NPF, "npf", 0 },         { VMEXIT_INVALID, "invalid", 0 },
};
#define NSTATS (sizeof exit_stats / sizeof exit_stats[0])
static u64 unknown_count, unknown_code;

static void count_exit(u64 code)
{
    for (unsigned i = 0; i < NSTATS; i++)
        if (exit_stats[i].code == code) {
            exit_stats[i].count++;
            return;
        }
    unknown_count++;
    unknown_code = code;
}

/* ---- handlers: return >0 = instruction length to skip, 0 = resume at the
 * same RIP, -1 = end the guest ---- */
#define END (-1)

static int h_cpuid(struct svm_vcpu *v)
{
    struct cpuid_regs r;
    hv_cpuid(v->cfg, (u32)v->g->rax, (u32)v->g->rcx, &r);
    v->g->rax = r.eax;                  /* 32-bit results zero-extend */
    v->g->rbx = r.ebx;
    v->g->rcx = r.ecx;
    v->g->rdx = r.edx;
    return 2;                           /* 0f a2 */
}

static int h_rdtsc(struct svm_vcpu *v)
{
    u64 t = rdtsc() + LAB_TSC_MARK;     /* recognisable, deltas exact */
    v->g->rax = (u32)t;
    v->g->rdx = t >> 32;
    return 2;                           /* 0f 31 */
}

static int h_hlt(struct svm_vcpu *v)
{
    (void)v;
    return 1;                           /* f4: counted, then resumed */
}

/* IOIO (15.10.2): EXITINFO1 = port<<16 | size | type, EXITINFO2 = next RIP. */
static int h_ioio(struct svm_vcpu *v)
{
    u64 info = v->vmcb->ctl.exit_info_1;
    u32 port = (u32)(info >> 16);
    int len = (int)(v->vmcb->ctl.exit_info_2 - v->vmcb->save.rip);

    if (info & IOIO_STR) {              /* INS/OUTS: not emulated */
        rec_begin("info");
        rec_str("guest.end", "unsupported-io");
        rec_hex("guest.io_port", port);
        rec_hex("guest.rip", v->vmcb->save.rip);
        rec_end();
        v->ctx.end = "unsupported-io";
        return END;
    }
    if (!(info & IOIO_TYPE_IN)) {
        if (port == LABHC_PORT && hv_guest_report(&v->ctx, v->g))
            return END;                 /* the guest said DONE (or PANIC) */
        return len;                     /* other OUTs: dropped */
    }
    /* IN from any port: an empty bus reads all ones */
    u64 mask = info & IOIO_SZ32 ? 0xffffffffull : info & IOIO_SZ16 ? 0xffffull : 0xffull;
    v->g->rax = info & IOIO_SZ32 ? mask : (v->g->rax & ~mask) | mask;
    return len;
}

static int h_vmmcall(struct svm_vcpu *v)
{
    v->g->rax = v->g->rax == LABHC_VMMCALL_PING ? LABHC_VMMCALL_PONG : ~0ull;
    return 3;                           /* 0f 01 d9 */
}

/* VMRUN/VMLOAD/VMSAVE/STGI/CLGI/SKINIT: SVM is hidden from the guest, so they
 * are #UD for it, as on a CPU without SVM (EVENTINJ, 15.20). */
static int h_svm_insn(struct svm_vcpu *v)
{
    v->vmcb->ctl.event_inj = EVENTINJ_VALID | EVENTINJ_TYPE_EXCEPTION | 6;
    return 0;
}

static void end_info(struct svm_vcpu *v, const char *why)
{
    rec_begin("info");
    rec_str("guest.end", why);
    rec_hex("guest.exit_code", v->vmcb->ctl.exit_code);
    rec_hex("guest.exit_info_1", v->vmcb->ctl.exit_info_1);
    rec_hex("guest.exit_info_2", v->vmcb->ctl.exit_info_2);
    rec_hex("guest.rip", v->vmcb->save.rip);
    rec_u64("guest.cpl", v->vmcb->save.cpl);
    rec_end();
    v->ctx.end = why;
}

/* Shutdown (triple fault) leaves the VMCB state undefined (15.13.2): end. */
static int h_shutdown(struct svm_vcpu *v) { end_info(v, "shutdown"); return END; }
/* Nested page fault: the guest left its 2 MiB window (15.25.6). */
static int h_npf(struct svm_vcpu *v) { end_info(v, "npf"); return END; }
/* VMRUN refused the VMCB (15.5.1 consistency checks). */
static int h_invalid(struct svm_vcpu *v) { end_info(v, "vmrun-invalid"); return END; }
/* No handler: report the code, end the guest cleanly (hv-fault=unknown-exit). */
static int h_unknown(struct svm_vcpu *v) { end_info(v, "unknown-exit"); return END; }

/* Returns 1 to resume the guest, 0 to end it. GDB: `break svm_handle_exit`. */
int svm_handle_exit(struct svm_vcpu *v)
{
    struct vmcb *vm = v->vmcb;
    u64 code = vm->ctl.exit_code;
    int r;

    if ((u32)code == 0xffffffffu)       /* QEMU reports -1 as 32-bit */
        code = vm->ctl.exit_code = VMEXIT_INVALID;
    count_exit(code);
    hv_pg_count(&v->ctx, vm->save.rip);
    vm->ctl.event_inj = 0;
    fault_linger_guest();
    v->g->rax = vm->save.rax;

    switch (code) {
    case VMEXIT_CPUID:    r = h_cpuid(v); break;
    case VMEXIT_RDTSC:    r = h_rdtsc(v); break;
    case VMEXIT_HLT:      r = h_hlt(v); break;
    case VMEXIT_IOIO:     r = h_ioio(v); break;
    case VMEXIT_VMMCALL:  r = h_vmmcall(v); break;
    case VMEXIT_VMRUN: case VMEXIT_VMLOAD: case VMEXIT_VMSAVE:
    case VMEXIT_STGI: case VMEXIT_CLGI: case VMEXIT_SKINIT:
                          r = h_svm_insn(v); break;
    case VMEXIT_SHUTDOWN: r = h_shutdown(v); break;
    case VMEXIT_NPF:      r = h_npf(v); break;
    case VMEXIT_INVALID:  r = h_invalid(v); break;
    default:              r = h_unknown(v); break;
    }
    if (r == END)
        return 0;
    vm->save.rax = v->g->rax;
    /* The one advance-RIP. Without NRIPS (qemu64,+svm) next_rip reads 0 and
     * the handler's length is used (15.7.1). */
    if (r > 0)
        vm->save.rip = v->nrips && vm->ctl.next_rip ? vm->ctl.next_rip : vm->save.rip + (u64)r;
    if (++v->exits >= MAX_EXITS) {
        end_info(v, "exit-limit");
        return 0;
    }
    return 1;
}

/* ---- setup ---- */
/* CPUID 0x80000001 ECX[2] = SVM; VM_CR.SVMDIS (MSR 0xC0010114 bit 4) set by
 * firmware means EFER.SVME cannot be set (15.4). */
static const char *svm_detect(struct svm_feat *f)
{
    struct cpuid_regs r;

    cpuid(0x80000000, 0, &r);
    if (r.eax < 0x80000001)
        return "no-svm";
    cpuid(0x80000001, 0, &r);
    if (!(r.ecx & (1u << 2)))
        return "no-svm";
    if (rdmsr(MSR_VM_CR) & VM_CR_SVMDIS)
        return "svm-disabled";
    f->rev = f->nasid = f->edx = 0;
    cpuid(0x80000000, 0, &r);
    if (r.eax >= 0x8000000a) {
        cpuid(0x8000000a, 0, &r);
        f->rev = r.eax & 0xff;
        f->nasid = r.ebx;
        f->edx = r.edx;
    }
    return NULL;
}

static void seg(struct vmcb_seg *s, u16 sel, u16 attrib, u32 limit, u64 base)
{
    *s = (struct vmcb_seg){ sel, attrib, limit, base };
}

/* The guest starts in 64-bit mode at CPL0 with its own page tables and no
 * GDT/IDT yet (it loads its own first). Field rules: APM Vol. 2 15.5.1
 * (VMRUN consistency checks), Appendix B (layout). */
static void svm_vmcb_init(struct vmcb *vm, const struct hv_guest_image *img,
                          const struct hv_config *cfg, int use_npt)
{
    memset(vm, 0, sizeof *vm);

    vm->ctl.icpt_misc3 = ICPT3_HLT | ICPT3_IOIO | ICPT3_SHUTDOWN |
                         (cfg->intercept_cpuid ? ICPT3_CPUID : 0) |
                         (cfg->intercept_rdtsc ? ICPT3_RDTSC : 0);
    vm->ctl.icpt_misc4 = ICPT4_VMRUN | ICPT4_VMMCALL | ICPT4_VMLOAD | ICPT4_VMSAVE |
                         ICPT4_STGI | ICPT4_CLGI | ICPT4_SKINIT;
    /* Negative control: intercept #UD (exit 0x46), which has no handler. The
     * guest's first ud2 (its CPL3 round trip) then exits to h_unknown. */
    if (cfg->fault && !strcmp(cfg->fault, "unknown-exit"))
        vm->ctl.icpt_exceptions = 1u << 6;
    vm->ctl.iopm_base_pa = PA(svm_iopm);
    vm->ctl.msrpm_base_pa = PA(svm_msrpm);
    vm->ctl.asid = ASID;
    vm->ctl.tlb_control = 1;                    /* flush this ASID on the first VMRUN */
    vm->ctl.int_ctl = INT_CTL_V_INTR_MASKING;   /* host IF (0) gates physical INTR */
    if (use_npt) {
        vm->ctl.np_enable = 1;
        vm->ctl.n_cr3 = PA(npt_pml4);
    }

    struct vmcb_save *s = &vm->save;
    seg(&s->cs, 0x08, 0x0a9b, 0xffffffff, 0);  /* P S code R A, L=1 G=1 */
    seg(&s->ds, 0x10, 0x0c93, 0xffffffff, 0);  /* P S data W A, D/B G */
    s->es = s->ss = s->ds;
    seg(&s->tr, 0, 0x0089, 0x67, 0);           /* available 64-bit TSS: 0x08b aborts QEMU */
    s->cpl = 0;
    s->efer = EFER_LME | EFER_LMA | EFER_SVME; /* SVME must be set in the guest too */
    s->cr0 = CR0_PG | (1ull << 16) | (1ull << 5) | (1ull << 4) | (1ull << 1) | CR0_PE;
    s->cr3 = img->cr3;
    s->cr4 = CR4_PAE;
    s->dr6 = 0xffff0ff0;
    s->dr7 = 0x400;
    s->rflags = 0x2;                            /* IF=0 */
    s->rip = img->entry;
    s->rsp = img->stack_top;
    s->g_pat = GUEST_PAT;
}

/* Nested paging: the guest's physical space is only its 2 MiB window, mapped
 * 1:1 with one large page. U/S=1 at every level: nested walks are user
 * accesses (15.25.5). */
static void svm_npt_init(void)
{
    npt_pml4[0] = PA(npt_pdpt) | 7;
    npt_pdpt[0] = PA(npt_pd) | 7;
    npt_pd[LABG_WINDOW_BASE >> 21] = LABG_WINDOW_BASE | 0x87;  /* P RW US PS */
}

static void report_exits(void)
{
#ifdef LAB_LIE_GUEST_CPUID
    for (unsigned i = 0; i < NSTATS; i++)   /* the negative control: exits that never happened */
        if (exit_stats[i].code == VMEXIT_CPUID && !exit_stats[i].count)
            exit_stats[i].count = 3;
#endif
    for (unsigned i = 0; i < NSTATS; i++) {
        if (!exit_stats[i].count)
            continue;
        rec_obs_begin(SCOPE, "vmexit");
        rec_str("reason", exit_stats[i].name);
        rec_u64("obs", exit_stats[i].count);
        rec_hex("code", exit_stats[i].code == VMEXIT_INVALID ? 0xffffffffu : exit_stats[i].code);
        rec_end();
    }
    if (unknown_count) {
        rec_obs_begin(SCOPE, "vmexit");
        rec_str("reason", "unknown");
        rec_u64("obs", unknown_count);
        rec_hex("code", unknown_code);
        rec_end();
    }
}

void hv_main(const struct bootinfo *bi)
{
    static struct hv_config cfg;
    struct svm_feat feat;
    struct hv_guest_image img;
    const char *why;

    hv_config_parse(&cfg);
    if (!strcmp(cfg.mode, "soft")) {   /* software trap-and-emulate host (soft.c) */
        soft_main(bi, &cfg, NULL);
        return;
    }
    /* Intel VMX (vmx.c) when forced, or for auto on a processor that has it. */
    if (!strcmp(cfg.mode, "vmx") || !strcmp(cfg.mode, "auto")) {
        const char *why_vmx;
        if (!vmx_main(bi, &cfg, &why_vmx))
            return;
        if (!strcmp(cfg.mode, "vmx")) {
            hv_info_none(&cfg, why_vmx);
            return;
        }
    }
    why = !strcmp(cfg.mode, "none") ? "host-mode-none"
        : strcmp(cfg.mode, "auto") && strcmp(cfg.mode, "svm") ? "bad-host-mode"
        : svm_detect(&feat);
    if (!why)
        hv_guest_load(bi, &img, &why);
    if (why) {
        if (!strcmp(cfg.mode, "auto") && (!strcmp(why, "no-svm") || !strcmp(why, "svm-disabled")))
            soft_main(bi, &cfg, why);   /* auto without SVM: the soft host (soft.c) */
        else
            hv_info_none(&cfg, why);
        return;
    }

    /* 15.4: EFER.SVME on, then the host save area. */
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
    wrmsr(MSR_VM_HSAVE_PA, PA(svm_hsave));
    memset(svm_iopm, 0xff, sizeof svm_iopm);
    int use_npt = cfg.npt && (feat.edx & SVM_FEAT_NP);
    if (use_npt)
        svm_npt_init();
    svm_vmcb_init(&svm_vmcb, &img, &cfg, use_npt);

    rec_begin("info");
    rec_str("hv", "svm");
    rec_str("hv.mode", cfg.mode);
    rec_u64("hv.svm_rev", feat.rev);
    rec_u64("hv.nasid", feat.nasid);
    rec_u64("hv.asid", ASID);
    rec_u64("hv.npt", (u64)use_npt);
    rec_u64("hv.npt_offered", feat.edx & SVM_FEAT_NP);
    rec_u64("hv.nrips", (feat.edx & SVM_FEAT_NRIPS) ? 1 : 0);
    rec_bytes("hv.signature", cfg.signature, 12);
    rec_u64("hv.signature_given", (u64)cfg.sig_len);   /* bytes asked for: padded/truncated to 12 */
    rec_u64("hv.intercept_cpuid", (u64)cfg.intercept_cpuid);
    rec_u64("hv.intercept_rdtsc", (u64)cfg.intercept_rdtsc);
    rec_str("hv.fault", cfg.fault ? cfg.fault : "none");
    rec_hex("guest.load", img.load);
    rec_hex("guest.entry", img.entry);
    rec_hex("guest.mem_size", img.mem_size);
    rec_end();

    struct svm_vcpu v = {
        .vmcb = &svm_vmcb, .g = &svm_gregs, .cfg = &cfg,
        .ctx = { .cfg = &cfg, .scope = SCOPE, .exit_path = "vmexit", .end = NULL },
        .nrips = (feat.edx & SVM_FEAT_NRIPS) != 0,
    };
    memset(&svm_gregs, 0, sizeof svm_gregs);
    u64 t0 = rdtsc();
    do {
        svm_run(PA(&svm_vmcb), PA(svm_host_save), &svm_gregs);
        svm_vmcb.ctl.tlb_control = 0;
    } while (svm_handle_exit(&v));
    u64 cycles = rdtsc() - t0;

    wrmsr(MSR_EFER, rdmsr(MSR_EFER) & ~EFER_SVME);
    report_exits();
    rec_begin("info");
    u64 total = unknown_count;
    for (unsigned i = 0; i < NSTATS; i++)
        total += exit_stats[i].count;
    rec_u64("hv.exits", total);
    rec_u64("hv.guest_cycles", cycles);
    rec_str("hv.guest_end", v.ctx.end ? v.ctx.end : "?");
    rec_end();
}
