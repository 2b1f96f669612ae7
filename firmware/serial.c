/* serial.c - COM1 output (0x3f8), written directly.
 *
 * Each port write is a VM exit; under kvm_pvm one OUT costs ~25 us, so byte-
 * wise output dominated the boot time. Bytes are therefore buffered and sent
 * with `rep outsb` in chunks of 16 (KVM hands a whole string-I/O batch to
 * QEMU in one exit). With the 16550 FIFO enabled, LSR.THRE (bit 5) means
 * "FIFO empty": we read LSR once before each 16-byte chunk, so nothing is
 * dropped when the host side of the chardev is slow (QEMU discards the
 * oldest byte when its FIFO overflows). serial_flush() pushes the buffer;
 * rec_end() and lab_exit() call it. */
#include "lab.h"

#define COM1 0x3f8
#define CHUNK 16
static char txbuf[512];
static size_t txlen;

void serial_init(void)
{
    outb(COM1 + 1, 0x00);   /* IER: no interrupts */
    outb(COM1 + 3, 0x80);   /* DLAB */
    outb(COM1 + 0, 0x01);   /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);   /* 8N1 */
    outb(COM1 + 2, 0x07);   /* FIFO on, clear both */
    txlen = 0;
    /* Firmware (SeaBIOS on -M pc: "Booting from ROM..") may have left a
     * partial line: start record 0 at column 0. */
    serial_write("\r\n", 2);
}

static void tx_chunks(const char *p, size_t n)
{
    while (n) {
        size_t k = n < CHUNK ? n : CHUNK;
        /* 0xff (no UART at all) also passes. */
        while (!(inb(COM1 + 5) & 0x20))
            __asm__ volatile("pause");
        __asm__ volatile("rep outsb" : "+S"(p), "+c"(k) : "d"(COM1) : "memory");
        n -= n < CHUNK ? n : CHUNK;
    }
}

void serial_flush(void)
{
    if (txlen)
        tx_chunks(txbuf, txlen);
    txlen = 0;
}

void serial_putc(char c)
{
    if (txlen == sizeof(txbuf))
        serial_flush();
    txbuf[txlen++] = c;
}

void serial_write(const char *s, size_t n)
{
    serial_flush();
    tx_chunks(s, n);
}
