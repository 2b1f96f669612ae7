/* soft_trap.c - the soft host's trap handler: decode the guest instruction
 * that trapped, emulate it against the virtual CPU state (soft.h), or reflect
 * the exception into the guest through its own IDT.
 *
 * Why it works at all: the guest kernel runs at CPL1, so the instructions
 * SDM Vol. 3A 5.9 calls privileged (LGDT, LIDT, LTR, MOV CRn, HLT, RDMSR,
 * WRMSR, ...) raise #GP(0); IN/OUT/CLI/STI do too, since IOPL=0 and the host
 * TSS has no I/O bitmap (SDM Vol. 1 18.5); RDTSC does when CR4.TSD=1 (SDM
 * Vol. 2B RDTSC); CPUID does when CPUID faulting is on (MSR 0x140 bit 0).
 * Why it is not a virtual machine in the Popek & Goldberg (1974) sense: x86
 * has sensitive instructions that are not privileged and never trap here:
 * `mov %cs` / `mov %ss` read the real CPL (1), SGDT/SIDT/SLDT/STR/SMSW return
 * the host's registers (unless the guest set CR4.UMIP, which we pass through:
 * then they #GP and we emulate them), PUSHF shows the real IF/IOPL, POPF and
 * IRETQ silently ignore IOPL/IF, LAR/LSL/VERR/VERW read the host's GDT at CPL1.
 * The guest can tell it is deprivileged: its pg-* probes (lab/catalogue.py
 * PG_INSNS) measure each. What faults on the host's tables at CPL1 we emulate
 * on the guest's: LLDT, POP FS/GS, far CALL/JMP through its call gates, INT n
 * through its IDT (frames show its own CS: soft_vcpu.vcs).
 * Memory is not isolated either: CPL1 is supervisor for paging (SDM Vol. 3A
 * 4.6) and long mode has no segment limits (AMD's EFER.LMSLE aside), so the
 * guest could write the host. This is a lab, not a security boundary. */
#include "soft.h"

struct soft_vcpu soft_vcpu;
volatile int soft_mode;

const char *const soft_reason_names[TR_N] = {
    "cpuid", "rdtsc", "out", "in", "hlt", "cli", "sti", "mov-cr", "rdmsr",
    "wrmsr", "lgdt", "lidt", "ltr", "lret", "iretq", "mov-sreg",
    "lldt", "sgdt", "sidt", "sldt", "smsw", "str", "pop-sreg", "int", "far-call", "far-jmp", "ud2",
    "vmmcall", "vmcall", "gp", "ud", "exception", "unknown",
};

#define TRAP_LIMIT (1u << 20)   /* a guest stuck on a trapping RIP ends, not hangs */
#define HLT_LIMIT  1000         /* no virtual interrupts: a HLT loop would never wake */
#define RFL_IF  (1ull << 9)
#define RFL_TF  (1ull << 8)
#define RFL_NT  (1ull << 14)
#define RFL_RF  (1ull << 16)
#define RFL_VM  (1ull << 17)
/* RFLAGS bits a guest IRETQ may set for real: CF PF AF ZF SF TF DF OF AC ID */
#define RFL_GUEST 0x240dd5ull
#define MSR_PAT 0x277

/* ---- guest memory: guest-physical == host-physical in its window ---- */
static int gmem_ok(u64 a, u64 n)
{
    return a >= LABG_WINDOW_BASE && n <= LABG_WINDOW_SIZE &&
           a - LABG_WINDOW_BASE <= LABG_WINDOW_SIZE - n;
}
/* Copies by quadwords where they can: on kvm_pvm every CPL0 instruction is
 * emulated (~2.5k TSC cycles, firmware/README.md), and lib.c's memcpy goes by
 * bytes. The trap path stays short for the same reason. */
static void qcopy(void *d, const void *s, u64 n)
{
    u64 i = 0;
    for (; i + 8 <= n; i += 8)      /* constant-size builtin: one mov, no aliasing UB */
        __builtin_memcpy((u8 *)d + i, (const u8 *)s + i, 8);
    for (; i < n; i++)
        ((u8 *)d)[i] = ((const u8 *)s)[i];
}
static int gread(u64 a, void *d, u64 n)
{
    if (!gmem_ok(a, n))
        return -1;
    qcopy(d, (const void *)a, n);
    return 0;
}
static int gwrite(u64 a, const void *s, u64 n)
{
    if (!gmem_ok(a, n))
        return -1;
    qcopy((void *)a, s, n);
    return 0;
}

static u64 *gpr(struct exc_frame *f, unsigned n)
{
    switch (n & 15) {
    case 0: return &f->rax;  case 1: return &f->rcx;  case 2: return &f->rdx;
    case 3: return &f->rbx;  case 4: return &f->rsp;  case 5: return &f->rbp;
    case 6: return &f->rsi;  case 7: return &f->rdi;  case 8: return &f->r8;
    case 9: return &f->r9;   case 10: return &f->r10; case 11: return &f->r11;
    case 12: return &f->r12; case 13: return &f->r13; case 14: return &f->r14;
    default: return &f->r15;
    }
}

