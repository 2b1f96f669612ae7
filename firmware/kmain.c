/* kmain.c - the host kernel's main line: set up, run the probe table
 * (probe.c, generated from lab/catalogue.py), the real-mode probe, then the
 * hypervisor. Each probe prints exactly one obs record and never judges. */
#include "probe.h"

const char lab_variant[] = LAB_VARIANT_NAME;   /* firmware/Makefile VARIANT */

extern u64 boot_cr0, boot_cr4, boot_efer, mb_info;
extern char __kernel_end[];
void cpu_init(void);
void bootinfo_init(u32 magic, u32 mbi_addr);
const char *boot_image_name(void);
void fault_inject(const char *kind);
void smm_report(void);   /* smm.c: ring -2, when the lab says smm=1 */

static void info_platform(void)
{
    info_cpuid();

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
    smm_report();

    hv_main(&bootinfo);
    lab_finish(LAB_EXIT_OK);
}
