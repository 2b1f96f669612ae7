/* lab.h - internal API of the host kernel ("firmware").
 *
 * The kernel only OBSERVES and prints records (docs/records.md); it never
 * judges. Everything here runs in 64-bit long mode, IF=0 always.
 */
#ifndef LAB_H
#define LAB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed long long s64;
typedef unsigned long size_t;
typedef long ssize_t;
#define NULL ((void *)0)

#define NORETURN __attribute__((noreturn))
#define PACKED __attribute__((packed))
#define ALIGNED(n) __attribute__((aligned(n)))

/* ---- GDT layout (selectors). SYSCALL/SYSRET need STAR-compatible order:
 * APM Vol. 2 6.1.1: SYSCALL CS=STAR[47:32], SS=+8; 64-bit SYSRET CS=STAR[63:48]+16,
 * SS=STAR[63:48]+8 (RPL forced to 3). STAR[47:32]=0x08, STAR[63:48]=0x18. */
#define SEL_KCODE   0x08    /* 64-bit code, DPL0 */
#define SEL_KDATA   0x10    /* data, DPL0 (also flat 32-bit data at boot) */
#define SEL_UCODE32 0x18    /* 32-bit code, DPL3 (unused; SYSRET base) */
#define SEL_UDATA   0x20    /* data, DPL3 -> 0x23 */
#define SEL_UCODE   0x28    /* 64-bit code, DPL3 -> 0x2b */
#define SEL_R1CODE  0x30    /* 64-bit code, DPL1 -> 0x31 */
#define SEL_R1DATA  0x38    /* data, DPL1 -> 0x39 */
#define SEL_R2CODE  0x40    /* 64-bit code, DPL2 -> 0x42 */
#define SEL_R2DATA  0x48    /* data, DPL2 -> 0x4a */
#define SEL_TSS     0x50    /* 64-bit TSS (16 bytes) */
#define SEL_KCODE32 0x60    /* 32-bit code, DPL0 (boot) */
#define SEL_KCODE16 0x70    /* 16-bit code, DPL0 (real-mode trip) */
#define SEL_KDATA16 0x78    /* 16-bit data, DPL0 */

/* ---- serial (COM1 0x3f8, written directly; see serial.c) ---- */
void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);
void serial_flush(void);   /* output is buffered: rec_end()/lab_exit() flush */

/* ---- exceptions ---- */
struct exc_result {
    u32 faulted;      /* 0: instruction completed; 1: exception taken */
    u32 vector;       /* valid if faulted */
    u64 error_code;   /* valid if faulted and the vector pushes one */
    u64 rip;          /* faulting RIP (if faulted) */
    u64 cs;           /* CS in the exception frame (if faulted) */
};
#define EXC_OK ((struct exc_result){0, 0, 0, 0, 0})
int exc_has_error_code(u32 vector);   /* 8,10-14,17,21,29,30 */

/* Frame built by the common entry stub (isr.S), passed to exc_dispatch().
 * Layout is stable: GDB witness reads it (see firmware/README.md). */
struct exc_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8;
    u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss;     /* hardware IRETQ frame */
};
/* The common C dispatcher (GDB witness point). */
void exc_dispatch(struct exc_frame *f);
/* Hook: called first for that vector; return nonzero if handled (the
 * dispatcher then IRETQs with *f as modified), 0 to fall through to the
 * default (guarded insn / ring return / unexpected -> record + exit). */
typedef int (*exc_hook_fn)(struct exc_frame *f);
void exc_set_hook(int vector, exc_hook_fn fn);   /* fn=NULL removes it */

/* ---- records (docs/records.md) ----
 * rec_str/rec_bytes keep the POINTER until rec_end(): the buffer must stay
 * valid (and unchanged) until then. Keys must be string literals or static. */
void rec_begin(const char *type);                 /* "@@LAB <seq> <type>" */
void rec_str(const char *key, const char *val);   /* key=<escaped val> */
void rec_bytes(const char *key, const void *p, size_t n);  /* escaped bytes */
void rec_u64(const char *key, u64 v);             /* decimal */
void rec_hex(const char *key, u64 v);             /* 0x... lowercase */
void rec_exc(const char *key, struct exc_result r); /* ok | #GP(0) | #UD | #GP(0xd2) ... */
void rec_end(void);                               /* " ck=hh\r\n" */
void rec_abort(void);   /* send a half-built record as is (corrupt on purpose), end the line */
/* "@@LAB n obs scope=<scope> probe=<probe>"; then params, then rec_*("obs",..), details. */
void rec_obs_begin(const char *scope, const char *probe);
/* One-line info record "info <key>=<val>". */
void rec_info_str(const char *key, const char *val);
void rec_info_hex(const char *key, u64 v);
u64 rec_count(void);                              /* records emitted so far */
/* rec_end() renders the line at CPL3 (fast under kvm_pvm, see records.c);
 * rec_set_fast(0) makes it render in place at the current CPL instead. */
