/* cpuinfo.c - what both host kernels (64-bit and arch32/) report about the CPU before
 * their probes, and the real-mode RDTSC probe's record (realmode.S ran it at boot). */
#include "lab.h"

/* CPUID.(07H,0):ECX as this CPU answered it at boot (0 without leaf 7): the probes gate on
 * the CPU's own enumeration (probe.c), the lab's rules on the same record (lab/expectations.py). */
u32 cpu_leaf7_ecx;
u8 cpu_cpuid_faulting;   /* MSR_PLATFORM_INFO[31], read by info_cpuid() */

void info_cpuid(void)
{
    struct cpuid_regs r0, r1, e0, e1 = { 0, 0, 0, 0 }, top, l7 = { 0, 0, 0, 0 }, la = { 0, 0, 0, 0 };
    char vendor[12], top_bytes[12];
    cpuid(0, 0, &r0);
    cpuid(1, 0, &r1);
    if (r0.eax >= 7)
        cpuid(7, 0, &l7);
    if (r0.eax >= 0xa)   /* architectural performance monitoring (SDM Vol. 3B 20.2.1) */
        cpuid(0xa, 0, &la);
    cpu_leaf7_ecx = l7.ecx;
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

    /* The rest of what the lab's rules use, as the CPU answers it (SDM Vol. 2A CPUID): leaf 1
     * EAX family/model/stepping (family 0FH adds the extended family, 06H/0FH the extended
     * model), EDX[23] MMX, ECX[5] VMX; CPUID.(07H,0):ECX[2] UMIP; CPUID.0AH:EAX[7:0] the
     * PMU version, [15:8] its general-purpose counters; 80000001H EDX[11] SYSCALL, [29] LM. */
    u32 fam = (r1.eax >> 8) & 0xf, model = (r1.eax >> 4) & 0xf;
    if (fam == 0xf)
        fam += (r1.eax >> 20) & 0xff;
    if (fam == 0x6 || fam >= 0xf)
        model |= ((r1.eax >> 16) & 0xf) << 4;
    rec_begin("info");
    rec_u64("cpuid.family", fam);
    rec_u64("cpuid.model", model);
    rec_u64("cpuid.stepping", r1.eax & 0xf);
    rec_u64("cpuid.mmx", (r1.edx >> 23) & 1);
    rec_u64("cpuid.vmx", (r1.ecx >> 5) & 1);
    rec_u64("cpuid.umip", (l7.ecx >> 2) & 1);
    rec_u64("cpuid.pmu_version", la.eax & 0xff);
    rec_u64("cpuid.pmu_counters", (la.eax >> 8) & 0xff);
    rec_u64("cpuid.syscall", (e1.edx >> 11) & 1);
    rec_u64("cpuid.lm", (e1.edx >> 29) & 1);
    rec_end();

    /* An MSR-enumerated feature the rules use: CPUID faulting, offered by MSR_PLATFORM_INFO
     * 0xCE[31] (Intel SDM Vol. 4 2.17), read where the CPU has MSRs (CPUID.1:EDX[5]); a CPU
     * without that MSR faults on the RDMSR: not offered. */
    u64 pi = 0;
    cpu_cpuid_faulting = ((r1.edx >> 5) & 1) && !rdmsr_safe(MSR_PLATFORM_INFO, &pi)
                         && (pi & PLATFORM_INFO_CPUID_FAULT);
    rec_begin("info");
    rec_u64("msr.cpuid_faulting", cpu_cpuid_faulting);
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
