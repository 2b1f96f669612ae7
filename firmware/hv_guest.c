/* hv_guest.c - host-independent half of the hypervisor: command-line keys,
 * loading the guest kernel, the CPUID view a guest gets, and turning the
 * guest's reports (lab_guest_abi.h) into records. The host only relays: every
 * value in a guest record is the one the guest measured. */
#include "hv_guest.h"

extern char __kernel_end[];

/* ---- configuration (docs/records.md, "Hypervisor and guest") ---- */
static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int flag(const char *key, int dflt)
{
    const char *v = cmdline_get(key);
    if (!v || !*v)
        return dflt;
    return !(v[0] == '0' && v[1] == 0);
}

void hv_config_parse(struct hv_config *c)
{
    const char *s = cmdline_get("hv-signature");
    int n = 0;

    c->mode = cmdline_get("host-mode");
    if (!c->mode || !*c->mode)
        c->mode = "auto";
    if (!s)
        s = HV_DEFAULT_SIGNATURE;
    /* Same escaping as records: \xHH is one byte (so NULs can be asked for). */
    memset(c->signature, 0, sizeof c->signature);
    for (const char *p = s; *p; n++) {
        u8 b;
        if (p[0] == '\\' && p[1] == 'x' && hexval(p[2]) >= 0 && hexval(p[3]) >= 0) {
            b = (u8)(hexval(p[2]) << 4 | hexval(p[3]));
            p += 4;
        } else {
            b = (u8)*p++;
        }
        if (n < 12)
            c->signature[n] = b;
    }
    c->sig_len = n;
    c->intercept_rdtsc = flag("hv-intercept-rdtsc", 1);
    c->intercept_cpuid = flag("hv-intercept-cpuid", 1);
#ifdef LAB_LIE_GUEST_CPUID
    c->intercept_cpuid = 0;   /* lie-guest-cpuid: the guest's CPUID never exits ... */
#endif
    c->npt = flag("hv-npt", 1);
    c->fault = cmdline_get("hv-fault");
}

/* ---- the guest image ---- */
static u64 rd64(const u8 *p, unsigned off)
{
    u64 v;
    memcpy(&v, p + off, 8);
    return v;
}

static void move(u8 *d, const u8 *s, u64 n)   /* memmove: module may overlap */
{
    if (d < s)
        for (u64 i = 0; i < n; i++) d[i] = s[i];
    else
        for (u64 i = n; i > 0; i--) d[i - 1] = s[i - 1];
}

static int in_window(u64 a, u64 len)
{
    return a >= LABG_WINDOW_BASE && len <= LABG_WINDOW_SIZE &&
           a - LABG_WINDOW_BASE <= LABG_WINDOW_SIZE - len;
}

int hv_guest_load(const struct bootinfo *bi, struct hv_guest_image *img, const char **why)
{
    unsigned i;
    const u8 *p = NULL;
    u64 size = 0;

    for (i = 0; i < bi->nmods; i++) {
        p = (const u8 *)bi->mods[i].start;      /* identity-mapped (boot.S) */
        size = bi->mods[i].end - bi->mods[i].start;
        if (size >= LABG_HEADER_SIZE && !memcmp(p, LABG_MAGIC, 8))
            break;
    }
    if (bi->nmods == 0) { *why = "no-guest-module"; return -1; }
    if (i == bi->nmods) { *why = "bad-guest-magic"; return -1; }

    img->module = i;
    img->load = rd64(p, LABG_OFF_LOAD_ADDR);
    img->entry = rd64(p, LABG_OFF_ENTRY);
    img->cr3 = rd64(p, LABG_OFF_CR3);
    img->stack_top = rd64(p, LABG_OFF_STACK_TOP);
    img->image_size = rd64(p, LABG_OFF_IMAGE_SIZE);
    img->mem_size = rd64(p, LABG_OFF_MEM_SIZE);
    if (img->image_size > size || img->image_size > img->mem_size ||
        !in_window(img->load, img->mem_size) || !in_window(img->entry, 1) ||
        !in_window(img->cr3, 4096) || (img->cr3 & 0xfff) ||
        !in_window(img->stack_top - 8, 8)) {
        *why = "bad-guest-header";
        return -1;
    }
    if ((u64)__kernel_end > LABG_WINDOW_BASE) {  /* the host itself would be overwritten */
        *why = "host-overlaps-guest-window";
        return -1;
    }
    move((u8 *)img->load, p, img->image_size);
    memset((u8 *)img->load + img->image_size, 0, img->mem_size - img->image_size);
    return 0;
}

