/* probe.c - runs the probe table generated from lab/catalogue.py: one stub
 * at one CPL under one gate, one obs record per row. The catalogue declares
 * the probes; this file is only the mechanics, and it never judges. */
#include "probe.h"
#include "probes.gen.h"

void probe_call(u64 cpl, void *rip, u64 rax, u64 rcx, u64 sysret, u64 rflags);   /* ring.S */
extern char syscall_entry[];

/* The GDB witness reads a gate that lives in an MSR (CPUID faulting's MSR 0x140), which QEMU's
 * gdbstub does not expose, by having the CPU run this RDMSR (ECX = the MSR) once at CPL0 while
 * it holds the CPU at a probe's trap (lab/gdb/collector.py, docs/gdb.md). Nothing here calls it. */
__asm__(".text\n.globl witness_rdmsr\nwitness_rdmsr:\n\trdmsr\n\tud2\n");

const char *probe_running;
static volatile int probe_active;
static const struct probe_stub *probe_cur;
static struct probe_result probe_res;

/* The negative controls that forge what only the CPU's execution shows (firmware/Makefile):
 * which rows they touch, and the record they print there (what the rule expects, so the
 * serial witness passes them). */
#if defined(LAB_LIE_INSN) || defined(LAB_LIE_INT) || defined(LAB_LIE_FRAME) || defined(LAB_LIE_PAST)
#define LIE_FORGES_RDTSC 1
#endif
void lie_forge_gp(void *rip);   /* lies.S */
static const struct probe_row *probe_row_cur;

static const char *forged_obs(const struct probe_row *r)
{
#ifdef LIE_FORGES_RDTSC
    if (!strcmp(r->probe, "rdtsc") && r->gates[0].kind == GATE_CR4)
        return r->gates[0].val && r->cpl ? "#GP(0)" : "ok";
#endif
#ifdef LAB_LIE_IOMAP
    if (!strcmp(r->probe, "io"))
        return r->cpl <= r->gates[0].val || r->gates[1].val ? "ok" : "#GP(0)";
#endif
    (void)r;
    return 0;
}

struct probe_result probe_run(const struct probe_stub *s, int cpl, int sysret, u64 rflags)
{
    memset(&probe_res, 0, sizeof(probe_res));
    probe_cur = s;
    probe_active = 1;
    u64 rax = s->rax_is_cr4 ? read_cr4() | s->rax : s->rax;   /* rax: bits to OR into CR4 */
    void *entry = s->pre;
    const struct probe_row *r = probe_row_cur;
    (void)r;
#ifdef LAB_LIE_PAST
    if (!strcmp(r->probe, "rdtsc") && r->gates[0].kind == GATE_CR4 && !r->gates[0].val)
        entry = s->done;   /* past the instruction: only its return trap runs */
#endif
#if defined(LAB_LIE_FRAME) && defined(__x86_64__)
    if (!strcmp(r->probe, "rdtsc") && r->gates[0].kind == GATE_CR4 && r->gates[0].val && cpl == 3) {
        lie_forge_gp(s->insn);   /* no CPL3 at all: a #GP frame made at CPL0 */
        probe_active = 0;
        return probe_res;
    }
#endif
    probe_call((u64)cpl, entry, rax, s->rcx, (u64)sysret, rflags);
    probe_active = 0;
    return probe_res;
}

int probe_trap(struct exc_frame *f)
{
    const struct probe_stub *s = probe_cur;
    if (!probe_active)
        return PROBE_TRAP_OTHER;
    if (f->vector == 6 && s->continue_at && f->rip == (u64)s->insn) {
        probe_res.checkpoint_cs = f->cs;   /* e.g. the CPL a SYSCALL is made from */
        f->rip += 2;                       /* past the checkpoint's ud2 */
        return PROBE_TRAP_CHECKPOINT;
    }
    /* The return trap after the stub, or the LSTAR entry's (SYSCALL stubs). */
    int done = f->vector == 6 && (f->rip == (u64)s->done || f->rip == (u64)syscall_entry);
    if (!done && !(f->rip >= (u64)s->insn && f->rip < (u64)s->done))
        return PROBE_TRAP_OTHER;           /* not the probed instruction: unexpected */
    probe_res.vector = f->vector;
    probe_res.error_code = f->error_code;
    probe_res.rip = f->rip;
    probe_res.cs = f->cs;
    probe_res.rsp = f->rsp;
    probe_res.rax = f->rax;
    probe_res.rbx = f->rbx;
    probe_res.rcx = f->rcx;
    probe_res.rdx = f->rdx;
    probe_res.back_cs = read_cs();
    probe_res.done = done;
    probe_active = 0;
    return PROBE_TRAP_END;
}

static struct exc_result as_exc(const struct probe_result *r)
{
    struct exc_result e = { 1, (u32)r->vector, r->error_code, r->rip, r->cs };
    return e;
}


/* What a gate saves to restore after the probe. */
struct gate_save { u64 value; };