void rec_set_fast(int on);
/* Emits "end count=N", exits via isa-debug-exit (port 0x501): status (code<<1)|1. */
NORETURN void lab_finish(int code);
NORETURN void lab_exit(int code);   /* isa-debug-exit without end record */

/* isa-debug-exit values used by the kernel (QEMU exit status = (v<<1)|1) */
#define LAB_EXIT_OK          0   /* status 1 */
#define LAB_EXIT_UNEXPECTED  3   /* status 7: unexpected exception */
#define LAB_EXIT_PANIC       4   /* status 9: internal panic */

NORETURN void panic(const char *msg);

/* ---- cpu helpers ---- */
struct cpuid_regs { u32 eax, ebx, ecx, edx; };
static inline void cpuid(u32 leaf, u32 subleaf, struct cpuid_regs *r)
{
    __asm__ volatile("cpuid" : "=a"(r->eax), "=b"(r->ebx), "=c"(r->ecx), "=d"(r->edx)
                     : "a"(leaf), "c"(subleaf));
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 read_cr0(void) { unsigned long v; __asm__ volatile("mov %%cr0,%0" : "=r"(v)); return v; }
static inline u64 read_cr2(void) { unsigned long v; __asm__ volatile("mov %%cr2,%0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { unsigned long v; __asm__ volatile("mov %%cr3,%0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { unsigned long v; __asm__ volatile("mov %%cr4,%0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0,%%cr0" :: "r"((unsigned long)v) : "memory"); }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0,%%cr3" :: "r"((unsigned long)v) : "memory"); }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0,%%cr4" :: "r"((unsigned long)v) : "memory"); }
static inline u16 read_cs(void) { u16 v; __asm__ volatile("mov %%cs,%0" : "=r"(v)); return v; }
static inline u16 read_ss(void) { u16 v; __asm__ volatile("mov %%ss,%0" : "=r"(v)); return v; }
static inline u64 read_rflags(void) { u64 v; __asm__ volatile("pushfq; pop %0" : "=r"(v)); return v; }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0,%1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0,%1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0,%1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1,%0" : "=a"(v) : "Nd"(port)); return v; }

#define CR0_PE (1ull << 0)
#define CR0_PG (1ull << 31)
#define CR4_TSD (1ull << 2)
#define CR4_PAE (1ull << 5)
#define CR4_UMIP (1ull << 11)
#define MSR_EFER   0xC0000080
#define MSR_STAR   0xC0000081
#define MSR_LSTAR  0xC0000082
#define MSR_CSTAR  0xC0000083
#define MSR_SFMASK 0xC0000084
#define EFER_SCE   (1ull << 0)
#define EFER_LME   (1ull << 8)
#define EFER_LMA   (1ull << 10)
#define EFER_SVME  (1ull << 12)

/* ---- boot info (from the multiboot v1 info block) ---- */
struct bootinfo {
    const char *cmdline;                 /* never NULL ("" if none) */
    unsigned nmods;
    struct { u64 start, end; const char *string; } mods[8];
};
extern struct bootinfo bootinfo;
const char *boot_image_name(void);   /* first word of the multiboot cmdline */
/* Memory: boot.S identity-maps 0..4 GiB (VA == PA, 2 MiB pages, RW, U/S=1);
 * nothing above 4 GiB is mapped. The kernel image + .bss + stacks end at
 * __kernel_end (linker symbol, well below 16 MiB). */
extern char __kernel_start[], __kernel_end[];
/* Value of key=value in the kernel command line (points into a static copy,
 * NUL-terminated at the next space), or NULL. A bare "key" yields "". */
const char *cmdline_get(const char *key);
int cmdline_has(const char *key);
/* 1 if `name` is in the comma-separated list of cmdline key `key` (e.g. skip). */
int cmdline_list_has(const char *key, const char *name);

/* ---- small libc ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* ---- the "run at CPL n" harness (ring.S, ring.c) ----
 * run_at_cpl(n, fn, arg): IRETQ to ring n (n=1,2,3; n=0 just calls fn),
 * fn(arg) runs there on a fixed per-ring stack, then the trampoline executes
 * ud2; the #UD handler (CPL0) recognises RIP ring_return_ud2 and resumes the
 * kernel context. If fn takes an unguarded exception in ring n, that
 * exception is returned (faulted=1) instead of killing the kernel.
 * The probes themselves run through probe.h (one stub per instruction). */
typedef void (*probe_fn)(void *arg);
struct exc_result run_at_cpl(int cpl, probe_fn fn, void *arg);
/* How the last run_at_cpl came back to CPL0, and CS as read there. */
enum ring_via { RING_VIA_NONE = 0, RING_VIA_UD = 1, RING_VIA_SYSCALL = 2,
                RING_VIA_SYSCALL_UD = 3, RING_VIA_FAULT = 4 };
struct ring_state {
    u64 active;        /* nonzero while ring code runs */
    u64 via;           /* enum ring_via */
    u64 return_cs;     /* CS read by the first instructions back (CPL0, or LSTAR entry) */
    u64 resume_cs;     /* CS read in the kernel context after resuming (always CPL0) */
    u64 entry_cs;      /* CS read by ring_entry* (first instructions in ring n) */
};
extern volatile struct ring_state ring_state;

/* ---- guarded execution ----
 * TRY_INSN(res, "insn") runs one asm snippet; if it raises an exception the
 * dispatcher finds its RIP in the .extable section, stores the exception in
 * try_state and resumes after the snippet (works at any CPL: memory is U/S=1).
 * Clobbers all caller-saved GPRs and rbx. */
struct try_state_s { volatile u32 faulted, vector; volatile u64 error_code, rip, cs; };
extern struct try_state_s try_state;
void try_reset(void);
struct exc_result try_result(void);
#ifdef __x86_64__
#define LAB_EXTABLE(from, to) \
    ".pushsection .extable,\"a\"\n .balign 8\n .quad " #from ", " #to "\n .popsection\n"
#else   /* the 32-bit host kernel (arch32/): the same 16-byte entries */
#define LAB_EXTABLE(from, to) \
    ".pushsection .extable,\"a\"\n .balign 8\n .long " #from ", 0, " #to ", 0\n .popsection\n"
#endif
#define TRY_INSN(res, insn) do { \
    try_reset(); \
    __asm__ volatile("1: " insn "\n2:\n" LAB_EXTABLE(1b, 2b) \
        ::: "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc"); \
    (res) = try_result(); } while (0)
