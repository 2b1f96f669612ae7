/* realmode.S - placeholder; filled in below if time permits. */
    .section .boot32, "ax"
    .code32
    .globl realmode_probe32
realmode_probe32:
    ret
    .text
    .code64