/* ---- decoder: only what a kernel needs to trap on (SDM Vol. 2 ch. 2:
 * legacy prefixes, REX, opcode, ModRM/SIB/displacement, immediate) ---- */
struct insn {
    u8 b[16];
    int n;                  /* bytes fetched (<= 15) */
    int len;                /* decoded length */
    u8 rex, osz, asz, seg, two, op;
    u8 mod, reg, rm;        /* reg/rm extended by REX.R/REX.B */
    int mem;                /* ModRM names memory at ea */
    u64 ea, imm;
};

/* 15 bytes at RIP; past the window's end they are host memory (identity
 * mapped, harmless to read) and n stops the decoder there. The cost loop
 * (SOFT_COST) runs host code. */
static int fetch(u64 rip, struct insn *in)
{
    u64 n = 15;
    if (soft_mode == SOFT_GUEST) {
        if (!gmem_ok(rip, 1))
            return -1;
        if (rip + n > LABG_WINDOW_BASE + LABG_WINDOW_SIZE)
            n = LABG_WINDOW_BASE + LABG_WINDOW_SIZE - rip;
    }
    __builtin_memcpy(in->b, (const void *)rip, 16);    /* one more than an instruction */
    in->n = (int)n;
    return 0;
}

static s64 sdisp(const struct insn *in, int p, int size)
{
    if (size == 1)
        return (signed char)in->b[p];
    return (int)((u32)in->b[p] | (u32)in->b[p + 1] << 8 | (u32)in->b[p + 2] << 16 |
                 (u32)in->b[p + 3] << 24);
}

static int decode(struct exc_frame *f, struct insn *in)
{
    int p = 0, rip_rel = 0;

    in->len = in->n = 0;
    in->rex = in->osz = in->asz = in->seg = in->two = 0;
    in->mod = in->reg = in->rm = 0;
    in->mem = 0;
    in->ea = in->imm = 0;
    if (fetch(f->rip, in))
        return -1;
    for (;; p++) {
        if (p >= in->n)
            return -1;
        u8 c = in->b[p];
        if (c == 0x66) in->osz = 1;
        else if (c == 0x67) in->asz = 1;
        else if (c == 0x64 || c == 0x65) in->seg = c;
        else if (c == 0x2e || c == 0x36 || c == 0x3e || c == 0x26 || c == 0xf2 || c == 0xf3) ;
        else break;                     /* (LOCK 0xf0 falls out as an unknown opcode) */
    }
    if ((in->b[p] & 0xf0) == 0x40)
        in->rex = in->b[p++];
    if (p + 1 >= in->n)
        return -1;
    in->op = in->b[p++];
    if (in->op == 0x0f) {
        in->two = 1;
        in->op = in->b[p++];
    }
    int modrm = in->two ? in->op == 0x00 || in->op == 0x01 || in->op == 0x20 || in->op == 0x22
                        : in->op == 0x8e || in->op == 0xff;
    if (modrm) {
        if (p >= in->n)
            return -1;
        u8 m = in->b[p++];
        in->mod = m >> 6;
        in->reg = (u8)(((m >> 3) & 7) | ((in->rex & 4) << 1));
        in->rm = (u8)((m & 7) | ((in->rex & 1) << 3));
        /* MOV CRn ignores mod: always a register (SDM Vol. 2B MOV-Control Registers) */
        if (in->two && (in->op == 0x20 || in->op == 0x22))
            in->mod = 3;
        if (in->mod != 3) {
            if (in->asz || in->seg)     /* 32-bit addressing, FS/GS bases: not needed */
                return -1;
            in->mem = 1;
            int disp = in->mod == 1 ? 1 : in->mod == 2 ? 4 : 0;
            if ((m & 7) == 4) {         /* SIB */
                if (p >= in->n)
                    return -1;
                u8 s = in->b[p++];
                unsigned idx = ((s >> 3) & 7) | ((in->rex & 2) << 2);
                if (idx != 4)
                    in->ea += *gpr(f, idx) << (s >> 6);
                if ((s & 7) == 5 && in->mod == 0)
                    disp = 4;
                else
                    in->ea += *gpr(f, (s & 7) | ((in->rex & 1) << 3));
            } else if ((m & 7) == 5 && in->mod == 0) {
                rip_rel = 1;            /* RIP-relative: disp32 from the next instruction */
                disp = 4;
            } else {
                in->ea += *gpr(f, in->rm);
            }
            if (p + disp > in->n)
                return -1;
            if (disp)
                in->ea += (u64)sdisp(in, p, disp);
            p += disp;
        }
    }
    if (!in->two && ((in->op >= 0xe4 && in->op <= 0xe7) || in->op == 0xcd))
        in->imm = in->b[p++];
    else if (!in->two && in->op == 0xca) {
        in->imm = in->b[p] | (u64)in->b[p + 1] << 8;
        p += 2;
    }
    if (p > in->n)
        return -1;
    in->len = p;
    if (rip_rel)
        in->ea += f->rip + (u64)p;
    return 0;
}

