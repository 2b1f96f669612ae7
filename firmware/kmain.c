/* kmain.c - the host kernel's main line: set up, run the probe table
 * (probe.c, generated from lab/catalogue.py), the real-mode probe, then the
 * hypervisor. Each probe prints exactly one obs record and never judges. */
#include "probe.h"

#if defined(LAB_LIE)
const char lab_variant[] = "lie";
#elif defined(LAB_LIE_CONTEXT)
const char lab_variant[] = "lie-context";
#elif defined(LAB_LIE_SKIP)
const char lab_variant[] = "lie-skip";
#else
const char lab_variant[] = "normal";
#endif

extern u64 boot_cr0, boot_cr4, boot_efer, mb_info;
extern char __kernel_end[];
void cpu_init(void);
void bootinfo_init(u32 magic, u32 mbi_addr);
const char *boot_image_name(void);
void fault_inject(const char *kind);
void realmode_report(void);

static const char SCOPE[] = "host";

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

    /* The highest basic leaf's data (subleaf 0): what an out-of-range leaf returns under
     * Intel's rule (SDM Vol. 2A CPUID), which the lab's rule for leaf 0x40000000 names. */
    struct cpuid_regs top;
    char top_bytes[12];
    cpuid(r0.eax, 0, &top);
    memcpy(top_bytes, &top.ebx, 4);
    memcpy(top_bytes + 4, &top.ecx, 4);
    memcpy(top_bytes + 8, &top.edx, 4);
    rec_begin("info");
    rec_bytes("cpuid.top", top_bytes, 12);
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

    probes_run_table();
    realmode_report();

    hv_main(&bootinfo);
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