/* ---- CPUID as the guest sees it (APM Vol. 3 "CPUID"; 0x40000000.. is the
 * range hypervisors use for their own leaves) ---- */
void hv_cpuid(const struct hv_config *c, u32 leaf, u32 subleaf, struct cpuid_regs *r)
{
    if (leaf >= 0x40000000 && leaf <= 0x400000ff) {
        *r = (struct cpuid_regs){ 0, 0, 0, 0 };
        if (leaf == 0x40000000) {
            r->eax = 0x40000001;            /* highest hypervisor leaf */
            memcpy(&r->ebx, c->signature, 4);
            memcpy(&r->ecx, c->signature + 4, 4);
            memcpy(&r->edx, c->signature + 8, 4);
        }
        return;
    }
    cpuid(leaf, subleaf, r);
    if (leaf == 1)
        r->ecx = (r->ecx | 1u << 31)        /* "hypervisor present" */
                 & ~(1u << 5);              /* no nested VMX for the guest */
    if (leaf == 0x80000001)
        r->ecx &= ~(1u << 2);               /* no nested SVM for the guest */
    if (leaf == 0x8000000a)
        *r = (struct cpuid_regs){ 0, 0, 0, 0 };
}

/* ---- guest reports -> records ---- */
static const char *const pg_names[LABHC_PG_N] = {
    "sgdt", "sidt", "sldt", "smsw", "str", "pushf", "popf", "lar", "lsl", "verr", "verw",
    "pop", "push", "call", "jmp", "int", "ret", "mov",
};

static struct exc_result outcome(u64 o, u64 err, u64 rip, u64 cs);

/* One pg-* check: the guest's view against its own (a struct labhc_pg), and the host's own
 * traps/exits at the probed instruction. */
static void pg_record(struct hv_ctx *c, u64 umip, const u64 *e)
{
    u64 idx = e[0], seen = e[1], own = e[2], events = 0;
    if (idx >= LABHC_PG_N)
        return;
    struct exc_result x = outcome(e[3], e[4], 0, 0);
    for (unsigned i = 0; i < c->pg_nlog; i++)
        events += c->pg_log[i] == e[5];
    if (LAB_IS_LIE && idx == LABHC_PG_RET) {
        events = 0;                     /* lie variant: a leak that did not happen */
        seen = own ^ 1;
    }
    int same = !x.faulted && seen == own;
    char name[16] = "pg-";
    memcpy(name + 3, pg_names[idx], strlen(pg_names[idx]) + 1);
    rec_obs_begin(c->scope, name);
    rec_u64("umip", umip);
    /* traps: the host saw it and the guest saw its own view; wrong: it saw it, yet the guest saw
     * another; leaks: unseen, and the guest saw what a CPL0 kernel would not. */
    rec_str("obs", events ? (same ? "traps" : "wrong") : (same ? "same" : "leaks"));
    /* what the guest saw where it differs from its own view; the host's count where nonzero
     * (each byte of serial output costs ~10 us under kvm_pvm: firmware/README.md) */
    if (seen != own)
        rec_hex("seen", seen);
    rec_hex("own", own);
    if (events)
        rec_u64("events", events);
    if (x.faulted)
        rec_exc("exc", x);
    rec_end();
}

static void pg_skips(void *arg)         /* bit i: `skip=pg-<pg_names[i]>` */
{
    char name[16] = "pg-";
    u64 *skip = arg;
    for (int i = 0; i < LABHC_PG_N; i++) {
        memcpy(name + 3, pg_names[i], strlen(pg_names[i]) + 1);
        if (cmdline_list_has("skip", name))
            *skip |= 1ull << i;
    }
}
static const char *via_name(u64 v)
{
    switch (v) {
    case LABHC_VIA_VMRUN: return "vmrun";
    case LABHC_VIA_IRETQ: return "iretq";
    case LABHC_VIA_UD2:   return "ud2";
    default:              return "fault";
    }
}

