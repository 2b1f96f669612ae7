/* soft.c - the software trap-and-emulate host (soft.h): setup, run loop and
 * records. The guest is guests/build/guest.bin, unchanged: it starts at CPL1
 * where the SVM host starts it at CPL0, reports through the same
 * `outl %eax,$0xe0` (which traps here as #GP instead of exiting), and its
 * records carry scope=guest-soft.
 *
 * Why CPL1 for the guest kernel (ring compression 0->1), not CPL3: on this
 * lab's kvm_pvm (docs/platform.md) RDTSC with CR4.TSD=1 raises #GP at CPL1 but
 * not at CPL3, and CPUID faulting works at CPL1 but not at CPL3, so only at
 * CPL1 do both trap; guest user code stays at CPL3. Ring changes use IRETQ
 * in and exceptions out, never `int n` (a KVM internal error at CPL0-2 and
 * #UD at CPL3 on kvm_pvm).
 *
 * Paging: the guest keeps running on the host's identity map (0..4 GiB, U/S=1,
 * boot.S); its CR3 is virtual. That is sound for this guest only because its
 * own tables map its 2 MiB window 1:1 (checked below, else hv=none). */
#include "soft.h"

#define SCOPE "guest-soft"
#define MSR_MISC_FEATURES        0x140
#define MISC_CPUID_FAULT         (1ull << 0)
/* Same budget as the guest's CPUID loop (guests/guest/guest.c), after
 * kvm-unit-tests' x86/vmexit.c: double K until K iterations take 2^23 cycles. */
#define COST_BUDGET_CYCLES (1ull << 23)
#define COST_MAX_ITER      (1ull << 20)


static void cpuid_try(void *a)
{
    struct exc_result r;
    TRY_INSN_RAX(r, "cpuid", 0);
    *(struct exc_result *)a = r;
}

/* CPUID faulting (Intel "Virtualization Technology FlexMigration Application
 * Note"; SDM Vol. 4: MSR_PLATFORM_INFO 0xCE bit 31 = supported,
 * MSR_MISC_FEATURE_ENABLES 0x140 bit 0 = CPUID at CPL>0 raises #GP(0)).
 * Offered is not trusted: one CPUID at CPL1 must actually fault. */
static int cpuid_faulting_probe(int *offered)
{
    u64 pi, misc;
    struct exc_result r = EXC_OK;

    *offered = !rdmsr_safe(MSR_PLATFORM_INFO, &pi) && (pi & PLATFORM_INFO_CPUID_FAULT);
    if (!*offered || rdmsr_safe(MSR_MISC_FEATURES, &misc) ||
        wrmsr_safe(MSR_MISC_FEATURES, misc | MISC_CPUID_FAULT))
        return 0;
    struct exc_result rr = run_at_cpl(1, cpuid_try, &r);
    wrmsr(MSR_MISC_FEATURES, misc);
    if (rr.faulted)
        r = rr;
    return r.faulted && r.vector == 13;
}

struct load_arg {
    const struct bootinfo *bi;
    struct hv_guest_image *img;
    const char *why;
    int rc;
};
static void load_ring(void *a)
{
    struct load_arg *la = a;
    la->rc = hv_guest_load(la->bi, la->img, &la->why);
}

/* The guest's own tables must map its window 1:1 (4-level, 2 MiB page,
 * P+RW+U/S: SDM Vol. 3A 4.5), as the host identity map does. */
static const char *check_guest_paging(u64 cr3)
{
    u64 va = LABG_WINDOW_BASE, t = cr3 & ~0xfffull, e = 0;
    for (int lvl = 3; lvl >= 1; lvl--) {
        u64 a = t + 8 * ((va >> (12 + 9 * lvl)) & 511);
        if (a < LABG_WINDOW_BASE || a + 8 > LABG_WINDOW_BASE + LABG_WINDOW_SIZE)
            return "guest-paging";
        e = *(const u64 *)a;
        if ((e & 7) != 7)
            return "guest-paging";
        t = e & 0x000ffffffffff000ull;
        if (lvl == 1 && (!(e & 0x80) || (e & 0x000fffffffe00000ull) != LABG_WINDOW_BASE))
            return "guest-paging";
    }
    return NULL;
}

/* ---- the trapped-RDTSC cost (when CPUID does not fault): host code at CPL1,
 * CR4.TSD=1, through the very trap path a guest RDTSC takes ---- */
struct cost_arg { u64 n, dt; };

static void cost_rdtsc_ring(void *a)
{
    struct cost_arg *c = a;
    u64 n = 1, dt;
    for (;;) {
        u64 t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            (void)rdtsc();
        dt = rdtsc() - t0;
        if (dt >= COST_BUDGET_CYCLES || n >= COST_MAX_ITER)
            break;
        n <<= 1;
    }
    c->n = n;
    c->dt = dt;
}

