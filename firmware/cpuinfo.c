/* cpuinfo.c - what both host kernels (64-bit and arch32/) report about the CPU before
 * their probes, and the real-mode RDTSC probe's record (realmode.S ran it at boot). */
#include "lab.h"

void info_cpuid(void)
{
    struct cpuid_regs r0, r1, e0, e1 = { 0, 0, 0, 0 }, top;
    char vendor[12], top_bytes[12];
    cpuid(0, 0, &r0);
    cpuid(1, 0, &r1);
    cpuid(0x80000000, 0, &e0);
    if (e0.eax >= 0x80000001 && e0.eax <= 0x8000ffff)   /* old CPUs answer garbage there */
        cpuid(0x80000001, 0, &e1);
    memcpy(vendor, &r0.ebx, 4);
    memcpy(vendor + 4, &r0.edx, 4);
    memcpy(vendor + 8, &r0.ecx, 4);
    rec_begin("info");
    rec_hex("cpuid.max", r0.eax);
    rec_hex("cpuid.max_ext", e0.eax);
    rec_bytes("cpuid.vendor", vendor, 12);
    rec_u64("cpuid.tsc", (r1.edx >> 4) & 1);
    rec_u64("cpuid.rdtscp", (e1.edx >> 27) & 1);
    rec_u64("cpuid.svm", (e1.ecx >> 2) & 1);
    rec_u64("cpuid.hv", (r1.ecx >> 31) & 1);
    rec_end();

    /* The highest basic leaf's data (subleaf 0): what an out-of-range leaf returns under
     * Intel's rule (SDM Vol. 2A CPUID), which the lab's rule for leaf 0x40000000 names. */
    cpuid(r0.eax, 0, &top);
    memcpy(top_bytes, &top.ebx, 4);
    memcpy(top_bytes + 4, &top.ecx, 4);
    memcpy(top_bytes + 8, &top.edx, 4);
    rec_begin("info");
    rec_bytes("cpuid.top", top_bytes, 12);
    rec_end();
}

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
    rec_obs_begin("host", "rdtsc");
    rec_u64("tsd", 1);
    rec_u64("cpl", 0);
    rec_str("mode", "real");
    rec_exc("obs", r);
    rec_hex("cr0", realmode_cr0);
    rec_end();
}