/* Same with one input operand in %rax (e.g. the value for mov %rax,%cr4). */
#define TRY_INSN_RAX(res, insn, val) do { \
    try_reset(); \
    __asm__ volatile("1: " insn "\n2:\n" LAB_EXTABLE(1b, 2b) \
        :: "a"((u64)(val)) : "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc"); \
    (res) = try_result(); } while (0)
/* RDMSR / WRMSR of an MSR the CPU may not have: nonzero where it faulted (lib.c). */
int rdmsr_safe(u32 msr, u64 *val);
int wrmsr_safe(u32 msr, u64 val);
/* MSR_PLATFORM_INFO 0xCE bit 31: CPUID faulting offered (Intel SDM Vol. 4 2.17); read at boot. */
#define MSR_PLATFORM_INFO         0xce
#define PLATFORM_INFO_CPUID_FAULT (1ull << 31)
extern u8 cpu_cpuid_faulting;
/* Function form: run fn(arg) at the current CPL; any exception inside fn is
 * caught (fn is abandoned at the fault) and returned. CPL0 only. */
struct exc_result try_call(probe_fn fn, void *arg);

/* ---- the probe running now, for the unexpected-exception record only (the
 * GDB witness never reads firmware memory) ---- */
extern const char *probe_running;
extern int fault_linger;   /* fault=linger (faults.c): lab_exit waits after `end` */
void fault_linger_guest(void);   /* ... and the hosts at their guest's first exit (records.c) */

/* ---- hypervisor hook ----
 * kmain calls hv_main (svm.c: SVM or the software host) after the host
 * probes and before lab_finish(0). The GDB witness takes the CPU reaching
 * hv_main as the end of the host's probe phase. */
void hv_main(const struct bootinfo *bi);
/* cpuinfo.c, for both host kernels: the CPUID info records, and the real-mode probe's record. */
void info_cpuid(void);
extern u32 cpu_leaf7_ecx;   /* CPUID.(07H,0):ECX read at boot (cpuinfo.c) */
void realmode_report(void);

/* ---- misc ---- */
extern const char lab_variant[];   /* "normal" or a negative control (firmware/Makefile VARIANTS) */
#ifdef LAB_LIE
#define LAB_IS_LIE 1
#else
#define LAB_IS_LIE 0
#endif

#endif
