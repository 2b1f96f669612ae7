/* guest.c - the lab's guest kernel. It probes what a guest sees (its CPL,
 * CPUID as filtered by the host, RDTSC under its own CR4.TSD, the cost of a
 * CPUID exit) in its own context, with its own GDT/IDT/TSS, and hands each raw
 * value to the host through the OUT channel of lab_guest_abi.h. It observes,
 * never judges; the host formats the records (scope=guest-svm). */
#include "lab_guest_abi.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* Cost loop: double the CPUID count until the loop takes this many TSC
 * cycles (the shape of kvm-unit-tests' x86/vmexit.c), or until K CPUIDs are
 * enough for a steady mean. Under TCG one CPUID exit costs ~3*10^4 cycles: K
 * ends at 256-512 and the whole doubling at ~2^25 cycles (~15 ms). Where a TSC
 * cycle is cheap to reach (Bochs counts one per emulated instruction: an exit
 * costs tens of cycles), the cap ends it: 2^13 CPUIDs in all, not 2^18. */
#define COST_BUDGET_CYCLES (1ull << 23)
#define COST_MAX_ITER      (1ull << 12)

#define CR4_TSD (1ull << 2)
#define SEL_KCODE 0x08
#define SEL_TSS   0x30

struct gframe {                     /* entry.S trap_common */
    u64 r15, r14, r13, r12, r11, r10, r9, r8;
    u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss;
};
struct gjmp { u64 rbx, rbp, r12, r13, r14, r15, rsp, rip; };
struct tss64 {
    u32 rsvd0;
    u64 rsp[3];
    u64 rsvd1;
    u64 ist[7];
    u64 rsvd2;
    u16 rsvd3, iomap_base;
} __attribute__((packed));
struct idt_gate { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, rsvd; };

int guest_setjmp(struct gjmp *b) __attribute__((returns_twice));
void guest_longjmp(struct gjmp *b, int v) __attribute__((noreturn));
void guest_enter_user(u64 rip, u64 rsp) __attribute__((noreturn));
extern const u64 guest_vec_table[32];
extern u64 guest_gdt_tss[2];
extern char probe_insn_guest_enter[], probe_done_guest_enter[];
extern char probe_insn_guest_rdtsc[], probe_done_guest_rdtsc[];
extern char probe_insn_guest_sgdt[], probe_done_guest_sgdt[], probe_insn_guest_sidt[], probe_done_guest_sidt[];
extern char probe_insn_guest_sldt[], probe_done_guest_sldt[], probe_insn_guest_smsw[], probe_done_guest_smsw[];
extern char probe_insn_guest_str[], probe_done_guest_str[];
extern u64 guest_gdt[], guest_gdt_ldt[2], guest_gdt_gate[4];
extern char pg_int_target[], pg_call_target[], pg_jmp_target[], pg_text_start[], pg_text_end[];
void guest_set_rflags(u64 rflags);
#define SEL_KDATA 0x10
#define SEL_LDT   0x40
#define SEL_GATE  0x80
static u64 guest_ldt[1];

volatile u64 user_cs;               /* written at CPL3 by probe_insn_guest_enter */
static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[65] __attribute__((aligned(16)));   /* 0-31, and 0x40 (pg-int) */
static u8 rsp0_stack[8192] __attribute__((aligned(16)));
static u8 user_stack[4096] __attribute__((aligned(16)));

/* What the last exception was, when a probe expected one (catch armed). */
static struct gjmp catch_buf;
static volatile int catch_armed;
static volatile struct { u64 vector, error_code, rip, cs, has_err; } caught;
static unsigned nprobes;

/* ---- the reporting channel (lab_guest_abi.h): args in rdi rsi rdx rcx r8 r9 ---- */
static inline u64 hc(u32 fn, u64 a, u64 b, u64 c, u64 d, u64 e, u64 f)
{
    register u64 r8 __asm__("r8") = e;
    register u64 r9 __asm__("r9") = f;
    __asm__ volatile("outl %%eax, %[port]"
                     : "+a"(fn)
                     : [port] "i"(LABHC_PORT), "D"(a), "S"(b), "d"(c), "c"(d), "r"(r8), "r"(r9)
                     : "memory");
    return fn;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline u64 read_cs(void) { u64 v = 0; __asm__ volatile("mov %%cs, %w0" : "+r"(v)); return v; }
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); }
static inline u64 read_rflags(void) { u64 v; __asm__ volatile("pushfq; pop %0" : "=r"(v)); return v; }
static inline void load_fs(u16 sel) { __asm__ volatile("mov %0, %%fs" :: "r"((u32)sel)); }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }

