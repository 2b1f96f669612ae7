/* smm.c - ring -2: what the kernel can see of System Management Mode (docs/records.md
 * "ring-2"). Runs only when the lab says `smm=1` (machines with SMRAM: QEMU's pc and q35).
 *
 * 1. SMIs raised by the kernel through the APM control port (0xB2, APM_CNT; QEMU's hw/isa/apm.c
 *    forwards the write to the chipset, which raises SMI# once SeaBIOS enabled APMC SMIs):
 *    the time they steal against the same OUT to the APM status port (0xB3, no SMI), the SMI
 *    count MSR (0x34), the registers across them, SMRAM read from outside SMM, RSM outside SMM.
 * 2. Where the chipset leaves SMRAM unlocked (D_LCK clear), the lab's own handler
 *    (smm_entry.S) at SMBASE+0x8000: it counts its entries, reads the interrupted state from
 *    the save area and changes the kernel's RBX. SeaBIOS's handler is put back afterwards.
 * Observes only: the lab judges (lab/expectations.py). */
#include "lab.h"

#define APM_CNT 0xb2
#define APM_STS 0xb3
#define LAB_SMI_CMD 0x4c      /* a command byte neither SeaBIOS nor QEMU's chipsets act on */
#define MSR_SMI_COUNT 0x34    /* Intel SDM Vol. 4 2.x: SMI count since reset (read-only) */
#define MAX_SMIS 32           /* smm=<n>: the SMIs per measurement the lab asks for (lab/config.py) */

/* SMRAM control (i440FX 0x72 / Q35 MCH 0x9D; the 82441FX and 3 Series datasheets, as QEMU's
 * hw/pci-host/i440fx.c and q35.c model them). */
#define SMRAM_D_OPEN 0x40
#define SMRAM_D_CLS 0x20
#define SMRAM_D_LCK 0x10
#define SMRAM_G_SMRAME 0x08
#define Q35_ESMRAMC 0x9e
#define ESMRAMC_T_EN 0x01
#define SMRAM_BASE 0xa0000ull
#define SMRAM_END 0xc0000ull

void smm_raise(const u64 in[16], u64 out[17], u16 port, u8 value);   /* smm_entry.S */
extern char smm_raise_out[], smm_raise_landed[], smm_raise_end[];
extern char smm_blob[], smm_blob_end[], smm_blob_mbox[];

/* Written by the handler in SMM (offsets: smm_entry.S MB_*). */
struct smm_mbox {
    u32 entries, cs, cr0, alter, clobber, key, rev, smbase;
    u64 rip, rbx, cr3, rsp;
    u32 efer, pad;
};
static volatile struct smm_mbox mbox ALIGNED(64);

static const char *const reg_names[16] = { "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
                                           "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rflags" };

static u32 pci_addr(u32 dev, u32 reg) { return 0x80000000u | (dev << 11) | (reg & 0xfc); }
static u32 pci_read32(u32 dev, u32 reg) { outl(0xcf8, pci_addr(dev, reg)); return inl(0xcfc); }
static u8 pci_read8(u32 dev, u32 reg) { outl(0xcf8, pci_addr(dev, reg)); return inb((u16)(0xcfc + (reg & 3))); }
static void pci_write8(u32 dev, u32 reg, u8 v) { outl(0xcf8, pci_addr(dev, reg)); outb((u16)(0xcfc + (reg & 3)), v); }