static int identify(const struct insn *in)
{
    if (in->two) {
        switch (in->op) {
        case 0xa2: return TR_CPUID;
        case 0x31: return TR_RDTSC;
        case 0x20: case 0x22: return TR_MOV_CR;
        case 0x32: return TR_RDMSR;
        case 0x30: return TR_WRMSR;
        case 0x0b: return TR_UD2;
        case 0x00: {                    /* group 6: SLDT STR LLDT LTR */
            static const int g6[8] = { TR_SLDT, TR_STR, TR_LLDT, TR_LTR,
                                       TR_UNKNOWN, TR_UNKNOWN, TR_UNKNOWN, TR_UNKNOWN };
            return g6[in->reg & 7];
        }
        case 0x01:
            if (in->mod == 3) {
                if ((in->reg & 7) == 3 && (in->rm & 7) == 1)
                    return TR_VMMCALL;      /* 0f 01 d9 */
                if ((in->reg & 7) == 0 && (in->rm & 7) == 1)
                    return TR_VMCALL;       /* 0f 01 c1 */
                return (in->reg & 7) == 4 ? TR_SMSW : TR_UNKNOWN;
            }
            switch (in->reg & 7) {      /* group 7, memory forms */
            case 0: return TR_SGDT;
            case 1: return TR_SIDT;
            case 2: return TR_LGDT;
            case 3: return TR_LIDT;
            case 4: return TR_SMSW;
            }
            return TR_UNKNOWN;
        case 0xa1: case 0xa9: return TR_POP_SREG;   /* POP FS / POP GS */
        }
        return TR_UNKNOWN;
    }
    switch (in->op) {
    case 0xf4: return TR_HLT;
    case 0xfa: return TR_CLI;
    case 0xfb: return TR_STI;
    case 0xe4: case 0xe5: case 0xec: case 0xed: return TR_IN;
    case 0xe6: case 0xe7: case 0xee: case 0xef: return TR_OUT;
    case 0x8e: return TR_MOV_SREG;
    case 0xcd: return TR_INT;
    case 0xff:                          /* far CALL / JMP m16:xx (memory forms only) */
        if (in->mem && (in->reg & 7) == 3)
            return TR_FAR_CALL;
        if (in->mem && (in->reg & 7) == 5)
            return TR_FAR_JMP;
        return TR_UNKNOWN;
    case 0xca: case 0xcb: return in->rex & 8 ? TR_LRET : TR_UNKNOWN;   /* 64-bit forms only */
    case 0xcf: return in->rex & 8 ? TR_IRETQ : TR_UNKNOWN;
    }
    return TR_UNKNOWN;                  /* INS/OUTS too: not emulated */
}

/* ---- guest descriptors -> host selectors (ring compression: the guest's
 * DPL0 segments become our ring-1 ones, DPL3 stay ring 3) ---- */
enum { SEG_DATA, SEG_SS, SEG_CS };
static int translate(struct soft_vcpu *v, u16 sel, int kind, u16 *out)
{
    u64 d;

    if (sel == SOFT_KCS || sel == SOFT_KSS) {   /* ours, handed out in frames: the guest's
                                                   own selectors never carry RPL 1 */
        if ((kind == SEG_CS) != (sel == SOFT_KCS))
            return -1;
        *out = sel;
        return 0;
    }
    if ((sel & ~3) == 0) {
        if (kind != SEG_DATA)
            return -1;
        *out = 0;
        return 0;
    }
    if ((sel & 4) || (u64)(sel | 7) > v->gdt_lim || gread(v->gdt_base + (sel & ~7), &d, 8))
        return -1;                      /* LDT: the guest has none */
    int present = (d >> 47) & 1, sys = !((d >> 44) & 1), code = (d >> 43) & 1;
    int dpl = (d >> 45) & 3, lbit = (d >> 53) & 1;
    if (!present || sys || (dpl != 0 && dpl != 3))
        return -1;
    if (kind == SEG_CS) {
        if (!code || !lbit)
            return -1;
        *out = dpl ? SOFT_UCS : SOFT_KCS;
        if (!dpl)
            v->vcs = sel & ~3;          /* what the guest believes its CS is */
    } else {
        if (code)
            return -1;
        *out = dpl ? SOFT_USS : SOFT_KSS;
    }
    return 0;
}

