/* kmain.c - host probes, in the order of docs/records.md. Each probe prints
 * exactly one obs record (scope=host) and never judges what it saw. */
#include "lab.h"

#ifdef LAB_LIE
const char lab_variant[] = "lie";
#else
const char lab_variant[] = "normal";
#endif

extern u64 boot_cr0, boot_cr4, boot_efer, mb_info;
extern char __kernel_end[];
void cpu_init(void);
void bootinfo_init(u32 magic, u32 mbi_addr);
const char *boot_image_name(void);
void cpuid_vendor_probe(u32 out[4]);
void cpuid_hvbit_probe(u32 out[4]);
void cpuid_hvsig_probe(u32 out[4]);
void fault_inject(const char *kind);
void realmode_report(void);

static const char SCOPE[] = "host";

/* ---- current probe, for the GDB witness ---- */
volatile struct current_probe current_probe;

static void copy16(volatile char *d, const char *s)
{
    ((volatile u64 *)d)[0] = 0;
    ((volatile u64 *)d)[1] = 0;
    for (int i = 0; s && s[i] && i < 15; i++)
        d[i] = s[i];
}

void probe_set(const char *name, const char *param, u32 cpl, u32 tsd)
{
    current_probe.magic = 0x4c414221;
    current_probe.id++;
    current_probe.cpl = cpl;
    current_probe.tsd = tsd;
    copy16(current_probe.name, name);
    copy16(current_probe.param, param);
}

/* ---- ring bodies (run at CPLn; all memory is U/S=1) ---- */
static void ring_nop(void *arg) { (void)arg; }

struct insn_arg { u64 val; struct exc_result r; };

static void do_hlt(void *a) { struct exc_result r; TRY_INSN(r, "hlt"); ((struct insn_arg *)a)->r = r; }
static void do_cli(void *a) { struct exc_result r; TRY_INSN(r, "cli"); ((struct insn_arg *)a)->r = r; }
static void do_mov_cr4(void *a)
{
    struct insn_arg *ia = a;
    struct exc_result r;
    TRY_INSN_RAX(r, "mov %%rax, %%cr4", ia->val);   /* current value: harmless if it works */
    ia->r = r;
}
static void do_rdtsc(void *a) { struct exc_result r; TRY_INSN(r, "rdtsc"); ((struct insn_arg *)a)->r = r; }
static void do_rdtscp(void *a) { struct exc_result r; TRY_INSN(r, "rdtscp"); ((struct insn_arg *)a)->r = r; }

/* ---- probes ---- */
static void probe_cpl_enter_iretq(int cpl)
{
    probe_set("cpl-enter", "iretq", cpl, 0);
    struct exc_result r = run_at_cpl(cpl, ring_nop, NULL);
    u64 cs = ring_state.entry_cs;
    u64 via = ring_state.via, rcs = ring_state.return_cs;

    rec_obs_begin(SCOPE, "cpl-enter");
    rec_u64("cpl", cpl);
    rec_str("via", "iretq");
    if (r.faulted)
        rec_exc("obs", r);
    else if (LAB_IS_LIE && cpl == 3)
        rec_u64("obs", 0);                       /* lie: negative control */
    else
        rec_u64("obs", cs & 3);
    rec_hex("cs", cs);
    rec_end();

    probe_set("cpl-return", "ud2", cpl, 0);
    rec_obs_begin(SCOPE, "cpl-return");
    rec_u64("from_cpl", cpl);
    rec_str("via", "ud2");
    if (via == RING_VIA_UD)
        rec_u64("obs", rcs & 3);
    else
        rec_exc("obs", r);                       /* came back some other way */
    rec_hex("cs", rcs);
    rec_end();
}

static void probe_cpl_enter_sysret(void)
{
    probe_set("cpl-enter", "sysret", 3, 0);
    struct exc_result r = run_at_cpl_sysret(ring_nop, NULL);
    u64 cs = ring_state.entry_cs;
    rec_obs_begin(SCOPE, "cpl-enter");
    rec_u64("cpl", 3);
    rec_str("via", "sysret");
    if (r.faulted)
        rec_exc("obs", r);
    else if (LAB_IS_LIE)
        rec_u64("obs", 0);
    else
        rec_u64("obs", cs & 3);
    rec_hex("cs", cs);
    rec_end();
}