static u64 gate_apply(const struct probe_gate *g, int val, struct gate_save *save)
{
    u64 bit = 1ull << g->bit;
    switch (g->kind) {
    case GATE_CR4:
        save->value = read_cr4();
        write_cr4(val ? save->value | bit : save->value & ~bit);
        break;
    case GATE_MSR:
        save->value = rdmsr(g->reg);
        wrmsr_safe(g->reg, val ? save->value | bit : save->value & ~bit);
        break;
    case GATE_IOPL:
        return (u64)(val & 3) << 12;   /* RFLAGS.IOPL of the IRETQ frame */
    case GATE_IOMAP:
        save->value = tss_iomap[g->reg / 8];
        if (val)
            tss_iomap[g->reg / 8] &= (u8)~(1u << (g->reg % 8));   /* clear: allowed */
        else
            tss_iomap[g->reg / 8] |= (u8)(1u << (g->reg % 8));
        break;
    }
    return 0;
}

static void gate_restore(const struct probe_gate *g, const struct gate_save *save)
{
    if (g->kind == GATE_CR4)
        write_cr4(save->value);
    else if (g->kind == GATE_MSR)
        wrmsr_safe(g->reg, save->value);
    else if (g->kind == GATE_IOMAP)
        tss_iomap[g->reg / 8] = (u8)save->value;
}

/* A `skip=` word names a probe, a family, or a param value (`iopl=3`). */
static int skipped(const struct probe_row *r)
{
    if (cmdline_list_has("skip", r->probe) || cmdline_list_has("skip", r->family))
        return 1;
    if (r->opt_in && !cmdline_list_has("run", r->family))
        return 1;   /* may write a bit this model reserves: only when the lab says it may */
    for (int g = 0; g < 2; g++) {  /* CR4.UMIP is reserved unless CPUID.(07H,0):ECX[2] (SDM Vol. 3A 2.5) */
        if (r->gates[g].kind == GATE_CR4 && r->gates[g].bit == 11 && !((cpu_leaf7_ecx >> 2) & 1))
            return 1;
        /* MSR 0x140[0] enables CPUID faulting only where MSR_PLATFORM_INFO[31] offers it (SDM Vol. 4 2.17) */
        if (r->gates[g].kind == GATE_MSR && r->gates[g].reg == 0x140 && !cpu_cpuid_faulting)
            return 1;
    }
    for (int k = 0; k < 4 && r->keys[k][0]; k++) {
        char word[40];
        size_t n = strlen(r->keys[k]), m = strlen(r->vals[k]);
        if (n + m + 2 > sizeof(word))
            continue;
        memcpy(word, r->keys[k], n);
        word[n] = '=';
        memcpy(word + n + 1, r->vals[k], m + 1);
        if (cmdline_list_has("skip", word))
            return 1;
    }
    return 0;
}

/* The observation, as docs/records.md spells it. */
static void record(const struct probe_row *r, const struct probe_result *res, char bytes[12])
{
    rec_obs_begin(r->scope, r->probe);
    for (int k = 0; k < 4 && r->keys[k][0]; k++)
        rec_str(r->keys[k], r->vals[k]);
    if (LAB_IS_LIE && r->lie[0]) {
        rec_str("obs", r->lie);                  /* the `lie` build: a negative control */
    } else if (forged_obs(r)) {
        rec_str("obs", forged_obs(r));           /* lie-insn ... lie-iomap: negative controls */
    } else if (r->kind == PK_OUTCOME) {
        if (res->done)
            rec_str("obs", "ok");
        else
            rec_exc("obs", as_exc(res));
    } else if (!res->done) {
        rec_exc("obs", as_exc(res));             /* the ring trip ended some other way */
    } else if (r->kind == PK_ENTER) {
        rec_u64("obs", res->cs & 3);             /* CPL of the stub, from the CS the CPU pushed */
    } else if (r->kind == PK_RETURN) {
        /* SYSCALL: the CPL the LSTAR entry ran at; ud2: the CPL of its handler. */
        rec_u64("obs", (res->rip == (u64)syscall_entry ? res->cs : res->back_cs) & 3);
    } else if (r->decode[0] == 'b' && r->decode[1] == 'y') {
        /* "bytes:XYZ": 4 bytes from each of the registers named by a/b/c/d. */
        for (int i = 0; i < 3; i++) {
            char reg = r->decode[6 + i];
            u32 v = (u32)(reg == 'a' ? res->rax : reg == 'b' ? res->rbx : reg == 'c' ? res->rcx : res->rdx);
            memcpy(bytes + 4 * i, &v, 4);
        }
        rec_bytes("obs", bytes, 12);
    } else {
        /* "bit:rNN": bit NN of register r. */
        char reg = r->decode[4];
        u64 v = reg == 'a' ? res->rax : reg == 'b' ? res->rbx : reg == 'c' ? res->rcx : res->rdx;
        int bit = (r->decode[5] - '0') * 10 + (r->decode[6] - '0');
        rec_u64("obs", (v >> bit) & 1);
    }
    if (r->kind == PK_ENTER || r->kind == PK_RETURN)
        rec_hex("cs", r->kind == PK_RETURN && res->rip != (u64)syscall_entry ? res->back_cs : res->cs);
    if (r->kind == PK_CPUID && r->decode[0] == 'b' && r->decode[1] == 'y')
        rec_hex("max", (u32)res->rax);
    if (r->kind == PK_RETURN && res->checkpoint_cs)
        rec_hex("from_cs", res->checkpoint_cs);
    rec_end();
}