/* ---- leaving the guest for soft_main ---- */
static int exit_to_host(struct soft_vcpu *v, struct exc_frame *f, int why)
{
    u16 ds, es;
    __asm__ volatile("mov %%ds, %0; mov %%es, %1" : "=r"(ds), "=r"(es));
    qcopy(&v->f, f, sizeof *f);
    v->ds = ds;
    v->es = es;
    v->exit = why;
    soft_mode = SOFT_IDLE;
    /* isr_common's IRETQ now returns to soft_exit_tramp at CPL0 (soft_run.S) */
    f->rip = (u64)soft_exit_tramp;
    f->cs = SEL_KCODE;
    f->rflags = 0x2;
    f->rsp = soft_host_rsp;
    f->ss = SEL_KDATA;
    return 1;
}

static int end_guest(struct soft_vcpu *v, struct exc_frame *f, const char *why)
{
    v->end = why;
    v->end_vector = f->vector;
    v->end_err = f->error_code;
    v->end_rip = f->rip;
    v->end_cs = f->cs;
    return exit_to_host(v, f, SOFT_EXIT_END);
}

/* Never hang: an instruction we cannot emulate ends the guest, with its bytes. */
static int unemulated(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in)
{
    int n = in->len ? in->len : in->n < 8 ? in->n : 8;
    qcopy(v->unemulated, in->b, (u64)n);
    v->unemulated_len = n ? n : -1;     /* -1: RIP outside the guest's window */
    v->count[TR_UNKNOWN]++;
    return end_guest(v, f, "unemulated");
}

/* ---- exception delivery into the guest (SDM Vol. 3A 6.12.1 exception
 * handling, 6.14 64-bit mode: gate from the guest's IDT, stack from its TSS
 * RSP0 (or IST) when it came from its user mode, else the current stack
 * aligned to 16; frame SS, RSP, RFLAGS, CS, RIP [, error code]) ---- */
static int deliver(struct soft_vcpu *v, struct exc_frame *f, u32 vec, int has_err, u64 err)
{
    u64 g[2], frame[6], rsp;
    u16 hcs;
    int k = 0, user = (f->cs & 3) == 3;

    if ((u64)vec * 16 + 15 > v->idt_lim || gread(v->idt_base + vec * 16, g, 16))
        return end_guest(v, f, "shutdown");     /* no gate: #DF, #DF, shutdown */
    u32 type = (u32)(g[0] >> 40) & 0xff;
    if (!(type & 0x80) || ((type & 0xf) != 0xe && (type & 0xf) != 0xf) ||
        translate(v, (u16)(g[0] >> 16), SEG_CS, &hcs) || hcs != SOFT_KCS)
        return end_guest(v, f, "shutdown");
    u64 off = (g[0] & 0xffff) | ((g[0] >> 32) & 0xffff0000ull) | (g[1] << 32);
    unsigned ist = (unsigned)(g[0] >> 32) & 7;
    if (ist || user) {
        if (!v->tss_base || gread(v->tss_base + (ist ? 36 + 8 * (ist - 1) : 4), &rsp, 8))
            return end_guest(v, f, "shutdown");
    } else {
        rsp = f->rsp;
    }
    rsp &= ~15ull;
    if (has_err)
        frame[k++] = err;
    frame[k++] = f->rip;
    frame[k++] = f->cs == SOFT_KCS ? v->vcs : f->cs;   /* a CPL0 kernel's frame shows its own CS */
    frame[k++] = (f->rflags & ~RFL_IF) | (v->vif ? RFL_IF : 0);
    frame[k++] = f->rsp;
    frame[k++] = f->ss;
    rsp -= (u64)k * 8;
    if (gwrite(rsp, frame, (u64)k * 8))
        return end_guest(v, f, "shutdown");
    f->rip = off;
    f->cs = SOFT_KCS;
    if (user)
        f->ss = SOFT_KSS;
    f->rsp = rsp;
    f->rflags = (f->rflags & ~(RFL_TF | RFL_NT | RFL_RF | RFL_VM)) | 0x2;
    if ((type & 0xf) == 0xe)            /* interrupt gate: IF cleared */
        v->vif = 0;
    return 1;
}

static int reflect(struct soft_vcpu *v, struct exc_frame *f, int reason, u32 vec, u64 err)
{
    v->reflected[reason]++;
    return deliver(v, f, vec, exc_has_error_code(vec), err);
}

static int done(struct exc_frame *f, const struct insn *in)
{
    f->rip += (u64)in->len;
    return 1;
}

static u64 tsc_value(struct soft_vcpu *v)
{
    return rdtsc() + (v->rdtsc_intercept ? LAB_TSC_MARK : 0);
}

/* The real CR4 while the guest runs: the host's, with TSD set whenever RDTSC must trap
 * (the guest's virtual TSD, or the RDTSC intercept), and the guest's own UMIP passed
 * through: UMIP binds only CPL>0 (SDM Vol. 3A 2.5), where the guest's user code runs, and
 * the guest sets it only where its CPUID (the real one) offers it. */
