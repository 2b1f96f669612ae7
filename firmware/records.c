/* records.c - the serial record protocol (docs/records.md). */
#include "lab.h"

static u64 seq;
static u8 cksum;
static int in_record;

static void put(char c)
{
    cksum += (u8)c;
    serial_putc(c);
}

static void puts_raw(const char *s)
{
    while (*s)
        put(*s++);
}

static const char hexdig[] = "0123456789abcdef";

static void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_raw(buf + i);
}

static void put_hex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = hexdig[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts_raw(buf + i);
}

static void put_escaped(const u8 *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        u8 c = p[i];
        if (c < 0x21 || c > 0x7e || c == '\\' || c == '=') {
            put('\\');
            put('x');
            put(hexdig[c >> 4]);
            put(hexdig[c & 15]);
        } else {
            put((char)c);
        }
    }
}

static void put_key(const char *key)
{
    put(' ');
    puts_raw(key);
    put('=');
}

void rec_begin(const char *type)
{
    cksum = 0;
    in_record = 1;
    puts_raw("@@LAB ");
    put_dec(seq);
    put(' ');
    puts_raw(type);
}

void rec_str(const char *key, const char *val)
{
    put_key(key);
    put_escaped((const u8 *)val, strlen(val));
}

void rec_bytes(const char *key, const void *p, size_t n)
{
    put_key(key);
    put_escaped(p, n);
}

void rec_u64(const char *key, u64 v)
{
    put_key(key);
    put_dec(v);
}

void rec_hex(const char *key, u64 v)
{
    put_key(key);
    put_hex(v);
}

int exc_has_error_code(u32 v)
{
    return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30;
}

static const char *const exc_mn[32] = {
    [0] = "DE", [1] = "DB", [2] = "NMI", [3] = "BP", [4] = "OF", [5] = "BR",
    [6] = "UD", [7] = "NM", [8] = "DF", [10] = "TS", [11] = "NP", [12] = "SS",
    [13] = "GP", [14] = "PF", [16] = "MF", [17] = "AC", [18] = "MC", [19] = "XM",
    [20] = "VE", [21] = "CP",
};

void rec_exc(const char *key, struct exc_result r)
{
    put_key(key);
    if (!r.faulted) {
        puts_raw("ok");
        return;
    }
    put('#');
    if (r.vector < 32 && exc_mn[r.vector]) {
        puts_raw(exc_mn[r.vector]);
    } else {
        put('V');
        put_dec(r.vector);
    }
    if (exc_has_error_code(r.vector)) {
        put('(');
        if (r.error_code == 0)
            put('0');
        else
            put_hex(r.error_code);
        put(')');
    }
}

void rec_end(void)
{
    u8 ck = cksum;
    serial_putc(' ');
    serial_putc('c');
    serial_putc('k');
    serial_putc('=');
    serial_putc(hexdig[ck >> 4]);
    serial_putc(hexdig[ck & 15]);
    serial_putc('\r');
    serial_putc('\n');
    in_record = 0;
    seq++;
    serial_flush();
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

NORETURN void lab_exit(int code)
{
    serial_flush();
    outb(0x501, (u8)code);   /* isa-debug-exit: QEMU exits with (code<<1)|1 */
    /* No isa-debug-exit device: stop here (IF=0). */
    for (;;)
        __asm__ volatile("cli; hlt");
}

NORETURN void lab_finish(int code)
{
    if (in_record) {
        /* Close a half-written record so the end record starts a line. */
        serial_write("\r\n", 2);
        in_record = 0;
    }
    rec_begin("end");
    rec_u64("count", seq);
    rec_end();
    lab_exit(code);
}

NORETURN void panic(const char *msg)
{
    if (in_record) {
        serial_write("\r\n", 2);
        in_record = 0;
    }
    rec_begin("info");
    rec_str("panic", msg);
    rec_end();
    lab_exit(LAB_EXIT_PANIC);
}