/* The rows' records, rendered PROBE_BATCH rows at a time. Under TCG every stop of the GDB
 * witness makes QEMU translate again all the code that runs up to the next stop, and the
 * record renderer was most of it (a fifth of a TCG boot); in batches it is translated once per
 * batch. Order is kept: pending records go out before any other record (a `skipped` note, the
 * end of the table, an unexpected exception: exc.c). A boot that hangs inside the table has
 * up to PROBE_BATCH-1 rows run but not yet reported. */
#define PROBE_BATCH 8
static struct { int row; struct probe_result res; } pending[PROBE_BATCH];
static int npending, flushing;

void probe_flush_records(void)
{
    if (flushing)   /* an exception while rendering them: its own record goes out */
        return;
    flushing = 1;
    for (int k = 0; k < npending; k++) {
        char bytes[12];
        record(&probe_rows[pending[k].row], &pending[k].res, bytes);
    }
    npending = 0;
    flushing = 0;
}

/* Which rows the command line leaves out, decided once, at CPL3: under kvm_pvm every
 * instruction at CPL0-2 is emulated (firmware/README.md "Performance"), and matching each
 * row's words against the command line is most of the table's bookkeeping. */
static u8 row_skipped[PROBE_NROWS];

static void decide_skips(void *unused)
{
    (void)unused;
    for (int i = 0; i < PROBE_NROWS; i++)
        row_skipped[i] = (u8)skipped(&probe_rows[i]);
}

void probes_run_table(void)
{
    const char *last_skip = "";
#ifdef __x86_64__
    run_at_cpl(3, decide_skips, NULL);
#else
    decide_skips(NULL);   /* the 32-bit host has no ring-call helper (and kvm_pvm cannot IRET out of CPL0 there) */
#endif
    /* fault=table-exception (the lab's robustness tests): an unexpected #UD after the tenth
     * row, while records are pending. */
    const char *fault = cmdline_get("fault");
    int ran = 0, fault_after = fault && !strcmp(fault, "table-exception") ? 10 : -1;
    for (int i = 0; i < PROBE_NROWS; i++) {
        const struct probe_row *r = &probe_rows[i];
        if (row_skipped[i]) {
            if (strcmp(last_skip, r->probe)) {   /* once per run of rows of one probe */
                probe_flush_records();
                rec_info_str("skipped", r->probe);
                last_skip = r->probe;
            }
            continue;
        }
        last_skip = "";
        int cpl = r->cpl, gate = r->gates[0].val, run = 1;
#ifdef LAB_LIE_CONTEXT
        /* Negative control: runs the CPL3 RDTSC rows at CPL1 and the TSD=1 CPL0 row
         * with TSD clear, and records what the row says, not what ran... */
        if (!strcmp(r->probe, "rdtsc") && cpl == 3)
            cpl = 1;
        if (!strcmp(r->probe, "rdtsc") && cpl == 0 && gate)
            gate = 0;
        /* ... and the CPUID-faulting CPL0 row with faulting off (MSR 0x140[0] clear). */
        if (r->gates[0].kind == GATE_MSR && cpl == 0 && gate)
            gate = 0;
#endif
#ifdef LAB_LIE_SKIP
        /* Negative control: reports `ok` for the TSD=0 RDTSC rows without running them. */
        if (!strcmp(r->probe, "rdtsc") && r->gates[0].kind == GATE_CR4 && !gate)
            run = 0;
#endif
        struct probe_result res;
        memset(&res, 0, sizeof(res));
        res.done = 1;
        probe_running = r->probe;
        probe_row_cur = r;
        if (run) {
            struct gate_save save[2];
            u64 cr4 = read_cr4(), rflags = 0x2;   /* IF=0 */
            for (int g = 0; g < 2; g++)
                rflags |= gate_apply(&r->gates[g], g ? r->gates[g].val : gate, &save[g]);
            res = probe_run(&probe_stubs[r->stub], cpl, r->sysret, rflags);
            for (int g = 1; g >= 0; g--)
                gate_restore(&r->gates[g], &save[g]);
            if (read_cr4() != cr4)
                write_cr4(cr4);   /* a stub that wrote CR4 itself (cr4-reserved) */
        }
        probe_running = 0;
        pending[npending].row = i;
        pending[npending++].res = res;
        if (npending == PROBE_BATCH)
            probe_flush_records();
        if (++ran == fault_after) {
            probe_running = "fault-table-exception";
            __asm__ volatile("ud2");
        }
    }
    probe_flush_records();
}
