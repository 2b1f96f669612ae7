/* probe.h - the shape of the probe table generated from lab/catalogue.py
 * (build/probes.gen.h). The catalogue declares every probe; the firmware only
 * runs one stub at one CPL under one gate and prints what happened. */
#ifndef PROBE_H
#define PROBE_H
#include "lab.h"

enum probe_kind { PK_OUTCOME, PK_ENTER, PK_RETURN, PK_CPUID };

struct probe_stub {
    char *pre;         /* probe_pre_<name>: a 2-byte no-op, where the stub is entered (the
                        * GDB witness stops there, before the instruction) */
    char *insn;        /* probe_insn_<name>: the probed instruction(s) */
    char *done;        /* probe_done_<name>: the `ud2` right after them */
    u8 rax_is_cr4;     /* RAX on entry holds the current CR4 (MOV to CR4 probes) */
    u64 rax, rcx;      /* otherwise RAX and RCX on entry */
    u8 continue_at;    /* a #UD at `insn` is a checkpoint: resume at insn+2 */
};

/* A control the probe sets around its stub (lab/catalogue.py Gate). */
enum gate_kind { GATE_NONE, GATE_CR4, GATE_MSR, GATE_IOPL, GATE_IOMAP };
struct probe_gate {
    u8 kind;           /* enum gate_kind */
    u32 reg;           /* GATE_MSR: the MSR; GATE_IOMAP: the I/O port */
    u8 bit;            /* GATE_CR4, GATE_MSR: the bit */
    u8 val;            /* bit value; GATE_IOPL: the IOPL; GATE_IOMAP: 1 = the port is allowed */
};

struct probe_row {
    const char *scope, *probe, *family;
    u8 kind;           /* enum probe_kind */
    u8 stub;           /* index into probe_stubs */
    u8 cpl;            /* the CPL the stub runs at */
    u8 sysret;         /* enter the ring with SYSRETQ instead of IRETQ */
    const char *keys[4], *vals[4];   /* record params, in order */
    struct probe_gate gates[2];
    const char *decode;/* PK_CPUID: "bytes:bdc" (EBX,EDX,ECX) or "bit:c31" */
    const char *lie;   /* the `lie` build reports this instead ("" = the truth) */
    u8 opt_in;         /* runs only when the command line says `run=<family>` */
};

/* What the CPU did when the stub ran: the exception frame of the trap that
 * ended it (at probe_done: completed; at probe_insn: the instruction's fault),
 * with the registers as they were at that trap. */
struct probe_result {
    u64 vector, error_code, rip, cs, rsp;
    u64 rax, rbx, rcx, rdx;
    u64 back_cs;       /* CS read by the CPL0 code the trap reached */
    u64 done;          /* 1: the trap was a ud2 return trap after the stub */
    u64 checkpoint_cs; /* CS of the last checkpoint trap (continue_at stubs), 0 if none */
};

/* Run stub `s` at `cpl` (IRETQ, or SYSRETQ when `sysret`); returns when the
 * trap that ends it has been taken (probe.c, ring.S). */
struct probe_result probe_run(const struct probe_stub *s, int cpl, int sysret, u64 rflags);
/* The TSS I/O permission bitmap (cpu.c): ports 0-255, a set bit denies the port at
 * CPL > IOPL (SDM Vol. 1 18.5.2); every port starts denied. */
extern u8 tss_iomap[];
/* Called by exc_dispatch for every exception: is it the end of the running
 * stub (its result is kept), a checkpoint inside it (f->rip moves past it), or
 * none of the stub's business? */
enum { PROBE_TRAP_OTHER = 0, PROBE_TRAP_CHECKPOINT = 1, PROBE_TRAP_END = 2 };
int probe_trap(struct exc_frame *f);
void probes_run_table(void);
void probe_flush_records(void);   /* the table's pending records (before any other record) */
#endif