void soft_set_real_cr4(struct soft_vcpu *v)
{
    int tsd = v->rdtsc_intercept || (v->cr4 & CR4_TSD);
    u64 cr4 = (tsd ? v->host_cr4 | CR4_TSD : v->host_cr4) & ~CR4_UMIP;
    write_cr4(cr4 | (v->cr4 & CR4_UMIP));
}

static int emu_mov_cr(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in)
{
    u64 *r = gpr(f, in->rm);
    u64 *cr;

    switch (in->reg) {
    case 0: cr = &v->cr0; break;
    case 2: cr = &v->cr2; break;
    case 3: cr = &v->cr3; break;
    case 4: cr = &v->cr4; break;
    case 8: cr = &v->cr8; break;
    default: return reflect(v, f, TR_MOV_CR, 6, 0);     /* #UD, SDM Vol. 2B */
    }
    if (in->op == 0x20) {
        *r = *cr;
    } else {
        /* Stored only: the guest keeps running on the host's identity map
         * (soft.c checked its tables map its window 1:1) and in long mode. */
        *cr = *r;
        if (in->reg == 4)
            soft_set_real_cr4(v);       /* virtual TSD decides the real one */
    }
    return done(f, in);
}

static int emu_msr(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in, int wr)
{
    u32 msr = (u32)f->rcx;
    u64 val = (f->rdx << 32) | (u32)f->rax;
    int reason = wr ? TR_WRMSR : TR_RDMSR;

    switch (msr) {
    case MSR_EFER:
        if (wr)
            v->efer = val | EFER_LMA;
        val = v->efer;
        break;
    case MSR_PAT:
        if (wr)
            v->pat = val;
        val = v->pat;
        break;
    case 0x10:                          /* TSC */
        if (wr)
            return reflect(v, f, reason, 13, 0);
        val = tsc_value(v);
        break;
    case 0xce: case 0x140:              /* no CPUID faulting for the guest itself */
        if (wr)
            return reflect(v, f, reason, 13, 0);
        val = 0;
        break;
    default:
        return reflect(v, f, reason, 13, 0);    /* an MSR this CPU "lacks" */
    }
    if (!wr) {
        f->rax = (u32)val;
        f->rdx = val >> 32;
    }
    return done(f, in);
}

static int emu_ltr(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in)
{
    u16 sel;
    u64 d[2];

    if (in->mem ? gread(in->ea, &sel, 2) : (sel = (u16)*gpr(f, in->rm), 0))
        return reflect(v, f, TR_LTR, 13, 0);
    u64 off = sel & ~7u;
    if ((sel & 4) || off + 15 > v->gdt_lim || gread(v->gdt_base + off, d, 16) ||
        ((d[0] >> 40) & 0x9f) != 0x89)  /* present, available 64-bit TSS */
        return reflect(v, f, TR_LTR, 13, sel & 0xfffc);
    d[0] |= 2ull << 40;                 /* LTR marks it busy (SDM Vol. 2A LTR) */
    gwrite(v->gdt_base + off, d, 8);
    v->tr = sel;
    v->tss_base = ((d[0] >> 16) & 0xffffff) | ((d[0] >> 56) << 24) | ((d[1] & 0xffffffff) << 32);
    return done(f, in);
}

static int emu_mov_sreg(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in)
{
    u16 sel, h;
    unsigned sr = in->reg & 7;          /* 0 ES 1 CS 2 SS 3 DS 4 FS 5 GS */

    if (sr == 1 || sr > 5)
        return reflect(v, f, TR_MOV_SREG, 6, 0);
    if (in->mem ? gread(in->ea, &sel, 2) : (sel = (u16)*gpr(f, in->rm), 0))
        return reflect(v, f, TR_MOV_SREG, 13, 0);
    if (translate(v, sel, sr == 2 ? SEG_SS : SEG_DATA, &h))
        return reflect(v, f, TR_MOV_SREG, 13, sel & 0xfffc);
    /* DS/ES/FS/GS are loaded here and survive isr_common's IRETQ (DPL >= CPL,
     * SDM Vol. 3A 6.14.3 / IRET); SS comes from the frame. */
    switch (sr) {
    case 0: __asm__ volatile("mov %0, %%es" :: "r"((u32)h)); break;
    case 2: f->ss = h; break;
    case 3: __asm__ volatile("mov %0, %%ds" :: "r"((u32)h)); break;
    case 4: __asm__ volatile("mov %0, %%fs" :: "r"((u32)h)); break;
    case 5: __asm__ volatile("mov %0, %%gs" :: "r"((u32)h)); break;
    }
    return done(f, in);
}

/* A register or memory destination of a 16-bit value (SLDT, STR, SMSW: SDM Vol. 2B): memory
 * takes 16 bits; a register with 66h its low 16; a 32/64-bit register the value zero-extended
 * (SMSW: CR0's, whose bits above 15 the SDM leaves undefined for r32; we give CR0's own). */