static void cost_rdtsc(struct soft_vcpu *v, const struct hv_gregs *g)
{
    struct cost_arg c = { 1, 0 };
    u64 gk = g->rsi ? g->rsi : 1;

    write_cr4(v->host_cr4 | CR4_TSD);
    soft_mode = SOFT_COST;
    struct exc_result r = run_at_cpl(1, cost_rdtsc_ring, &c);
    soft_mode = SOFT_IDLE;
    write_cr4(v->host_cr4);
    u64 t0 = rdtsc();
    for (u64 i = 0; i < c.n; i++)
        (void)rdtsc();
    u64 native = rdtsc() - t0;

    rec_begin("info");
    rec_str("scope", SCOPE);
    if (r.faulted)
        rec_exc("cost.rdtsc.fault", r);
    rec_u64("cost.rdtsc.trap_cycles", c.dt / c.n);
    rec_u64("cost.rdtsc.native_cycles", native / c.n);
    rec_u64("cost.iterations", c.n);
    rec_u64("cost.cpuid.intercepted", 0);
    /* the guest's own CPUID loop, which did not trap */
    rec_u64("cost.cpuid.guest_cycles", g->rdx / gk);
    rec_u64("cost.cpuid.guest_iterations", gk);
    rec_end();
}

/* One guest report (an `outl` to LABHC_PORT that trapped). 1 = guest done. */
static int soft_report(struct hv_ctx *ctx, struct soft_vcpu *v)
{
    struct exc_frame *f = &v->f;
    struct hv_gregs g = { f->rax, f->rbx, f->rcx, f->rdx, f->rsi, f->rdi, f->rbp,
                          f->r8, f->r9, f->r10, f->r11, f->r12, f->r13, f->r14, f->r15 };
    u32 fn = (u32)g.rax;

    if (fn == LABHC_CPL_ENTER && g.rdi == 0 && g.rsi == LABHC_VIA_VMRUN) {
        /* The guest names its entry "vmrun"; here it was our IRETQ to CPL1:
         * the guest kernel, which believes it runs at CPL0, runs at CPL1. */
        rec_obs_begin(SCOPE, "cpl-enter");
        rec_u64("cpl", 1);
        rec_str("via", "ring-compression");
        rec_u64("obs", g.rdx & 3);
        rec_hex("cs", g.rdx);
        rec_end();
        return 0;
    }
    if (fn == LABHC_COST && !v->cpuid_faulting) {
        cost_rdtsc(v, &g);
        return 0;
    }
    int r = hv_guest_report(ctx, &g);
    f->rax = g.rax;                     /* LABHC_PG_BEGIN answers in RAX */
    return r;
}

static const char hexdig[] = "0123456789abcdef";

static void end_info(struct soft_vcpu *v, struct hv_ctx *ctx)
{
    char bytes[31];

    if (v->unemulated_len) {
        int n = v->unemulated_len;
        for (int i = 0; i < n; i++) {
            bytes[2 * i] = hexdig[v->unemulated[i] >> 4];
            bytes[2 * i + 1] = hexdig[v->unemulated[i] & 15];
        }
        bytes[n > 0 ? 2 * n : 0] = 0;
        rec_begin("info");
        rec_str("soft.unemulated", n > 0 ? bytes : "rip-outside-window");
        rec_hex("rip", v->end_rip);
        rec_u64("cpl", v->end_cs & 3);
        rec_u64("vector", v->end_vector);
        rec_hex("err", v->end_err);
        rec_end();
    }
    rec_begin("info");
    rec_str("guest.end", v->end);
    rec_hex("guest.rip", v->end_rip);
    rec_hex("guest.cs", v->end_cs);
    rec_u64("guest.cpl", v->end_cs & 3);
    rec_u64("guest.vector", v->end_vector);
    rec_hex("guest.error_code", v->end_err);
    rec_end();
    ctx->end = v->end;
}

static void report_traps(struct soft_vcpu *v)
{
    for (int r = 0; r < TR_N; r++) {
        if (!v->count[r])
            continue;
        rec_obs_begin(SCOPE, "trap");
        rec_str("reason", soft_reason_names[r]);
        rec_u64("obs", v->count[r]);
        rec_u64("reflected", v->reflected[r]);
        if (r == TR_EXC)
            rec_hex("vectors", v->exc_vectors);
        rec_end();
    }
}

