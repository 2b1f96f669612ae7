/* main32.c - the 32-bit host kernel's main line, for CPU models without long
 * mode (firmware/README.md "The 32-bit host"). The same records, the same probe
 * table (probe.c, generated from lab/catalogue.py with the 32-bit stubs), the
 * real-mode probe; no hypervisor. Shares records.c, serial.c, lib.c,
 * bootinfo.c, probe.c and realmode.S with the 64-bit kernel. */
#include "probe.h"

const char lab_variant[] = LAB_VARIANT_NAME;   /* firmware/Makefile VARIANT */

extern u32 boot_cr0, boot_cr4, mb_info;
extern const u32 isr_stub_table[32];
void bootinfo_init(u32 magic, u32 mbi_addr);
const char *boot_image_name(void);
NORETURN void ring_resume(void);

/* ---- TSS, IDT ---- */
struct tss32 {
    u16 link, r0;
    u32 esp0;           /* where a trap from CPL1-3 lands (SDM Vol. 3A 6.12.1, 8.2.1) */
    u16 ss0, r1;
    u32 esp1;
    u16 ss1, r2;
    u32 esp2;
    u16 ss2, r3;
    u32 cr3, eip, eflags, eax, ecx, edx, ebx, esp, ebp, esi, edi;
    u16 es, r4, cs, r5, ss, r6, ds, r7, fs, r8, gs, r9, ldt, r10;
    u16 trap, iomap_base;   /* offset of the I/O permission bitmap (SDM Vol. 1 18.5.2) */
    u8 iomap[32 + 1];       /* ports 0-255, then the 0xff byte the CPU may read past the end */
} PACKED;

struct idt_gate32 { u16 off0, sel; u8 zero, type; u16 off1; } PACKED;

struct tss32 tss ALIGNED(16);
_Static_assert(__builtin_offsetof(struct tss32, iomap) == 104, "tss_iomap below names tss + 104");
__asm__(".globl tss_iomap\n.set tss_iomap, tss + 104\n");   /* probe.c's I/O gate, by name */
static struct idt_gate32 idt[32] ALIGNED(16);
static u8 esp0_stack[16384] ALIGNED(16);
extern u64 gdt[];

static void cpu_init32(void)
{
    tss.esp0 = (u32)(esp0_stack + sizeof(esp0_stack));
    tss.ss0 = SEL_KDATA;
    tss.iomap_base = __builtin_offsetof(struct tss32, iomap);
    for (unsigned i = 0; i < sizeof(tss.iomap); i++)
        tss.iomap[i] = 0xff;        /* every port denied at CPL > IOPL */
    u32 base = (u32)&tss, limit = sizeof(tss) - 1;
    /* Available 32-bit TSS, type 9 (SDM Vol. 3A 8.2.2). */
    gdt[SEL_TSS / 8] = (limit & 0xffff) | ((u64)(base & 0xffffff) << 16) | (0x89ull << 40) |
                       ((u64)((limit >> 16) & 0xf) << 48) | ((u64)(base >> 24) << 56);
    __asm__ volatile("ltr %w0" :: "r"(SEL_TSS));
    /* 32-bit interrupt gates, DPL0 (SDM Vol. 3A 6.11): IF cleared on entry. */
    for (int v = 0; v < 32; v++) {
        u32 a = isr_stub_table[v];
        idt[v] = (struct idt_gate32){ (u16)a, SEL_KCODE, 0, 0x8e, (u16)(a >> 16) };
    }
    struct { u16 limit; u32 base; } PACKED p = { sizeof(idt) - 1, (u32)idt };
    __asm__ volatile("lidt %0" :: "m"(p));
}

/* ---- exceptions ---- */
struct frame32 {                 /* isr_common's pushal, then what the stub and the CPU pushed */
    u32 edi, esi, ebp, esp_pushal, ebx, edx, ecx, eax;
    u32 vector, error_code;
    u32 eip, cs, eflags, esp, ss;   /* ESP, SS only from CPL>0 */
};

struct extable_entry { u64 from, to; };   /* LAB_EXTABLE (lab.h) */
extern const struct extable_entry __extable_start[], __extable_end[];
struct try_state_s try_state;
volatile int exc_depth;          /* records.c: >0 while the dispatcher runs */