static void put_regs12(const char *key, u32 a, u32 b, u32 c)
{
    u8 s[12];
    memcpy(s, &a, 4);
    memcpy(s + 4, &b, 4);
    memcpy(s + 8, &c, 4);
    rec_bytes(key, s, 12);
}

static struct exc_result outcome(u64 o, u64 err, u64 rip, u64 cs)
{
    if (o == LABHC_OUTCOME_OK)
        return EXC_OK;
    return (struct exc_result){ 1, (u32)(o & 0xff), err, rip, cs };
}

u64 hv_native_cpuid_cycles(u64 iterations)
{
    struct cpuid_regs r;
    u64 t0 = rdtsc();
    for (u64 i = 0; i < iterations; i++)
        cpuid(0, 0, &r);
    return rdtsc() - t0;
}

int hv_guest_report(struct hv_ctx *c, struct hv_gregs *r)
{
    u32 fn = (u32)r->rax;
#ifdef LAB_LIE_GUEST_CPUID
    /* ... yet its CPUID reports carry what the host would have answered had it exited: the
     * records say what the rules expect of a host that intercepts CPUID (negative control). */
    u32 leaf = fn == LABHC_CPUID_VENDOR ? 0 : fn == LABHC_CPUID_HV_BIT ? 1 : fn == LABHC_CPUID_HV_SIG ? 0x40000000 : 2;
    if (leaf != 2) {
        struct cpuid_regs q;
        hv_cpuid(c->cfg, leaf, 0, &q);
        if (leaf == 1)
            r->rdi = q.ecx;
        else
            r->rsi = q.eax, r->rdx = q.ebx, r->rcx = q.ecx, r->r8 = q.edx;
    }
#endif

    switch (fn) {
    case LABHC_HELLO:
        rec_begin("info");
        rec_u64("guest.abi", r->rdi);
        rec_str("guest.scope", c->scope);
        rec_end();
        return 0;
    case LABHC_CPL_ENTER:
        rec_obs_begin(c->scope, "cpl-enter");
        rec_u64("cpl", r->rdi);
        rec_str("via", r->rsi == LABHC_VIA_VMRUN && c->entry_via ? c->entry_via : via_name(r->rsi));
        rec_u64("obs", r->rdx & 3);
        rec_hex("cs", r->rdx);
        rec_end();
        return 0;
    case LABHC_CPL_RETURN:
        rec_obs_begin(c->scope, "cpl-return");
        rec_u64("from_cpl", r->rdi);
        rec_str("via", via_name(r->rsi));
        rec_u64("obs", r->rdx & 3);
        rec_hex("cs", r->rdx);
        rec_hex("frame_cs", r->rcx);
        if (r->rsi == LABHC_VIA_FAULT)
            rec_u64("vector", r->r8);
        rec_end();
        return 0;
    case LABHC_CPUID_VENDOR:                /* vendor bytes: ebx, edx, ecx */
        rec_obs_begin(c->scope, "cpuid-vendor");
        rec_u64("leaf", r->rdi);
        put_regs12("obs", (u32)r->rdx, (u32)r->r8, (u32)r->rcx);
        rec_hex("max", (u32)r->rsi);
        rec_end();
        return 0;
    case LABHC_CPUID_HV_BIT:
        rec_obs_begin(c->scope, "cpuid-hv-bit");
        rec_u64("obs", (r->rdi >> 31) & 1);
        rec_end();
        return 0;
    case LABHC_CPUID_HV_SIG:                /* signature bytes: ebx, ecx, edx */
        rec_obs_begin(c->scope, "cpuid-hv-signature");
        put_regs12("obs", (u32)r->rdx, (u32)r->rcx, (u32)r->r8);
        rec_hex("max", (u32)r->rsi);
        rec_end();
        return 0;
    case LABHC_RDTSC: {
        struct exc_result e = outcome(r->rdx, r->rcx, r->r8, r->r9);
        rec_obs_begin(c->scope, "rdtsc");
        rec_u64("tsd", r->rdi);
        rec_u64("cpl", r->rsi);
        if (LAB_IS_LIE && r->rdi == 1 && r->rsi == 3)
            rec_str("obs", "ok");           /* lie variant: negative control */
        else
            rec_exc("obs", e);
        if (e.faulted) {
            rec_hex("rip", e.rip);
            rec_hex("cs", e.cs);
        }
        rec_end();
        return 0;
    }
    case LABHC_UMIP: {                      /* the guest's UMIP probes (lab/catalogue.py) */
        static const char *const names[] = { "sgdt", "sidt", "sldt", "smsw", "str" };
        if (r->rdi >= 5)
            return 0;
        struct exc_result e = outcome(r->rcx, r->r8, r->r9, 0);
        rec_obs_begin(c->scope, names[r->rdi]);
        rec_u64("umip", r->rsi);
        rec_u64("cpl", r->rdx);
        rec_exc("obs", e);
        rec_end();
        return 0;
    }
    case LABHC_PG_BEGIN: {              /* the skip= words name pg-<insn> (lab/deviations.py) */
        u64 skip = 0;
        run_at_cpl(3, pg_skips, &skip); /* string work at CPL3: kvm_pvm emulates CPL0 (README) */
        r->rax = skip;
        if (r->rdi < r->rsi && in_window(r->rdi, r->rsi - r->rdi)) {
            c->pg_lo = r->rdi;
            c->pg_hi = r->rsi;
        }
        c->pg_nlog = 0;
        return 0;
    }
    case LABHC_PG_BATCH: {
        u64 n = r->rsi;
        if (n > LABHC_PG_N || !in_window(r->rdi, n * LABHC_PG_WORDS * 8)) {
            c->pg_nlog = 0;
            return 0;
        }
        const u64 *e = (const u64 *)r->rdi;    /* guest-physical == host-physical in its window */
        for (u64 k = 0; k < n; k++, e += LABHC_PG_WORDS)
            pg_record(c, r->rdx, e);
        c->pg_nlog = 0;                 /* the next pass logs afresh */
        return 0;
    }
    case LABHC_RDTSC_SEEN:
        rec_obs_begin(c->scope, "rdtsc-intercepted");
        rec_u64("cpl", r->rdi);
        rec_u64("intercept", (u64)c->cfg->intercept_rdtsc);
        rec_str("obs", (r->rsi & LAB_TSC_MARK_MASK) == LAB_TSC_MARK ? "host-value" : "native");
        rec_hex("tsc", r->rsi);
        rec_end();
        return 0;
    case LABHC_COST: {
        u64 n = r->rsi ? r->rsi : 1;
        u64 native = hv_native_cpuid_cycles(n);
        char key[48];
        rec_begin("info");
        rec_str("scope", c->scope);
        /* cost.cpuid.<path>_cycles: TSC cycles per CPUID, guest loop vs host CPL0 loop */
        memcpy(key, "cost.cpuid.", 11);
        size_t pl = strlen(c->exit_path);
        memcpy(key + 11, c->exit_path, pl);
        memcpy(key + 11 + pl, "_cycles", 8);
        rec_u64(key, r->rdx / n);
        rec_u64("cost.cpuid.native_cycles", native / n);
        rec_u64("cost.iterations", n);
        rec_u64("cost.cpuid.intercepted", (u64)c->cfg->intercept_cpuid);
        rec_end();
        return 0;
    }
    case LABHC_PANIC:
        rec_begin("info");
        rec_str("guest.end", "panic");
        rec_exc("guest.exception", outcome(LABHC_OUTCOME_EXC | (r->rdi & 0xff), r->rsi, r->rdx, r->rcx));
        rec_hex("guest.rip", r->rdx);
        rec_hex("guest.cs", r->rcx);
        rec_end();
        c->end = "panic";
        return 1;
    case LABHC_DONE:
        rec_begin("info");
        rec_str("guest.end", "done");
        rec_u64("guest.probes", r->rdi);
        rec_end();
        c->end = "done";
        return 1;
    default:
        rec_begin("info");
        rec_hex("guest.bad_report", fn);
        rec_end();
        return 0;
    }
}

void hv_info_none(const struct hv_config *c, const char *why)
{
    rec_begin("info");
    rec_str("hv", "none");
    rec_str("reason", why);
    rec_str("hv.mode", c->mode);
    rec_end();
}