static void probe_cpl_return_syscall(int cpl)
{
    probe_set("cpl-return", "syscall", cpl, 0);
    struct exc_result r = run_at_cpl(cpl, ring_do_syscall, NULL);
    u64 via = ring_state.via, cs = ring_state.return_cs;
    rec_obs_begin(SCOPE, "cpl-return");
    rec_u64("from_cpl", cpl);
    rec_str("via", "syscall");
    if (via == RING_VIA_SYSCALL || via == RING_VIA_SYSCALL_UD)
        rec_u64("obs", cs & 3);                  /* CS read at the LSTAR entry */
    else
        rec_exc("obs", r);
    rec_hex("cs", cs);
    /* lstar: how the LSTAR entry got back to the kernel context. */
    rec_str("lstar", via == RING_VIA_SYSCALL ? "cpl0" :
                     via == RING_VIA_SYSCALL_UD ? "ud2" : "not-reached");
    rec_end();
}

static void probe_priv(const char *insn, probe_fn fn, int cpl)
{
    struct insn_arg a = { read_cr4(), EXC_OK };
    probe_set("priv-insn", insn, cpl, 0);
    struct exc_result r = run_at_cpl(cpl, fn, &a);
    if (r.faulted)   /* an unguarded fault elsewhere in the ring body */
        a.r = r;
    rec_obs_begin(SCOPE, "priv-insn");
    rec_str("insn", insn);
    rec_u64("cpl", cpl);
    rec_exc("obs", a.r);
    rec_end();
}

static void probe_tsc(const char *name, probe_fn fn, int tsd, int cpl)
{
    struct insn_arg a = { 0, EXC_OK };
    probe_set(name, "", cpl, tsd);
    u64 cr4 = read_cr4();
    write_cr4(tsd ? (cr4 | CR4_TSD) : (cr4 & ~CR4_TSD));
    struct exc_result r = run_at_cpl(cpl, fn, &a);
    write_cr4(cr4 & ~CR4_TSD);
    if (r.faulted)
        a.r = r;
    rec_obs_begin(SCOPE, name);
    rec_u64("tsd", tsd);
    rec_u64("cpl", cpl);
    if (LAB_IS_LIE && tsd == 1 && cpl == 3 && name[5] == 0)   /* "rdtsc" only */
        rec_str("obs", "ok");
    else
        rec_exc("obs", a.r);
    rec_end();
}

static void probe_cpuid(void)
{
    u32 v[4], h[4], s[4];

    probe_set("cpuid-vendor", "", 0, 0);
    cpuid_vendor_probe(v);
    char vendor[12];
    memcpy(vendor, &v[1], 4);       /* ebx */
    memcpy(vendor + 4, &v[3], 4);   /* edx */
    memcpy(vendor + 8, &v[2], 4);   /* ecx */
    if (LAB_IS_LIE)
        memcpy(vendor, "LieLieLieLie", 12);
    rec_obs_begin(SCOPE, "cpuid-vendor");
    rec_str("leaf", "0");
    rec_bytes("obs", vendor, 12);
    rec_hex("max", v[0]);
    rec_end();

    probe_set("cpuid-hv-bit", "", 0, 0);
    cpuid_hvbit_probe(h);
    rec_obs_begin(SCOPE, "cpuid-hv-bit");
    rec_u64("obs", (h[2] >> 31) & 1);
    rec_end();

    probe_set("cpuid-hv-sig", "", 0, 0);
    cpuid_hvsig_probe(s);
    char sig[12];
    memcpy(sig, &s[1], 4);          /* ebx */
    memcpy(sig + 4, &s[2], 4);      /* ecx */
    memcpy(sig + 8, &s[3], 4);      /* edx */
    rec_obs_begin(SCOPE, "cpuid-hv-signature");
    rec_bytes("obs", sig, 12);
    rec_hex("max", s[0]);
    rec_end();
}