void try_reset(void)
{
    memset((void *)&try_state, 0, sizeof(try_state));
}

struct exc_result try_result(void)
{
    struct exc_result r = { try_state.faulted, try_state.vector, try_state.error_code, try_state.rip, try_state.cs };
    return r;
}

static NORETURN void unexpected(const struct frame32 *t)
{
    struct exc_result r = { 1, t->vector, t->error_code, t->eip, t->cs };
    probe_flush_records();   /* the rows before it first, in order */
    rec_begin("info");
    rec_exc("unexpected_exception", r);
    rec_u64("vector", t->vector);
    rec_hex("err", t->error_code);
    rec_hex("rip", t->eip);
    rec_hex("cs", t->cs);
    rec_hex("rflags", t->eflags);
    rec_str("probe_name", probe_running ? probe_running : "none");
    rec_end();
    lab_exit(LAB_EXIT_UNEXPECTED);
}

/* The same order as exc.c: the probe stub's trap, a guarded instruction, else unexpected. */
void exc_dispatch32(struct frame32 *t)
{
    struct exc_frame f;
    memset(&f, 0, sizeof(f));
    f.vector = t->vector;
    f.error_code = t->error_code;
    f.rip = t->eip;
    f.cs = t->cs;
    f.rflags = t->eflags;
    f.rsp = (t->cs & 3) ? t->esp : (u32)&t->esp;   /* no stack switch at CPL0 */
    f.ss = (t->cs & 3) ? t->ss : read_ss();
    f.rax = t->eax;
    f.rbx = t->ebx;
    f.rcx = t->ecx;
    f.rdx = t->edx;
    if (++exc_depth > 4) {
        serial_write("\r\n@@NESTED-EXCEPTIONS\r\n", 23);
        lab_exit(LAB_EXIT_PANIC);
    }
    switch (probe_trap(&f)) {
    case PROBE_TRAP_CHECKPOINT:
        t->eip = (u32)f.rip;
        exc_depth--;
        return;
    case PROBE_TRAP_END:
        exc_depth--;
        ring_resume();
    }
    for (const struct extable_entry *e = __extable_start; e < __extable_end; e++) {
        if (e->from == t->eip) {
            try_state.faulted = 1;
            try_state.vector = t->vector;
            try_state.error_code = t->error_code;
            try_state.rip = t->eip;
            try_state.cs = t->cs;
            t->eip = (u32)e->to;
            exc_depth--;
            return;
        }
    }
    unexpected(t);
}

/* ---- no hypervisor: the witness's end marker, and the reason ---- */
void hv_main(const struct bootinfo *bi)
{
    (void)bi;
    rec_begin("info");
    rec_str("hv", "none");
    rec_str("reason", "32-bit-host");
    rec_str("hv.mode", cmdline_get("host-mode") ? cmdline_get("host-mode") : "auto");
    rec_end();
}

static void info_platform(void)
{
    rec_info_str("host.bits", "32");
    info_cpuid();

    rec_begin("info");   /* no EFER: a CPU without long mode may have no MSRs at all */
    rec_hex("boot.cr0", boot_cr0);
    rec_hex("boot.cr4", boot_cr4);
    rec_hex("cr0", read_cr0());
    rec_hex("cr4", read_cr4());
    rec_end();

    rec_begin("info");
    rec_str("image", boot_image_name());
    rec_u64("mods", bootinfo.nmods);
    rec_hex("mbi", mb_info);
    rec_hex("kernel_end", (u32)__kernel_end);
    rec_end();
}

NORETURN void kmain32(u32 magic, u32 mbi)
{
    serial_init();
    cpu_init32();
    bootinfo_init(magic, mbi);

    rec_begin("hello");
    rec_str("proto", "1");
    rec_str("kernel", "lab-host");
    rec_str("variant", lab_variant);
    rec_str("cmdline", bootinfo.cmdline);
    rec_end();

    info_platform();
    probes_run_table();
    realmode_report();
    hv_main(&bootinfo);
    lab_finish(LAB_EXIT_OK);
}