void soft_main(const struct bootinfo *bi, struct hv_config *cfg, const char *why_soft)
{
    static struct hv_config scfg;       /* what this host really intercepts */
    struct soft_vcpu *v = &soft_vcpu;
    struct hv_guest_image img;
    const char *why = NULL;
    int offered, faulting;
    u64 misc = 0;

    /* Copy the image at CPL3: it is plain memory work (all pages U/S=1) and
     * CPL3 runs natively on kvm_pvm, where a CPL0 byte loop over 48 KiB
     * costs ~0.2 s (firmware/README.md "Performance"). */
    struct load_arg la = { bi, &img, NULL, -1 };
    struct exc_result lr = run_at_cpl(3, load_ring, &la);
    why = lr.faulted ? "guest-load-fault" : la.rc ? la.why : check_guest_paging(img.cr3);
    if (why) {
        hv_info_none(cfg, why);
        return;
    }
    faulting = cpuid_faulting_probe(&offered);
    const char *fault = cmdline_get("soft-fault");

    for (u64 *q = (u64 *)v; q < (u64 *)(v + 1); q++)    /* not lib.c's byte loop (kvm_pvm) */
        *q = 0;
    v->no_emulate_rdtsc = fault && !strcmp(fault, "no-emulate-rdtsc");
    v->unknown_hlt = fault && !strcmp(fault, "unknown-hlt");
    v->no_emulate_umip = fault && !strcmp(fault, "no-emulate-umip");
    v->rdtsc_intercept = cfg->intercept_rdtsc && !v->no_emulate_rdtsc;
    v->cpuid_faulting = faulting && cfg->intercept_cpuid;
    scfg = *cfg;
    scfg.intercept_cpuid = v->cpuid_faulting;
    scfg.intercept_rdtsc = v->rdtsc_intercept;
    v->cfg = &scfg;

    rec_begin("info");
    rec_str("hv", "soft");
    rec_str("hv.mode", cfg->mode);
    rec_str("hv.soft_reason", why_soft ? why_soft : "forced");
    rec_u64("soft.guest_cpl", 1);
    rec_u64("soft.cpuid_faulting", (u64)v->cpuid_faulting);
    rec_u64("soft.cpuid_faulting_offered", (u64)offered);
    rec_u64("soft.cpuid_faulting_works", (u64)faulting);
    rec_str("soft.paging", "host-identity");
    rec_bytes("hv.signature", scfg.signature, 12);
    rec_u64("hv.signature_given", (u64)scfg.sig_len);
    rec_u64("hv.intercept_cpuid", (u64)scfg.intercept_cpuid);
    rec_u64("hv.intercept_rdtsc", (u64)scfg.intercept_rdtsc);
    rec_str("soft.fault", fault ? fault : "none");
    rec_hex("guest.load", img.load);
    rec_hex("guest.entry", img.entry);
    rec_hex("guest.mem_size", img.mem_size);
    rec_end();

    /* The CPU state the SVM host gives the guest (svm.c), but at CPL1. */
    v->f.rip = img.entry;
    v->f.cs = SOFT_KCS;
    v->vcs = SOFT_KCS;                  /* until the guest loads a CS of its own */
    v->f.rflags = 0x2;
    v->f.rsp = img.stack_top;
    v->f.ss = SOFT_KSS;
    v->cr0 = CR0_PG | (1ull << 16) | (1ull << 5) | (1ull << 4) | (1ull << 1) | CR0_PE;
    v->cr3 = img.cr3;
    v->cr4 = CR4_PAE;
    v->efer = EFER_LME | EFER_LMA;
    v->pat = 0x0007040600070406ull;
    v->host_cr4 = read_cr4() & ~CR4_TSD;
    if (v->cpuid_faulting)
        rdmsr_safe(MSR_MISC_FEATURES, &misc);

    struct hv_ctx ctx = { .cfg = &scfg, .scope = SCOPE, .exit_path = "trap", .end = NULL };
    v->ctx = &ctx;
    for (int i = 0; i < 32; i++)
        exc_set_hook(i, soft_trap);
    u64 t0 = rdtsc();
    for (;;) {
        v->exit = SOFT_EXIT_NONE;
        soft_set_real_cr4(v);
        if (v->cpuid_faulting)
            wrmsr(MSR_MISC_FEATURES, misc | MISC_CPUID_FAULT);
        soft_mode = SOFT_GUEST;
        soft_enter(v);                  /* returns at the next exit */
        soft_mode = SOFT_IDLE;
        if (v->cpuid_faulting)
            wrmsr(MSR_MISC_FEATURES, misc);
        write_cr4(v->host_cr4);
        if (v->exit == SOFT_EXIT_REPORT) {
            if (soft_report(&ctx, v))
                break;
            continue;
        }
        end_info(v, &ctx);
        break;
    }
    u64 cycles = rdtsc() - t0;
    for (int i = 0; i < 32; i++)
        exc_set_hook(i, NULL);

    report_traps(v);
    rec_begin("info");
    rec_u64("hv.traps", v->traps);
    rec_u64("hv.guest_cycles", cycles);
    rec_str("hv.guest_end", ctx.end ? ctx.end : "?");
    rec_end();
}