static void info_platform(void)
{
    struct cpuid_regs r0, r1, e0, e1;
    cpuid(0, 0, &r0);
    cpuid(1, 0, &r1);
    cpuid(0x80000000, 0, &e0);
    e1 = (struct cpuid_regs){0, 0, 0, 0};
    if (e0.eax >= 0x80000001)
        cpuid(0x80000001, 0, &e1);
    char vendor[12];
    memcpy(vendor, &r0.ebx, 4);
    memcpy(vendor + 4, &r0.edx, 4);
    memcpy(vendor + 8, &r0.ecx, 4);

    rec_begin("info");
    rec_hex("cpuid.max", r0.eax);
    rec_hex("cpuid.max_ext", e0.eax);
    rec_bytes("cpuid.vendor", vendor, 12);
    rec_u64("cpuid.rdtscp", (e1.edx >> 27) & 1);
    rec_u64("cpuid.svm", (e1.ecx >> 2) & 1);
    rec_u64("cpuid.hv", (r1.ecx >> 31) & 1);
    rec_end();

    rec_begin("info");
    rec_hex("boot.cr0", boot_cr0);
    rec_hex("boot.cr4", boot_cr4);
    rec_hex("boot.efer", boot_efer);
    rec_hex("cr0", read_cr0());
    rec_hex("cr4", read_cr4());
    rec_hex("efer", rdmsr(MSR_EFER));
    rec_end();

    rec_begin("info");
    rec_str("image", boot_image_name());
    rec_u64("mods", bootinfo.nmods);
    rec_hex("mbi", mb_info);
    rec_hex("kernel_end", (u64)__kernel_end);
    rec_end();
    for (unsigned i = 0; i < bootinfo.nmods; i++) {
        rec_begin("info");
        rec_u64("mod", i);
        rec_hex("start", bootinfo.mods[i].start);
        rec_hex("end", bootinfo.mods[i].end);
        rec_str("string", bootinfo.mods[i].string);
        rec_end();
    }
}

NORETURN void kmain(u32 magic, u32 mbi)
{
    serial_init();
    cpu_init();
    bootinfo_init(magic, mbi);

    rec_begin("hello");
    rec_str("proto", "1");
    rec_str("kernel", "lab-host");
    rec_str("variant", lab_variant);
    rec_str("cmdline", bootinfo.cmdline);
    rec_end();

    const char *fault = cmdline_get("fault");
    if (fault)
        fault_inject(fault);

    info_platform();

    /* CPL transitions. IRETQ in, ud2 (#UD) back: SDM Vol. 3A 6.12.1. */
    static const int order[3] = { 3, 1, 2 };
    for (int i = 0; i < 3; i++)
        probe_cpl_enter_iretq(order[i]);
    probe_cpl_enter_sysret();
    for (int cpl = 1; cpl <= 3; cpl++)
        probe_cpl_return_syscall(cpl);

    /* Privileged instructions at CPL>0: #GP(0) (SDM Vol. 3A 5.9). */
    for (int i = 0; i < 3; i++) {
        probe_priv("hlt", do_hlt, order[i]);
        probe_priv("cli", do_cli, order[i]);
        probe_priv("mov-cr4", do_mov_cr4, order[i]);
    }

    /* RDTSC / RDTSCP vs CR4.TSD (SDM Vol. 2B RDTSC/RDTSCP: #GP(0) if
     * CR4.TSD=1 and CPL>0). */
    for (int tsd = 0; tsd <= 1; tsd++)
        for (int cpl = 0; cpl <= 3; cpl++)
            probe_tsc("rdtsc", do_rdtsc, tsd, cpl);
    realmode_report();
    if (cmdline_list_has("skip", "rdtscp")) {
        rec_info_str("skipped", "rdtscp");
    } else {
        for (int tsd = 0; tsd <= 1; tsd++)
            for (int cpl = 0; cpl <= 3; cpl++)
                probe_tsc("rdtscp", do_rdtscp, tsd, cpl);
    }

    probe_cpuid();

    probe_set("hv_main", "", 0, 0);
    hv_main(&bootinfo);
    probe_set("finish", "", 0, 0);
    lab_finish(LAB_EXIT_OK);
}

/* Real-mode RDTSC probe (realmode.S ran it at boot, with realmode=1). */
extern u32 realmode_ran, realmode_faulted, realmode_vector, realmode_cr0;
void realmode_report(void)
{
    if (!realmode_ran) {
        rec_info_str("skipped", "rdtsc-real");
        return;
    }
    probe_set("rdtsc", "real", 0, 1);
    struct exc_result r = EXC_OK;
    if (realmode_faulted) {
        r.faulted = 1;
        r.vector = realmode_vector;   /* real mode pushes no error code: shows as (0) */
    }
    rec_obs_begin(SCOPE, "rdtsc");
    rec_u64("tsd", 1);
    rec_u64("cpl", 0);
    rec_str("mode", "real");
    rec_exc("obs", r);
    rec_hex("cr0", realmode_cr0);
    rec_end();
}