static int has_error_code(u64 v)
{
    return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30;
}

/* Every exception lands here. An armed probe gets its exception recorded and
 * its CPL0 context back (the only way home from CPL3: an exception, docs/platform.md);
 * anything else is a guest bug: tell the host, which ends the guest. */
void guest_trap(struct gframe *f)
{
    if (catch_armed) {
        catch_armed = 0;
        caught.vector = f->vector;
        caught.error_code = f->error_code;
        caught.has_err = has_error_code(f->vector);
        caught.rip = f->rip;
        caught.cs = f->cs;
        guest_longjmp(&catch_buf, 1);
    }
    hc(LABHC_PANIC, f->vector, f->error_code, f->rip, f->cs, 0, 0);
    for (;;)
        __asm__ volatile("hlt");
}

/* Run a ring-3 stub; returns once it comes back by an exception. */
static void run_user(char *stub)
{
    if (guest_setjmp(&catch_buf) == 0) {
        catch_armed = 1;
        guest_enter_user((u64)stub, (u64)(user_stack + sizeof user_stack));
    }
}

static void setup_tables(void)
{
    u64 base = (u64)&tss;
    u64 lim = sizeof tss - 1;
    struct { u16 lim; u64 base; } __attribute__((packed)) idtr;

    tss.rsp[0] = (u64)(rsp0_stack + sizeof rsp0_stack);
    tss.iomap_base = sizeof tss;    /* no I/O bitmap: CPL3 I/O faults (IOPL=0) */
    /* 64-bit available TSS descriptor (type 9), APM Vol. 2 4.8.3 */
    guest_gdt_tss[0] = (lim & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
                       (((lim >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    guest_gdt_tss[1] = base >> 32;
    __asm__ volatile("ltr %w0" :: "r"((u16)SEL_TSS));

    for (int v = 0; v < 32; v++) {
        u64 h = guest_vec_table[v];
        idt[v] = (struct idt_gate){ (u16)h, SEL_KCODE, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0 };
    }
    u64 h = (u64)pg_int_target;         /* DPL0 interrupt gate for pg-int */
    idt[0x40] = (struct idt_gate){ (u16)h, SEL_KCODE, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0 };
    /* An LDT of our own (one null entry: SLDT needs only the selector) and a DPL0 64-bit call
     * gate to pg_call_target (APM Vol. 2 4.8.3, 4.11.2: system descriptors are 16 bytes). */
    base = (u64)guest_ldt;
    guest_gdt_ldt[0] = 7 | ((base & 0xffffff) << 16) | (0x82ull << 40) | (((base >> 24) & 0xff) << 56);
    guest_gdt_ldt[1] = base >> 32;
    __asm__ volatile("lldt %w0" :: "r"((u16)SEL_LDT));
    for (int i = 0; i < 2; i++) {       /* 0x80: pg-call's gate, 0x90: pg-jmp's */
        h = i ? (u64)pg_jmp_target : (u64)pg_call_target;
        guest_gdt_gate[2 * i] = (h & 0xffff) | ((u64)SEL_KCODE << 16) | (0x8cull << 40) | ((h >> 16 & 0xffff) << 48);
        guest_gdt_gate[2 * i + 1] = h >> 32;
    }
    idtr.lim = sizeof idt - 1;
    idtr.base = (u64)idt;
    __asm__ volatile("lidt %0" :: "m"(idtr));
}

void guest_cpuid(u32 leaf, u32 out[4]);   /* entry.S: CPUID at the witness's labels */

static void probe_cpuid(void)
{
    u32 r[4];

    guest_cpuid(0, r);
    hc(LABHC_CPUID_VENDOR, 0, r[0], r[1], r[2], r[3], 0);
    guest_cpuid(1, r);
    hc(LABHC_CPUID_HV_BIT, r[2], 0, 0, 0, 0, 0);
    guest_cpuid(0x40000000, r);
    hc(LABHC_CPUID_HV_SIG, 0, r[0], r[1], r[2], r[3], 0);
    nprobes += 3;
}

/* A CPL3 round trip: in by IRETQ, back by ud2 (#UD through our IDT). */
static void probe_ring3(void)
{
    user_cs = 0;
    run_user(probe_insn_guest_enter);
    u64 back_cs = read_cs();
    hc(LABHC_CPL_ENTER, 3, LABHC_VIA_IRETQ, user_cs, 0, 0, 0);
    /* #UD at the stub's ud2 is the planned way back; anything else is reported as is */
    u64 via = caught.vector == 6 && caught.rip == (u64)probe_done_guest_enter ? LABHC_VIA_UD2
                                                                        : LABHC_VIA_FAULT;
    hc(LABHC_CPL_RETURN, 3, via, back_cs, caught.cs, caught.vector, 0);
    nprobes += 2;
}

static void report_rdtsc(u64 tsd, u64 cpl, int completed)
{
    u64 outcome = LABHC_OUTCOME_OK;

    if (!completed)
        outcome = LABHC_OUTCOME_EXC | caught.vector | (caught.has_err ? LABHC_OUTCOME_ERR : 0);
    hc(LABHC_RDTSC, tsd, cpl, outcome, caught.error_code, caught.rip, caught.cs);
    nprobes++;
}

/* RDTSC at CPL3 under our own CR4.TSD (APM Vol. 3 RDTSC: #GP(0) iff CR4.TSD=1
 * and CPL>0), then at CPL0 with TSD=1. */
static void probe_rdtsc(void)
{
    u64 cr4 = read_cr4();

    for (int i = 0; i < 2; i++) {   /* tsd = 1, then 0 */
        u64 tsd = 1 - i;
        write_cr4(tsd ? cr4 | CR4_TSD : cr4 & ~CR4_TSD);
        run_user(probe_insn_guest_rdtsc);
        report_rdtsc(tsd, 3, caught.vector == 6 && caught.rip == (u64)probe_done_guest_rdtsc);
    }

    write_cr4(cr4 | CR4_TSD);
    volatile int completed = 0;
    if (guest_setjmp(&catch_buf) == 0) {
        catch_armed = 1;
        (void)rdtsc();
        catch_armed = 0;
        completed = 1;
    }
    report_rdtsc(1, 0, completed);
    write_cr4(cr4 & ~CR4_TSD);

    /* The value itself: LAB_TSC_MARK in bits 63:48 means the host answered. */
    hc(LABHC_RDTSC_SEEN, 0, rdtsc(), 0, 0, 0, 0);
    nprobes++;
}

/* SGDT/SIDT/SLDT/SMSW/STR at our CPL3 under our own CR4.UMIP (SDM Vol. 3A 2.5: #GP(0) at
 * CPL>0 when set), where CPUID says we have UMIP (leaf 7 ECX[2]); else nothing: the
 * bit would be reserved. */
#define CR4_UMIP (1ull << 11)
static void probe_umip(void)
{
    static char *const stubs[5][2] = {
        { probe_insn_guest_sgdt, probe_done_guest_sgdt }, { probe_insn_guest_sidt, probe_done_guest_sidt },
        { probe_insn_guest_sldt, probe_done_guest_sldt }, { probe_insn_guest_smsw, probe_done_guest_smsw },
        { probe_insn_guest_str, probe_done_guest_str },
    };
    u32 a, b, c, d;
    cpuid(0, &a, &b, &c, &d);
    if (a < 7)
        return;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!(c >> 2 & 1))
        return;
    u64 cr4 = read_cr4();
    for (int i = 0; i < 5; i++) {
        for (int umip = 1; umip >= 0; umip--) {
            write_cr4(umip ? cr4 | CR4_UMIP : cr4 & ~CR4_UMIP);
            run_user(stubs[i][0]);
            int completed = caught.vector == 6 && caught.rip == (u64)stubs[i][1];
            u64 outcome = completed ? LABHC_OUTCOME_OK
                                    : LABHC_OUTCOME_EXC | caught.vector | (caught.has_err ? LABHC_OUTCOME_ERR : 0);
            hc(LABHC_UMIP, (u64)i, (u64)umip, 3, outcome, caught.error_code, caught.rip);
            nprobes++;
        }
    }
    write_cr4(cr4);
}

/* ---- Popek & Goldberg (1974), Robin & Irvine (USENIX Security 2000): the sensitive but
 * unprivileged instructions of x86, run at our kernel CPL. Each compares what the instruction
 * showed with what our own tables say a CPL0 kernel sees (lab/catalogue.py `pg-*`, the SDM
 * reference per entry); the host counts its traps/exits in the probed text (entry.S). ---- */
enum { PG_SGDT, PG_SIDT, PG_SLDT, PG_SMSW, PG_STR, PG_PUSHF, PG_POPF, PG_LAR, PG_LSL, PG_VERR,
       PG_VERW, PG_POP, PG_PUSH, PG_CALL, PG_JMP, PG_INT, PG_RET, PG_MOV };
/* entry.S; only pg_popf reads its argument */
u64 pg_sgdt(u64), pg_sidt(u64), pg_sldt(u64), pg_smsw(u64), pg_str(u64), pg_pushf(u64), pg_popf(u64),
    pg_lar(u64), pg_lsl(u64), pg_verr(u64), pg_verw(u64), pg_pop(u64), pg_push(u64), pg_call(u64),
    pg_jmp(u64), pg_int(u64), pg_ret(u64), pg_mov(u64);
#define CR0_TS (1ull << 3)
#define RFL_IOPL3 (3ull << 12)
#define RFL_IF (1ull << 9)

static u64 pg_skip;                     /* LABHC_PG_BEGIN's answer: bit i = skip instruction i */
static u64 pg_out[LABHC_PG_N][LABHC_PG_WORDS];  /* one pass, for LABHC_PG_BATCH */
static unsigned pg_n;
extern const u64 pg_at[LABHC_PG_N];

static void pg_one(int i, u64 umip, u64 (*stub)(u64), u64 arg, u64 want, u64 mask)
{
    volatile u64 seen = 0;
    volatile int completed = 0;

    (void)umip;
    if (pg_skip >> i & 1)
        return;                         /* the host was told to skip it */
    if (guest_setjmp(&catch_buf) == 0) {
        catch_armed = 1;
        seen = stub(arg);
        catch_armed = 0;
        completed = 1;
    }
    u64 outcome = completed ? LABHC_OUTCOME_OK
                            : LABHC_OUTCOME_EXC | caught.vector | (caught.has_err ? LABHC_OUTCOME_ERR : 0);
    u64 *o = pg_out[pg_n++];
    o[0] = (u64)i, o[1] = seen & mask, o[2] = want & mask, o[3] = outcome, o[4] = caught.error_code;
    o[5] = pg_at[i];
    nprobes++;
}

static u64 lim_of(u64 d)                /* a descriptor's limit, scaled by G (SDM Vol. 3A 3.4.5) */
{
    u64 lim = (d & 0xffff) | ((d >> 48) & 0xf) << 16;
    return d >> 55 & 1 ? lim << 12 | 0xfff : lim;
}

static void probe_pg_once(u64 umip)
{
    pg_n = 0;
    const u64 all = ~0ull, z63 = 1ull << 63;
    pg_one(PG_SGDT, umip, pg_sgdt, 0, (u64)guest_gdt, all);
    pg_one(PG_SIDT, umip, pg_sidt, 0, (u64)idt, all);
    pg_one(PG_SLDT, umip, pg_sldt, 0, SEL_LDT, all);
    /* SMSW: the machine status word against our CR0 with CR0.TS set, as a lazy-FPU kernel
     * leaves it (no FPU/SSE code runs in between: -mgeneral-regs-only). */
    u64 cr0 = read_cr0();
    write_cr0(cr0 | CR0_TS);
    pg_one(PG_SMSW, umip, pg_smsw, 0, cr0 | CR0_TS, 0xffff);
    write_cr0(cr0);
    pg_one(PG_STR, umip, pg_str, 0, SEL_TSS, all);
    /* PUSHF: the IF and IOPL we set (IOPL 3 by IRETQ, IF 0); POPF: does loading IOPL 3 take? */
    u64 fl = read_rflags() & ~(RFL_IOPL3 | RFL_IF);
    guest_set_rflags(fl | RFL_IOPL3);
    pg_one(PG_PUSHF, umip, pg_pushf, 0, fl | RFL_IOPL3, RFL_IOPL3 | RFL_IF);
    guest_set_rflags(fl);
    pg_one(PG_POPF, umip, pg_popf, fl | RFL_IOPL3, fl | RFL_IOPL3, RFL_IOPL3 | RFL_IF);
    if (read_rflags() & RFL_IOPL3)      /* where POPF took (each IRETQ traps under the soft host) */
        guest_set_rflags(fl);
    pg_one(PG_LAR, umip, pg_lar, 0, z63 | (guest_gdt[SEL_KCODE >> 3] >> 32 & 0x00f0ff00), all);
    pg_one(PG_LSL, umip, pg_lsl, 0, z63 | lim_of(guest_gdt[SEL_KDATA >> 3]), all);
    pg_one(PG_VERR, umip, pg_verr, 0, 1, all);
    pg_one(PG_VERW, umip, pg_verw, 0, 1, all);
    pg_one(PG_POP, umip, pg_pop, 0, 1, all);
    load_fs(0);
    load_fs(SEL_KDATA);
    pg_one(PG_PUSH, umip, pg_push, 0, SEL_KDATA, all);
    load_fs(0);
    pg_one(PG_CALL, umip, pg_call, 0, SEL_KCODE, 0xffff);
    pg_one(PG_JMP, umip, pg_jmp, 0, 1, all);
    pg_one(PG_INT, umip, pg_int, 0, SEL_KCODE, 0xffff);
    pg_one(PG_RET, umip, pg_ret, 0, 1, all);
    pg_one(PG_MOV, umip, pg_mov, 0, SEL_KCODE, all);
    hc(LABHC_PG_BATCH, (u64)pg_out, pg_n, umip, 0, 0, 0);
}

/* With our CR4.UMIP clear, then set where CPUID offers it (leaf 7 ECX[2]). */
static void probe_pg(void)
{
    u32 a, b, c, d;
    u64 cr4 = read_cr4();

    pg_skip = hc(LABHC_PG_BEGIN, (u64)pg_text_start, (u64)pg_text_end, 0, 0, 0, 0);
    write_cr4(cr4 & ~CR4_UMIP);
    probe_pg_once(0);
    cpuid(0, &a, &b, &c, &d);
    if (a >= 7) {
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
        if (c >> 2 & 1) {
            write_cr4(cr4 | CR4_UMIP);
            probe_pg_once(1);
        }
    }
    write_cr4(cr4);
}

/* A VMMCALL ping (counted as an exit by an SVM host) and a HLT (intercepted:
 * the host resumes us). Neither is a probe record of its own. */
static void touch_intercepts(void)
{
    u64 rax = LABHC_VMMCALL_PING;

    if (guest_setjmp(&catch_buf) == 0) {
        catch_armed = 1;            /* #UD when no SVM host answers */
        __asm__ volatile("vmmcall" : "+a"(rax) :: "rbx", "rcx", "rdx", "memory");
        catch_armed = 0;
    }
    __asm__ volatile("hlt");
}

static void probe_cost(void)
{
    u64 n = 1, dt;
    u32 a, b, c, d;

    for (;;) {
        u64 t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            cpuid(0, &a, &b, &c, &d);
        dt = rdtsc() - t0;
        if (dt >= COST_BUDGET_CYCLES || n >= COST_MAX_ITER)
            break;
        n <<= 1;
    }
    hc(LABHC_COST, LABHC_OP_CPUID, n, dt, 0, 0, 0);
}

void guest_main(u64 entry_cs)
{
    setup_tables();
    hc(LABHC_HELLO, LABHC_ABI_VERSION, entry_cs, 0, 0, 0, 0);
    hc(LABHC_CPL_ENTER, 0, LABHC_VIA_VMRUN, entry_cs, 0, 0, 0);
    nprobes++;
    probe_cpuid();
    probe_ring3();
    probe_rdtsc();
    probe_umip();
    probe_pg();
    touch_intercepts();
    probe_cost();
    hc(LABHC_DONE, nprobes, 0, 0, 0, 0, 0);
    for (;;)
        __asm__ volatile("hlt");
}
