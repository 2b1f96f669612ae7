/* records.c - the serial record protocol (docs/records.md).
 *
 * Speed matters under kvm_pvm: there every instruction at CPL0/1/2 is
 * emulated (~2000-3000 TSC cycles each) while CPL3 code runs natively (see
 * README.md "Performance"). So rec_*() only queue {key, value} ops (a few
 * instructions each); rec_end() renders the line - text, escaping and the
 * checksum - at CPL3 (rec_render_cpl3 in ring.S: IRETQ in, int3 out through
 * a fast path in isr_stub_3 that never reaches exc_dispatch), then sends it
 * from CPL0. When a ring trip is not safe (before cpu_init, inside the
 * exception dispatcher, at CPL>0, rec_set_fast(0)) the same renderer runs in
 * place. Pointers given to rec_str/rec_bytes must stay valid until rec_end. */
#include "lab.h"

enum { OP_HEAD, OP_STR, OP_BYTES, OP_U64, OP_HEX, OP_EXC, OP_TAIL };
struct rec_op {
    u32 kind;
    u32 vec;            /* OP_EXC: vector; faulted flag in bit 31 */
    const char *key;    /* OP_HEAD: the record type */
    const void *p;
    u64 v;              /* number, byte count, error code, or seq */
};
#define MAX_OPS 64

static u64 seq;
static int in_record;
static struct rec_op ops[MAX_OPS];
static unsigned nops, ops_done;
/* Rendered line: written at CPL3 (all memory is U/S=1), sent at CPL0. */
static char line[2048];
static size_t llen;
static u8 cksum;
static int fast_enabled = 1;
int rec_fast_ready;           /* set by cpu_init() once GDT/TSS/IDT are live */
extern volatile int exc_depth;
void rec_render_cpl3(void);   /* ring.S */

static const char hexdig[] = "0123456789abcdef";

void rec_set_fast(int on) { fast_enabled = on; }

/* ---- renderer (runs at CPL3 or in place; no I/O, no privileged insn) ---- */
static void put_mem(const char *s, size_t n)
{
    char *o = line + llen;
    u8 ck = cksum;
    for (size_t i = 0; i < n; i++) {
        o[i] = s[i];
        ck += (u8)s[i];
    }
    llen += n;
    cksum = ck;
}

static void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_mem(buf + i, (size_t)(20 - i));
}