static u64 rdmsr_try(u32 msr, int *faulted)
{
    u32 lo = 0, hi = 0;
    try_reset();
    __asm__ volatile("1: rdmsr\n2:\n" LAB_EXTABLE(1b, 2b) : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    *faulted = (int)try_state.faulted;
    return ((u64)hi << 32) | lo;
}

/* One OUT through smm_raise; returns the TSC cycles it took, the registers compared into
 * *changed (a bit per reg_names entry that differs from what went in). */
static u64 raise_one(u16 port, u8 value, u64 seed, u32 *changed)
{
    u64 in[16], out[17];
    for (int i = 0; i < 16; i++)
        in[i] = seed * 0x9e3779b97f4a7c15ull + (u64)i * 0x0101010101010101ull;
    u64 flags;
    __asm__ volatile("pushfq; pop %0" : "=r"(flags));
    u64 t0 = rdtsc();
    smm_raise(in, out, port, value);
    u64 t1 = rdtsc();
    in[0] = (in[0] & ~0xffull) | value;          /* what the OUT's operands hold */
    in[3] = (in[3] & ~0xffffull) | port;
    *changed = 0;
    for (int i = 0; i < 15; i++)
        if (out[i] != in[i])
            *changed |= 1u << i;
    /* RFLAGS: the arithmetic flags are the stub's own (a compare-free path, but be exact
     * about what the SMI could change: IF, DF, IOPL, AC, the control bits). */
    if ((out[16] & 0x247f00ull) != (flags & 0x247f00ull))
        *changed |= 1u << 15;
    return t1 - t0;
}

static void rec_changed(const char *key, u32 changed)
{
    static char buf[128];
    size_t n = 0;
    for (int i = 0; i < 16; i++) {
        if (!(changed & (1u << i)))
            continue;
        size_t m = strlen(reg_names[i]);
        if (n)
            buf[n++] = ',';
        memcpy(buf + n, reg_names[i], m);
        n += m;
    }
    buf[n] = 0;
    rec_str(key, n ? buf : "unchanged");
}

struct smi_run { u64 min_cycles, max_cycles, second_max; u32 changed; };

static void account(struct smi_run *r, u64 cycles, u32 changed)
{
    r->min_cycles = cycles < r->min_cycles ? cycles : r->min_cycles;
    if (cycles > r->max_cycles) {
        r->second_max = r->max_cycles;
        r->max_cycles = cycles;
    } else if (cycles > r->second_max) {
        r->second_max = cycles;
    }
    r->changed |= changed;
}

static int nsmi;

/* nsmi OUTs of LAB_SMI_CMD to `port`, each after the same OUT to the status port (no SMI)
 * when `base` is given, and after one untimed OUT there (TCG translates the stub then). */
static struct smi_run run_outs(u16 port, u64 seed, struct smi_run *base)
{
    struct smi_run r = { ~0ull, 0, 0, 0 }, b = { ~0ull, 0, 0, 0 };
    u32 changed;
    raise_one(APM_STS, LAB_SMI_CMD, seed, &changed);
    b.changed |= changed;
    for (int i = 1; i <= nsmi; i++) {
        /* Baseline first on odd rounds, second on even ones: neither side gets the order's bias
         * (measured under TCG: the second OUT of a pair ran ~100 cycles slower). */
        for (int k = 0; k < 2; k++) {
            if ((k == (i & 1)) && base) {
                u64 c = raise_one(APM_STS, LAB_SMI_CMD, seed + 2 * (u64)i, &changed);
                account(&b, c, changed);
            } else if (k != (i & 1)) {
                u64 c = raise_one(port, LAB_SMI_CMD, seed + 2 * (u64)i + 1, &changed);
                account(&r, c, changed);
            }
        }
    }
    if (base)
        *base = b;
    return r;
}

static void control_regs(u64 v[4])
{
    v[0] = read_cr0();
    __asm__ volatile("mov %%cr3, %0" : "=r"(v[1]));
    v[2] = read_cr4();
    v[3] = rdmsr(MSR_EFER);
}

/* 64-byte digest of a physical range, FNV-1a, as the kernel reads it now. */
static u64 digest(u64 base, u64 len)
{
    u64 h = 0xcbf29ce484222325ull;
    const volatile u8 *p = (const volatile u8 *)base;
    for (u64 i = 0; i < len; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void rec_smi_obs(const char *probe, const char *handler)
{
    rec_obs_begin("ring-2", probe);
    if (handler)
        rec_str("handler", handler);
}

/* MSR_SMI_COUNT (0x34) across the SMIs of one port: the difference, or the #GP(0) RDMSR took. */
static void rec_smi_count(const char *handler, const char *port, int faulted, u64 count)
{
    rec_smi_obs("smi-count", handler);
    rec_str("port", port);
    if (faulted)
        rec_str("obs", "#GP(0)");
    else
        rec_u64("obs", count);
    rec_end();
}

void smm_report(void)
{
    const char *on = cmdline_get("smm");
    if (!on)
        return;
    nsmi = 0;
    for (const char *c = on; *c >= '0' && *c <= '9' && nsmi <= MAX_SMIS; c++)
        nsmi = nsmi * 10 + (*c - '0');
    if (nsmi < 1 || nsmi > MAX_SMIS)
        return;
    const char *fault = cmdline_get("smm-fault");
    int no_smi = fault && !strcmp(fault, "no-smi");
    int no_restore = fault && !strcmp(fault, "no-restore");
    u16 smi_port = no_smi ? APM_STS : APM_CNT;   /* the negative control never raises one */

    /* The chipset (host bridge 00:00.0) and its SMRAM control register. */
    u32 id = pci_read32(0, 0);
    const char *chipset = id == 0x12378086u ? "i440fx" : id == 0x29c08086u ? "q35" : "unknown";
    u32 smram_reg = id == 0x12378086u ? 0x72 : id == 0x29c08086u ? 0x9d : 0;
    u8 smram = smram_reg ? pci_read8(0, smram_reg) : 0;
    u8 esmramc = id == 0x29c08086u ? pci_read8(0, Q35_ESMRAMC) : 0;
    rec_begin("info");
    rec_str("smm.chipset", chipset);
    rec_hex("smm.host_bridge", id);
    rec_hex("smm.smram", smram);
    if (id == 0x29c08086u)
        rec_hex("smm.esmramc", esmramc);
    rec_end();

    /* 1. SMIs through SeaBIOS's handler against the same OUT without one. */
    int msr_faulted;
    u64 count0 = rdmsr_try(MSR_SMI_COUNT, &msr_faulted);
    u64 cr_before[4], cr_after[4];
    control_regs(cr_before);
    struct smi_run base = run_outs(APM_STS, 1, NULL);   /* the status port alone: no SMI */
    u64 count1 = rdmsr_try(MSR_SMI_COUNT, &msr_faulted);
    struct smi_run smi = run_outs(smi_port, 100, &base);
    u64 count2 = rdmsr_try(MSR_SMI_COUNT, &msr_faulted);
    control_regs(cr_after);
    u32 cr_changed = 0;
    for (int i = 0; i < 4; i++)
        if (cr_before[i] != cr_after[i])
            cr_changed |= 1u << i;

    rec_begin("info");
    rec_u64("smm.smis", (u64)nsmi);
    rec_str("smm.msr_smi_count", msr_faulted ? "0" : "1");
    rec_u64("smm.base_min", base.min_cycles);
    rec_u64("smm.base_max", base.max_cycles);
    rec_u64("smm.smi_min", smi.min_cycles);
    rec_u64("smm.smi_max", smi.max_cycles);
    rec_end();

    /* Stolen: the fastest OUT to APM_CNT exceeds the baseline (the same OUT to the status port,
     * interleaved with them; its slowest dropped, one host preemption) by more than the
     * baseline's own spread: a difference the baseline's noise cannot make. */
    u64 spread = base.second_max - base.min_cycles;
    int stolen = smi.min_cycles > base.second_max && smi.min_cycles - base.second_max > spread;
    rec_smi_obs("smi-time", "firmware");
    rec_str("obs", stolen ? "stolen" : "none");
    rec_u64("cycles", smi.min_cycles > base.min_cycles ? smi.min_cycles - base.min_cycles : 0);
    rec_end();

    rec_obs_begin("ring-2", "smi-count-msr");
    rec_str("obs", msr_faulted ? "#GP(0)" : "ok");
    rec_end();
    rec_smi_count("firmware", "0xb2", msr_faulted, count2 - count1);
    rec_smi_count("firmware", "0xb3", msr_faulted, count1 - count0);   /* the status-port OUTs alone */

    rec_smi_obs("smi-state", "firmware");
    rec_changed("obs", smi.changed);
    rec_end();

    rec_smi_obs("smi-control-regs", "firmware");
    rec_str("obs", cr_changed ? "changed" : "unchanged");
    rec_end();

    /* RSM outside SMM: #UD (SDM Vol. 2B RSM). */
    struct exc_result rsm;
    TRY_INSN(rsm, "rsm");
    rec_obs_begin("ring-2", "rsm");
    rec_str("smm", "0");
    rec_exc("obs", rsm);
    rec_end();

    /* SMRAM from outside SMM: closed, then opened with D_OPEN where the lock allows it. */
    u64 closed = digest(SMRAM_BASE + 0x8000, 0x100);
    int locked = !smram_reg || (smram & SMRAM_D_LCK);
    u64 open = 0;
    if (!locked) {
        pci_write8(0, smram_reg, (u8)((smram & ~SMRAM_D_CLS) | SMRAM_D_OPEN));
        open = digest(SMRAM_BASE + 0x8000, 0x100);
        pci_write8(0, smram_reg, smram);
    }
    /* A write with SMRAM closed: does it reach SMRAM? */
    int write_reached = 0;
    if (!locked) {
        volatile u8 *cell = (volatile u8 *)(SMRAM_BASE + 0xfd00);   /* unused by the save area */
        pci_write8(0, smram_reg, (u8)((smram & ~SMRAM_D_CLS) | SMRAM_D_OPEN));
        u8 mine = *cell;
        pci_write8(0, smram_reg, smram);
        *cell = (u8)(mine ^ 0x5a);
        pci_write8(0, smram_reg, (u8)((smram & ~SMRAM_D_CLS) | SMRAM_D_OPEN));
        write_reached = *cell == (u8)(mine ^ 0x5a);
        *cell = mine;
        pci_write8(0, smram_reg, smram);
    }
    rec_obs_begin("ring-2", "smram-hidden");
    rec_str("obs", locked ? "locked" : closed != open ? "hidden" : "visible");
    rec_hex("closed", closed);
    rec_hex("open", open);
    rec_u64("closed_write", (u64)write_reached);
    rec_end();

    /* 2. The lab's own handler: D_OPEN, copy it over SeaBIOS's (kept), close, raise. */
    if (locked) {
        rec_info_str("smm.handler", "locked");
        return;
    }
    size_t n = (size_t)(smm_blob_end - smm_blob);
    static u8 kept[512];
    u8 *entry = (u8 *)(SMRAM_BASE + 0x8000);
    pci_write8(0, smram_reg, (u8)((smram & ~SMRAM_D_CLS) | SMRAM_D_OPEN));
    memcpy(kept, entry, n);
    memcpy(entry, smm_blob, n);
    *(volatile u32 *)(entry + (smm_blob_mbox - smm_blob)) = (u32)(u64)&mbox;
    pci_write8(0, smram_reg, smram);

    memset((void *)&mbox, 0, sizeof(mbox));
    mbox.clobber = (u32)no_restore;
    u64 msr0 = rdmsr_try(MSR_SMI_COUNT, &msr_faulted);
    struct smi_run quiet = run_outs(smi_port, 200, NULL);
    u64 msr1 = rdmsr_try(MSR_SMI_COUNT, &msr_faulted);
    u32 quiet_entries = mbox.entries;

    /* One SMI whose handler changes RBX: the kernel sees the change, not how it came. */
    mbox.alter = 1;
    mbox.key = 0x5a5aa5a5u;
    u32 altered;
    raise_one(smi_port, LAB_SMI_CMD, 300, &altered);
    u64 rbx_in = 300 * 0x9e3779b97f4a7c15ull + 0x0101010101010101ull;   /* raise_one's in[1] */
    u64 cr[4];
    control_regs(cr);
    u32 entries = mbox.entries;

    /* SeaBIOS's handler back, SMRAM as it was. */
    pci_write8(0, smram_reg, (u8)((smram & ~SMRAM_D_CLS) | SMRAM_D_OPEN));
    memcpy(entry, kept, n);
    pci_write8(0, smram_reg, smram);

    rec_begin("info");
    rec_str("smm.handler", "lab");
    rec_u64("smm.entries", entries);
    rec_hex("smm.smbase", mbox.smbase);
    rec_hex("smm.revision", mbox.rev);
    rec_end();

    rec_smi_obs("smi-entries", "lab");
    rec_u64("obs", quiet_entries);
    rec_u64("after_alter", entries);
    rec_end();

    rec_smi_count("lab", "0xb2", msr_faulted, msr1 - msr0);

    rec_smi_obs("smi-state", "lab");
    rec_changed("obs", quiet.changed);
    rec_end();

    /* What the handler saw in SMM: its CS, its CR0, and the save area's view of the kernel.
     * Without an entry the mailbox holds nothing it wrote: `none`, never a zero that could pass. */
    rec_smi_obs("smm-cs", "lab");
    if (entries)
        rec_hex("obs", mbox.cs);
    else
        rec_str("obs", "none");
    rec_end();
    rec_smi_obs("smm-cr0", "lab");
    if (entries)
        rec_hex("obs", mbox.cr0 & (u32)(CR0_PE | CR0_PG));   /* SDM Table 32-4: PE, PG cleared */
    else
        rec_str("obs", "none");
    rec_hex("cr0", mbox.cr0);
    rec_end();
    rec_smi_obs("smm-saved-rip", "lab");
    u64 rip = mbox.rip;
    if (!entries)
        rec_str("obs", "none");
    else if (rip == (u64)smm_raise_out + 1 || rip == (u64)smm_raise_landed)
        rec_str("obs", "boundary");   /* after the OUT, or where TCG took it (smm_entry.S) */
    else
        rec_hex("obs", rip);
    rec_hex("rip", rip);
    rec_end();
    rec_smi_obs("smm-saved-state", "lab");
    static char diff[64];
    size_t dn = 0;
    const char *names[3] = { "rbx", "cr3", "efer" };
    int bad[3] = { mbox.rbx != rbx_in, mbox.cr3 != cr[1], mbox.efer != (u32)cr[3] };
    for (int i = 0; i < 3; i++) {
        if (!bad[i])
            continue;
        if (dn)
            diff[dn++] = ',';
        memcpy(diff + dn, names[i], strlen(names[i]));
        dn += strlen(names[i]);
    }
    diff[dn] = 0;
    rec_str("obs", !entries ? "none" : dn ? diff : "kernel");
    rec_hex("rbx", mbox.rbx);
    rec_hex("cr3", mbox.cr3);
    rec_hex("efer", mbox.efer);
    rec_end();
    rec_smi_obs("smm-alters", "lab");
    rec_changed("obs", altered);
    rec_end();
}