static int store_w(struct exc_frame *f, const struct insn *in, u64 val)
{
    if (in->mem) {
        u16 w = (u16)val;
        return gwrite(in->ea, &w, 2);
    }
    u64 *r = gpr(f, in->rm);
    *r = in->osz ? (*r & ~0xffffull) | (val & 0xffff) : in->rex & 8 ? val : (u32)val;
    return 0;
}

/* SGDT/SIDT/SLDT/SMSW/STR from the guest kernel: with CR4.UMIP set they #GP at CPL1 (SDM
 * Vol. 3A 2.5); a CPL0 kernel would get its own registers, so give it the virtual ones. */
static int emu_store_sys(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in, int r)
{
    if (v->no_emulate_umip && r == TR_SGDT)     /* negative control: the guest sees the #GP */
        return reflect(v, f, r, 13, 0);
    if (r == TR_SGDT || r == TR_SIDT) {         /* 64-bit mode: 2-byte limit, 8-byte base */
        u8 m[10];
        u16 lim = r == TR_SGDT ? v->gdt_lim : v->idt_lim;
        u64 base = r == TR_SGDT ? v->gdt_base : v->idt_base;
        __builtin_memcpy(m, &lim, 2);
        __builtin_memcpy(m + 2, &base, 8);
        if (!in->mem || gwrite(in->ea, m, 10))
            return reflect(v, f, r, !in->mem ? 6 : 13, 0);
        return done(f, in);
    }
    u64 val = r == TR_SLDT ? v->ldtr : r == TR_STR ? v->tr : v->cr0;
    if (store_w(f, in, val))
        return reflect(v, f, r, 13, 0);
    return done(f, in);
}

/* LLDT (SDM Vol. 2A): a null selector or an LDT descriptor (type 2, 16 bytes) of the guest's
 * GDT; only remembered: the guest runs on the host's descriptor tables (no LDT use). */
static int emu_lldt(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in)
{
    u16 sel;
    u64 d[2];

    if (in->mem ? gread(in->ea, &sel, 2) : (sel = (u16)*gpr(f, in->rm), 0))
        return reflect(v, f, TR_LLDT, 13, 0);
    u64 off = sel & ~7u;
    if (off && ((sel & 4) || off + 15 > v->gdt_lim || gread(v->gdt_base + off, d, 16) ||
                ((d[0] >> 40) & 0x9f) != 0x82))
        return reflect(v, f, TR_LLDT, 13, sel & 0xfffc);
    v->ldtr = off ? sel : 0;
    return done(f, in);
}

/* POP FS/GS of a guest selector: at CPL1 its DPL0 data segment is #GP(sel) (SDM Vol. 2B POP);
 * load our ring-1 translation, as MOV to FS/GS does. */
static int emu_pop_sreg(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in)
{
    u64 q;
    u16 h;

    if (gread(f->rsp, &q, 8))
        return reflect(v, f, TR_POP_SREG, 13, 0);
    if (translate(v, (u16)q, SEG_DATA, &h))
        return reflect(v, f, TR_POP_SREG, 13, q & 0xfffc);
    if (in->op == 0xa1)
        __asm__ volatile("mov %0, %%fs" :: "r"((u32)h));
    else
        __asm__ volatile("mov %0, %%gs" :: "r"((u32)h));
    f->rsp += 8;
    return done(f, in);
}

/* Far CALL/JMP m16:32 (m16:64 with REX.W) through a 64-bit call gate of the guest's GDT to its
 * own kernel code (APM Vol. 2 4.11.2, SDM Vol. 2A CALL "call gate, same privilege"): the
 * selector names the host's GDT at CPL1, so it faults; the gate is the guest's. CALL pushes
 * the guest's view of CS and the return RIP, as quadwords. */
static int emu_far_gate(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in, int call)
{
    int r = call ? TR_FAR_CALL : TR_FAR_JMP;
    u16 sel, tcs;
    u64 g[2];

    if (gread(in->ea + (in->rex & 8 ? 8 : in->osz ? 2 : 4), &sel, 2))
        return reflect(v, f, r, 13, 0);
    u64 off = sel & ~7u;
    if ((sel & 4) || off + 15 > v->gdt_lim || gread(v->gdt_base + off, g, 16) ||
        ((g[0] >> 40) & 0x9f) != 0x8c)  /* present 64-bit call gate (DPL >= CPL 0, RPL) */
        return reflect(v, f, r, 13, sel & 0xfffc);
    if (translate(v, (u16)(g[0] >> 16), SEG_CS, &tcs) || tcs != SOFT_KCS)
        return reflect(v, f, r, 13, (g[0] >> 16) & 0xfffc);
    u64 target = (g[0] & 0xffff) | ((g[0] >> 32) & 0xffff0000ull) | (g[1] << 32);
    if (call) {
        u64 fr[2] = { f->rip + (u64)in->len, v->vcs };
        if (gwrite(f->rsp - 16, fr, 16))
            return reflect(v, f, r, 13, 0);
        f->rsp -= 16;
    }
    f->rip = target;
    f->cs = SOFT_KCS;
    return 1;
}

