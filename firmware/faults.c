/* faults.c - fault injection for the lab's robustness tests (cmdline fault=). */
#include "lab.h"

void idt_load(void);

static void emit_fault(const char *kind)
{
    rec_info_str("fault", kind);
}

void fault_inject(const char *kind)
{
    if (!strcmp(kind, "hang")) {
        emit_fault(kind);
        serial_flush();
        for (;;)
            __asm__ volatile("cli; hlt");
    } else if (!strcmp(kind, "triple")) {
        emit_fault(kind);
        /* Empty IDT: #UD cannot be delivered -> #DF -> shutdown (SDM Vol. 3A 6.15, #DF). */
        struct { u16 limit; u64 base; } PACKED p = { 0, 0 };
 serial_flush();
        __asm__ volatile("lidt %0; ud2" :: "m"(p));
        for (;;)
            __asm__ volatile("cli; hlt");
    } else if (!strcmp(kind, "garbage")) {
        emit_fault(kind);
        for (int i = 0; i < 256; i++)
            serial_putc((char)i);
        static const char ansi[] = "\x1b[31mred\x1b[0m\x1b[2J\x1b[H\x1b[?25l\x1b]0;title\x07\x1b[?25h";
        serial_write(ansi, sizeof(ansi) - 1);
        serial_write("\r\n", 2);
        serial_flush();
    } else if (!strcmp(kind, "longline")) {
        emit_fault(kind);
        static char pat[1024];
        for (int i = 0; i < 1024; i++)
            pat[i] = "0123456789abcdef"[i & 15];
        for (int i = 0; i < 100; i++)
            serial_write(pat, sizeof(pat));
        serial_write("\r\n", 2);
        serial_flush();
    } else if (!strcmp(kind, "cut")) {
        emit_fault(kind);
        rec_obs_begin("host", "cut");
        rec_str("cpl", "0");
        lab_exit(0);   /* mid-record, no end record */
    } else if (!strcmp(kind, "exception")) {
        emit_fault(kind);
        probe_running = "fault-exception";
        /* Not mapped (only 0..4 GiB is): #PF, not armed -> unexpected. */
        (void)*(volatile u64 *)0x7fff00000000ull;
    } else if (!strcmp(kind, "table-exception")) {
        emit_fault(kind);   /* probes_run_table raises it after its tenth row (probe.c) */
    } else if (!strcmp(kind, "linger")) {
        emit_fault(kind);
        fault_linger = 1;   /* lab_exit waits after `end` (records.c) */
    } else if (!strcmp(kind, "kvm-internal")) {
        emit_fault(kind);
        /* kvm_pvm: emulation failure (QEMU stops); TCG: reaches IDT 0x80. */
        __asm__ volatile("int $0x80" ::: "memory");
    } else {
        rec_info_str("fault_unknown", kind);
    }
}
