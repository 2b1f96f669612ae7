/* cpu.c - TSS, IDT, SYSCALL MSRs (the GDT itself is static, in boot.S). */
#include "lab.h"

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;   /* stacks for privilege-level changes (SDM Vol. 3A 8.7) */
    u64 reserved1;
    u64 ist[7];             /* IST1 = #DF, IST2 = NMI, IST3 = #MC */
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;         /* offset of tss_iomap (SDM Vol. 1 18.5.2) */
    u8 iomap[32 + 1];       /* ports 0-255, then the 0xff byte the CPU may read past the end */
#ifdef LAB_LIE_IOMAP
    u8 iomap_used[32 + 1];  /* lie-iomap: the bitmap the CPU uses (all denied); probe.c sets `iomap` */
#endif
} PACKED;

struct idt_gate {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, reserved;
} PACKED;

extern u64 gdt[];
extern const u64 isr_stub_table[32];
extern char isr_stub_128[];
extern char syscall_entry[];

struct tss64 tss ALIGNED(16);
/* The I/O permission bitmap: a set bit denies the port at CPL > IOPL; ports past it are
 * denied too (beyond the TSS limit). probe.c clears one bit for the I/O probes. */
_Static_assert(__builtin_offsetof(struct tss64, iomap) == 104, "tss_iomap below names tss + 104");
__asm__(".globl tss_iomap\n.set tss_iomap, tss + 104\n");   /* an ELF symbol GDB can read */
struct idt_gate idt[256] ALIGNED(16);

/* RSP0: where exceptions from CPL1/2/3 land (SDM Vol. 3A 6.14.4: the CPU
 * loads RSP from TSS.RSPn of the handler's CPL on a privilege change). */
static u8 rsp0_stack[16384] ALIGNED(16);
static u8 rsp1_stack[4096] ALIGNED(16);
static u8 rsp2_stack[4096] ALIGNED(16);
static u8 df_stack[8192] ALIGNED(16);
static u8 nmi_stack[4096] ALIGNED(16);
static u8 mc_stack[4096] ALIGNED(16);

static void set_gate(int v, u64 addr, int ist, int dpl)
{
    struct idt_gate *g = &idt[v];
    g->off0 = (u16)addr;
    g->sel = SEL_KCODE;
    g->ist = (u8)ist;
    g->type = (u8)(0x8e | (dpl << 5));  /* present, 64-bit interrupt gate: IF cleared */
    g->off1 = (u16)(addr >> 16);
    g->off2 = (u32)(addr >> 32);
    g->reserved = 0;
}

void idt_load(void)
{
    struct { u16 limit; u64 base; } PACKED p = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" :: "m"(p));
}

void cpu_init(void)
{
    /* TSS */
    tss.rsp0 = (u64)(rsp0_stack + sizeof(rsp0_stack));
    tss.rsp1 = (u64)(rsp1_stack + sizeof(rsp1_stack));
    tss.rsp2 = (u64)(rsp2_stack + sizeof(rsp2_stack));
    tss.ist[0] = (u64)(df_stack + sizeof(df_stack));
    tss.ist[1] = (u64)(nmi_stack + sizeof(nmi_stack));
    tss.ist[2] = (u64)(mc_stack + sizeof(mc_stack));
    tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
    for (unsigned i = 0; i < sizeof(tss.iomap); i++)
        tss.iomap[i] = 0xff;
#ifdef LAB_LIE_IOMAP
    tss.iomap_base = __builtin_offsetof(struct tss64, iomap_used);
    for (unsigned i = 0; i < sizeof(tss.iomap_used); i++)
        tss.iomap_used[i] = 0xff;
#endif
    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    int ti = SEL_TSS / 8;
    gdt[ti] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
              (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[ti + 1] = base >> 32;
    __asm__ volatile("ltr %w0" :: "r"(SEL_TSS));

    /* IDT: all 32 exception vectors -> isr_stub_N -> exc_dispatch. */
    for (int v = 0; v < 32; v++) {
        int ist = v == 8 ? 1 : v == 2 ? 2 : v == 18 ? 3 : 0;
        /* #BP DPL3: the record renderer leaves CPL3 with int3 (records.c). */
        set_gate(v, isr_stub_table[v], ist, v == 3 ? 3 : 0);
    }
    /* 0x80: only for the fault=kvm-internal test (int $0x80 at CPL0). */
    set_gate(0x80, (u64)isr_stub_128, 0, 3);
#ifdef LAB_LIE_INT
    extern char lie_fake_gp[];
    set_gate(0x4d, (u64)lie_fake_gp, 0, 3);   /* lie-int: a DPL3 gate for its software INT */
#endif
    idt_load();

    /* SYSCALL/SYSRET (APM Vol. 2 6.1.1). EFER.SCE was set in boot.S. */
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
    wrmsr(MSR_STAR, ((u64)SEL_UCODE32 << 48) | ((u64)SEL_KCODE << 32));
    wrmsr(MSR_LSTAR, (u64)syscall_entry);
    wrmsr(MSR_CSTAR, (u64)syscall_entry);
    /* Clear TF, IF, DF, IOPL, NT, AC on SYSCALL. */
    wrmsr(MSR_SFMASK, 0x47700);

    extern int rec_fast_ready;
    rec_fast_ready = 1;
}