/* LRETQ / IRETQ to a selector of the guest's own GDT: at CPL1 a DPL0 (RPL0)
 * target raises #GP(sel) (SDM Vol. 2B RET, IRET); pop the frame ourselves. */
static int emu_far_return(struct soft_vcpu *v, struct exc_frame *f, const struct insn *in, int iret)
{
    u64 fr[5] = { 0, 0, 0, 0, 0 };
    u16 cs, ss = (u16)f->ss;
    u64 pop = iret ? 40 : 16 + in->imm;

    if (gread(f->rsp, fr, iret ? 40 : 16) || translate(v, (u16)fr[1], SEG_CS, &cs))
        return reflect(v, f, iret ? TR_IRETQ : TR_LRET, 13, fr[1] & 0xfffc);
    u64 rsp = f->rsp + pop;
    if (!iret && cs == SOFT_UCS) {      /* lret to the outer ring also pops SS:RSP */
        if (gread(rsp, fr + 3, 16))
            return reflect(v, f, TR_LRET, 13, 0);
        rsp = fr[3];
        ss = (u16)fr[4];
        fr[4] = ss;
    } else if (iret) {
        rsp = fr[3];
    }
    if ((iret || cs == SOFT_UCS) && translate(v, (u16)fr[4], SEG_SS, &ss))
        return reflect(v, f, iret ? TR_IRETQ : TR_LRET, 13, fr[4] & 0xfffc);
    if (iret) {
        v->vif = (fr[2] & RFL_IF) != 0;
        f->rflags = (fr[2] & RFL_GUEST) | 0x2;
    }
    f->rip = fr[0];
    f->cs = cs;
    f->rsp = rsp;
    f->ss = ss;
    return 1;
}

/* #GP from the guest kernel (CPL1): the privileged instruction to emulate. */
static int gp_kernel(struct soft_vcpu *v, struct exc_frame *f, struct insn *in, int r)
{
    u64 t;
    u16 lim;
    u64 base;

    switch (r) {
    case TR_CPUID: {
        struct cpuid_regs c;
        hv_cpuid(v->cfg, (u32)f->rax, (u32)f->rcx, &c);
        f->rax = c.eax;
        f->rbx = c.ebx;
        f->rcx = c.ecx;
        f->rdx = c.edx;
        return done(f, in);
    }
    case TR_RDTSC:
        if (v->no_emulate_rdtsc)        /* negative control: the guest sees the #GP */
            return reflect(v, f, r, 13, 0);
        t = tsc_value(v);
        f->rax = (u32)t;
        f->rdx = t >> 32;
        return done(f, in);
    case TR_HLT:
        if (v->unknown_hlt)
            return unemulated(v, f, in);
        /* IF=0 and no virtual interrupts: a real CPU would sleep forever; like
         * the SVM host, count it and resume. A HLT loop ends the guest. */
        if (++v->hlts > HLT_LIMIT)
            return end_guest(v, f, "hlt-limit");
        return done(f, in);
    case TR_CLI:
        v->vif = 0;
        return done(f, in);
    case TR_STI:
        v->vif = 1;
        return done(f, in);
    case TR_OUT: {
        u32 port = in->op <= 0xe7 ? (u32)in->imm : (u16)f->rdx;
        int size = (in->op & 1) ? (in->osz ? 2 : 4) : 1;
        f->rip += (u64)in->len;
        if (port == LABHC_PORT && size == 4)
            return exit_to_host(v, f, SOFT_EXIT_REPORT);   /* a report: soft_main */
        return 1;                       /* other ports: dropped, as by the SVM host */
    }
    case TR_IN: {                       /* an empty bus reads all ones */
        int size = (in->op & 1) ? (in->osz ? 2 : 4) : 1;
        f->rax = size == 4 ? 0xffffffffull : f->rax | (size == 2 ? 0xffff : 0xff);
        return done(f, in);
    }
    case TR_MOV_CR:
        return emu_mov_cr(v, f, in);
    case TR_RDMSR: case TR_WRMSR:
        return emu_msr(v, f, in, r == TR_WRMSR);
    case TR_LGDT: case TR_LIDT:         /* 64-bit mode: 2-byte limit, 8-byte base */
        if (gread(in->ea, &lim, 2) || gread(in->ea + 2, &base, 8))
            return reflect(v, f, r, 13, 0);
        if (r == TR_LGDT) {
            v->gdt_lim = lim;
            v->gdt_base = base;
        } else {
            v->idt_lim = lim;
            v->idt_base = base;
        }
        return done(f, in);
    case TR_LTR:
        return emu_ltr(v, f, in);
    case TR_MOV_SREG:
        return emu_mov_sreg(v, f, in);
    case TR_LRET: case TR_IRETQ:
        return emu_far_return(v, f, in, r == TR_IRETQ);
    case TR_SGDT: case TR_SIDT: case TR_SLDT: case TR_SMSW: case TR_STR:
        return emu_store_sys(v, f, in, r);
    case TR_LLDT:
        return emu_lldt(v, f, in);
    case TR_POP_SREG:
        return emu_pop_sreg(v, f, in);
    case TR_INT:                        /* the host's IDT has no gate there: the guest's has */
        f->rip += (u64)in->len;
        return deliver(v, f, (u32)in->imm, 0, 0);
    case TR_FAR_CALL: case TR_FAR_JMP:
        return emu_far_gate(v, f, in, r == TR_FAR_CALL);
    }
    return unemulated(v, f, in);
}