static void put_hex(u64 v)
{
    char buf[18];
    int i = 18;
    do {
        buf[--i] = hexdig[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    put_mem(buf + i, (size_t)(18 - i));
}

/* Escape p[0..n) into at most `room` bytes; returns bytes of input consumed. */
static size_t put_escaped(const u8 *p, size_t n, size_t room)
{
    char *o = line + llen, *end = o + room;
    u8 ck = cksum;
    size_t i = 0;
    for (; i < n && o + 4 <= end; i++) {
        u8 c = p[i];
        if ((u8)(c - 0x21) > 0x5d || c == '\\' || c == '=') {
            o[0] = '\\';
            o[1] = 'x';
            o[2] = hexdig[c >> 4];
            o[3] = hexdig[c & 15];
            ck += (u8)('\\' + 'x' + o[2] + o[3]);
            o += 4;
        } else {
            *o++ = (char)c;
            ck += c;
        }
    }
    llen = (size_t)(o - line);
    cksum = ck;
    return i;
}

static const char *const exc_mn[32] = {
    [0] = "DE", [1] = "DB", [2] = "NMI", [3] = "BP", [4] = "OF", [5] = "BR",
    [6] = "UD", [7] = "NM", [8] = "DF", [10] = "TS", [11] = "NP", [12] = "SS",
    [13] = "GP", [14] = "PF", [16] = "MF", [17] = "AC", [18] = "MC", [19] = "XM",
    [20] = "VE", [21] = "CP",
};

int exc_has_error_code(u32 v)
{
    return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30;
}

static void put_exc(u32 vec, u64 err)
{
    if (!(vec & 0x80000000u)) {
        put_mem("ok", 2);
        return;
    }
    vec &= 0x7fffffffu;
    put_mem("#", 1);
    if (vec < 32 && exc_mn[vec]) {
        put_mem(exc_mn[vec], strlen(exc_mn[vec]));
    } else {
        put_mem("V", 1);
        put_dec(vec);
    }
    if (exc_has_error_code(vec)) {
        put_mem("(", 1);
        if (err == 0)
            put_mem("0", 1);
        else
            put_hex(err);
        put_mem(")", 1);
    }
}

/* Render queued ops while they surely fit. Returns 1 when all are done,
 * 0 when the line is full (the caller sends it and calls again). */
static int render_some(void)
{
    while (ops_done < nops) {
        const struct rec_op *op = &ops[ops_done];
        size_t klen = op->key ? strlen(op->key) : 0;
        size_t room = sizeof(line) - llen;
        if (room < klen + 48)
            return 0;
        switch (op->kind) {
        case OP_HEAD:
            put_mem("@@LAB ", 6);
            put_dec(op->v);
            put_mem(" ", 1);
            put_mem(op->key, klen);
            break;
        case OP_TAIL: {
            u8 ck = cksum;
            char t[8] = { ' ', 'c', 'k', '=', hexdig[ck >> 4], hexdig[ck & 15], '\r', '\n' };
            put_mem(t, 8);
            break;
        }
        default:
            if (op->key) {   /* NULL: continuation of a long value */
                put_mem(" ", 1);
                put_mem(op->key, klen);
                put_mem("=", 1);
            }
            switch (op->kind) {
            case OP_STR:
            case OP_BYTES: {
                size_t n = op->kind == OP_STR ? strlen(op->p) : op->v;
                size_t done = put_escaped(op->p, n, sizeof(line) - llen);
                if (done < n) {   /* continue the value in the next line chunk */
                    struct rec_op *w = &ops[ops_done];
                    w->kind = OP_BYTES;
                    w->p = (const u8 *)op->p + done;
                    w->v = n - done;
                    w->key = NULL;   /* key already written */
                    return 0;
                }
                break;
            }
            case OP_U64: put_dec(op->v); break;
            case OP_HEX: put_hex(op->v); break;
            case OP_EXC: put_exc(op->vec, op->v); break;
            }
        }
        ops_done++;
    }
    return 1;
}

/* Entry at CPL3 from rec_render_cpl3 (ring.S). Must not fault or do I/O. */
void rec_render_ring3(void)
{
    render_some();
}

static void line_send(void)
{
    serial_write(line, llen);
    llen = 0;
}

static int fast_ok(void)
{
    return fast_enabled && rec_fast_ready && exc_depth == 0 && (read_cs() & 3) == 0;
}

static void render_and_send(void)
{
    if (fast_ok())
        rec_render_cpl3();
    while (!render_some())
        line_send();
    line_send();
}

static struct rec_op *push(u32 kind, const char *key)
{
    if (nops == MAX_OPS) {   /* very long record: render what we have so far */
        while (!render_some())
            line_send();
        nops = ops_done = 0;
    }
    struct rec_op *op = &ops[nops++];
    op->kind = kind;
    op->key = key;
    return op;
}

void rec_begin(const char *type)
{
    if (in_record)   /* an unfinished record: send it as it is (corrupt) */
        rec_abort();
    in_record = 1;
    nops = ops_done = 0;
    llen = 0;
    cksum = 0;
    push(OP_HEAD, type)->v = seq;
}

/* Send a half-built record as is, end the line; seq does not advance. */
void rec_abort(void)
{
    if (!in_record)
        return;
    while (!render_some())
        line_send();
    put_mem("\r\n", 2);
    line_send();
    nops = ops_done = 0;
    in_record = 0;
}

void rec_str(const char *key, const char *val)
{
    push(OP_STR, key)->p = val;
}

void rec_bytes(const char *key, const void *p, size_t n)
{
    struct rec_op *op = push(OP_BYTES, key);
    op->p = p;
    op->v = n;
}

void rec_u64(const char *key, u64 v)
{
    push(OP_U64, key)->v = v;
}

void rec_hex(const char *key, u64 v)
{
    push(OP_HEX, key)->v = v;
}

void rec_exc(const char *key, struct exc_result r)
{
    struct rec_op *op = push(OP_EXC, key);
    op->vec = r.faulted ? (r.vector | 0x80000000u) : 0;
    op->v = r.error_code;
}

void rec_end(void)
{
    push(OP_TAIL, NULL);
    render_and_send();
    nops = ops_done = 0;
    in_record = 0;
    seq++;
}

void rec_obs_begin(const char *scope, const char *probe)
{
    rec_begin("obs");
    rec_str("scope", scope);
    rec_str("probe", probe);
}

void rec_info_str(const char *key, const char *val)
{
    rec_begin("info");
    rec_str(key, val);
    rec_end();
}

void rec_info_hex(const char *key, u64 v)
{
    rec_begin("info");
    rec_hex(key, v);
    rec_end();
}

u64 rec_count(void)
{
    return seq;
}

int fault_linger;   /* set by fault=linger (faults.c) */

/* fault=linger: 2^30 TSC cycles (a fraction of a second) in which the lab's tests stop the
 * emulator at a known moment. */
static void linger(void)
{
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < (1ull << 30))
        __asm__ volatile("pause");
}

/* fault=linger: the hosts call it at each exit from their guest; it lingers at the first,
 * after an `info linger=guest` record that tells the tests the guest is under way. */
void fault_linger_guest(void)
{
    static int done;

    if (!fault_linger || done)
        return;
    done = 1;
    rec_info_str("linger", "guest");
    serial_flush();
    linger();
}

NORETURN void lab_exit(int code)
{
    if (in_record) {   /* fault=cut: the partial record goes out as it is */
        while (!render_some())
            line_send();
        line_send();
        in_record = 0;
    }
    serial_flush();
    /* Let the UART drain (LSR bit 6: THR and shift register empty): an emulator
     * that ends at the next write may otherwise lose the tail of COM1. */
    while (!(inb(0x3f8 + 5) & 0x40))
        __asm__ volatile("pause");
    /* fault=linger: stay a while after `end`, between the end record and the exit. */
    if (fault_linger)
        linger();
    /* isa-debug-exit: QEMU exits with (code<<1)|1. Bochs has no such device;
     * there 0x501 is its VGA BIOS panic port, which ends it for code != 0
     * ("VGABIOS panic at vgabios.c, line <code>", docs/bochs.md). */
    outb(0x501, (u8)code);
    /* Still here (Bochs, code 0): its shutdown port ends it. No device there on QEMU. */
    for (const char *s = "Shutdown"; *s; s++)
        outb(0x8900, (u8)*s);
    /* Neither device: stop here (IF=0). */
    for (;;)
        __asm__ volatile("cli; hlt");
}

NORETURN void lab_finish(int code)
{
    rec_abort();   /* a half-written record: close its line first */
    rec_begin("end");
    rec_u64("count", seq);
    rec_end();
    lab_exit(code);
}

NORETURN void panic(const char *msg)
{
    rec_abort();
    rec_begin("info");
    rec_str("panic", msg);
    rec_end();
    lab_exit(LAB_EXIT_PANIC);
}
