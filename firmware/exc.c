/* exc.c - the common exception dispatcher (GDB witness: exc_dispatch).
 * Order: per-vector hook -> the end of a probe stub (probe.c) -> ring
 * return (#UD at ring_return_ud2) -> guarded
 * instruction (.extable) -> fault inside run_at_cpl/try_call code ->
 * unexpected: record + isa-debug-exit (never hang). */
#include "probe.h"

struct extable_entry { u64 from, to; };
extern const struct extable_entry __extable_start[], __extable_end[];
extern char ring_return_ud2[];
NORETURN void ring_resume(u64 via, u64 return_cs);
void try_call_resume(void);   /* in ring.c */

static exc_hook_fn hooks[256];
struct try_state_s try_state;
/* Exception that ended ring code (or try_call code) early. */
struct exc_result ring_fault;
volatile int try_call_active;
volatile int exc_depth;   /* >0 while exc_dispatch runs (records render in place) */

void exc_set_hook(int vector, exc_hook_fn fn)
{
    if (vector >= 0 && vector < 256)
        hooks[vector] = fn;
}

void try_reset(void)
{
    try_state.faulted = 0;
    try_state.vector = 0;
    try_state.error_code = 0;
    try_state.rip = 0;
    try_state.cs = 0;
}

struct exc_result try_result(void)
{
    struct exc_result r = { try_state.faulted, try_state.vector, try_state.error_code,
                            try_state.rip, try_state.cs };
    return r;
}

static struct exc_result frame_result(const struct exc_frame *f)
{
    struct exc_result r = { 1, (u32)f->vector, f->error_code, f->rip, f->cs };
    return r;
}

/* Unexpected exception: say so on the console, then exit nonzero. */
static NORETURN void unexpected(struct exc_frame *f)
{
    probe_flush_records();   /* the rows before it first, in order */
    rec_begin("info");
    rec_exc("unexpected_exception", frame_result(f));
    rec_u64("vector", f->vector);
    rec_hex("err", f->error_code);
    rec_hex("rip", f->rip);
    rec_hex("cs", f->cs);
    rec_hex("rflags", f->rflags);
    rec_hex("rsp", f->rsp);
    if (f->vector == 14)
        rec_hex("cr2", read_cr2());
    rec_str("probe_name", probe_running ? probe_running : "none");
    rec_end();
    /* No end record: the run did not complete (docs/records.md). */
    lab_exit(LAB_EXIT_UNEXPECTED);
}

void exc_dispatch(struct exc_frame *f)
{
    u64 v = f->vector;

    exc_depth++;
    if (exc_depth > 4) {   /* faults while handling faults: get out, loudly */
        serial_write("\r\n@@NESTED-EXCEPTIONS\r\n", 23);
        lab_exit(LAB_EXIT_PANIC);
    }
    if (v < 256 && hooks[v] && hooks[v](f)) {
        exc_depth--;
        return;
    }

    if (v == 0x80) {  /* fault=kvm-internal: int $0x80 at CPL0 */
        rec_info_str("int80", "reached");
        exc_depth--;
        return;
    }

    switch (probe_trap(f)) {
    case PROBE_TRAP_CHECKPOINT:   /* resume the stub after its checkpoint */
        exc_depth--;
        return;
    case PROBE_TRAP_END:          /* the stub is over: back to the kernel context */
        exc_depth--;
        ring_resume(RING_VIA_UD, read_cs());
    }

    if (v == 6 && ring_state.active && f->rip == (u64)ring_return_ud2) {
        exc_depth--;
        ring_resume(RING_VIA_UD, read_cs());
    }

    for (const struct extable_entry *e = __extable_start; e < __extable_end; e++) {
        if (e->from == f->rip) {
            try_state.faulted = 1;
            try_state.vector = (u32)v;
            try_state.error_code = f->error_code;
            try_state.rip = f->rip;
            try_state.cs = f->cs;
            f->rip = e->to;   /* resume after the guarded snippet, same CPL */
            exc_depth--;
            return;
        }
    }

    if (ring_state.active && (f->cs & 3)) {
        /* Unguarded fault in ring code run by run_at_cpl: hand it back. */
        ring_fault = frame_result(f);
        exc_depth--;
        ring_resume(RING_VIA_FAULT, read_cs());
    }

    if (try_call_active && !(f->cs & 3)) {
        ring_fault = frame_result(f);
        exc_depth--;
        try_call_resume();
    }

    unexpected(f);
}