static int trap_gp(struct soft_vcpu *v, struct exc_frame *f)
{
    struct insn in;
    int user = (f->cs & 3) == 3;
    int r = decode(f, &in) ? TR_UNKNOWN : identify(&in);

    if (!user) {
        /* VMMCALL/VMCALL: no hypercalls here; a CPU without SVM/VMX raises
         * #UD (APM Vol. 3 VMMCALL, SDM Vol. 3C 25.1.2). kvm_pvm instead
         * rewrites the guest's VMMCALL at CPL1 into VMCALL (KVM's hypercall
         * patching) and raises #GP(0) on it: give the guest its #UD. */
        if (r == TR_VMMCALL || r == TR_VMCALL) {
            v->count[r]++;
            return reflect(v, f, r, 6, 0);
        }
        if (r == TR_UNKNOWN || r == TR_UD2)
            return unemulated(v, f, &in);
        v->count[r]++;
        return gp_kernel(v, f, &in, r);
    }
    /* Guest user mode (CPL3 for both). CPUID faulting and a TSD set only for
     * the intercept are ours to hide; all else is the guest's own #GP. */
    if (r == TR_UNKNOWN || r == TR_UD2 || r == TR_VMMCALL || r == TR_VMCALL)
        r = TR_GP;
    v->count[r]++;
    if (r == TR_CPUID || (r == TR_RDTSC && !(v->cr4 & CR4_TSD)))
        return gp_kernel(v, f, &in, r);
    return reflect(v, f, r, 13, f->error_code);
}

/* The cost loop (soft.c) runs host code at CPL1 with CR4.TSD=1: same entry,
 * decode and emulation path as a guest RDTSC, nothing else. */
static int cost_trap(struct exc_frame *f)
{
    struct insn in;

    if (f->vector != 13 || (f->cs & 3) != 1 || decode(f, &in) || identify(&in) != TR_RDTSC)
        return 0;
    u64 t = rdtsc();
    f->rax = (u32)t;
    f->rdx = t >> 32;
    f->rip += (u64)in.len;
    return 1;
}

/* exc_set_hook target for vectors 0-31 while soft_main runs. Returns 0 for
 * anything not from the guest (the dispatcher's defaults handle the host). */
int soft_trap(struct exc_frame *f)
{
    struct soft_vcpu *v = &soft_vcpu;
    struct insn in;

    if (soft_mode == SOFT_COST)
        return cost_trap(f);
    if (soft_mode != SOFT_GUEST || !(f->cs & 3) || f->vector == 2 || f->vector == 18)
        return 0;                       /* host faults, NMI, #MC: not the guest's */
    if (++v->traps > TRAP_LIMIT)
        return end_guest(v, f, "trap-limit");
    fault_linger_guest();
    hv_pg_count(v->ctx, f->rip);
    switch (f->vector) {
    case 13:
        return trap_gp(v, f);
    case 6: {                           /* the guest's ud2 (its way back from CPL3) */
        int r = decode(f, &in) ? TR_UD : identify(&in);
        if (r != TR_UD2 && r != TR_VMMCALL && r != TR_VMCALL)
            r = TR_UD;
        v->count[r]++;
        return reflect(v, f, r, 6, 0);
    }
    case 8:
        return end_guest(v, f, "double-fault");
    case 14:
        v->cr2 = read_cr2();
        /* fallthrough */
    default:
        v->count[TR_EXC]++;
        v->exc_vectors |= 1u << f->vector;
        return reflect(v, f, TR_EXC, (u32)f->vector, f->error_code);
    }
}

/* soft_run.S addresses the vcpu by these offsets */
_Static_assert(__builtin_offsetof(struct soft_vcpu, f) == 0, "soft_vcpu.f");
_Static_assert(__builtin_offsetof(struct soft_vcpu, ds) == 176, "soft_vcpu.ds");
_Static_assert(__builtin_offsetof(struct soft_vcpu, es) == 184, "soft_vcpu.es");
