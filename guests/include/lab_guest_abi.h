/* lab_guest_abi.h - the contract between a guest kernel (guests/) and the host
 * that runs it (firmware/svm.c now; a software trap-and-emulate host later).
 * Plain #defines only: included by both sides, which have different libcs.
 *
 * Image: guest.bin is a flat binary whose first bytes are struct-less header
 * fields (offsets below, all little-endian u64 after the 8-byte magic). The host
 * copies the file to LOAD_ADDR (guest-physical == host-physical there), zeroes
 * up to LOAD_ADDR+MEM_SIZE, and starts the guest in 64-bit mode at ENTRY with
 * CR3 = GUEST_CR3 (the guest's own page tables, inside the image), CPL0, RSP =
 * STACK_TOP, interrupts off. The guest then loads its own GDT/IDT/TSS.
 *
 * Reporting channel ("hypercall"): `outl %eax, $LABHC_PORT` at guest CPL0 with
 * the function number in EAX and arguments in RDI, RSI, RDX, RCX, R8, R9.
 * Why an OUT and not VMMCALL: an OUT exits (IOIO intercept, APM Vol. 2 15.10)
 * under SVM and raises #GP at CPL > IOPL under a deprivileging host, so both
 * hosts see it; VMMCALL is only a hypercall under SVM (#UD elsewhere). The host
 * emits the records on the guest's behalf, with the guest's values. */
#ifndef LAB_GUEST_ABI_H
#define LAB_GUEST_ABI_H

#define LABG_MAGIC          "LABGST01"   /* 8 bytes at offset 0 */
#define LABG_OFF_LOAD_ADDR  8
#define LABG_OFF_ENTRY      16
#define LABG_OFF_CR3        24
#define LABG_OFF_STACK_TOP  32
#define LABG_OFF_IMAGE_SIZE 40
#define LABG_OFF_MEM_SIZE   48
#define LABG_HEADER_SIZE    56

/* The guest's fixed physical window: 2 MiB at 16 MiB, one large page. */
#define LABG_WINDOW_BASE    0x01000000
#define LABG_WINDOW_SIZE    0x00200000

#define LABHC_PORT          0xe0         /* imm8 form: RDX stays free for args */
#define LABHC_ABI_VERSION   1

/* Function numbers (EAX). CS values are raw selectors; the host derives CPL = cs&3. */
#define LABHC_HELLO         0x01  /* rdi=abi version, rsi=entry CS */
#define LABHC_CPL_ENTER     0x10  /* rdi=cpl, rsi=via, rdx=cs read there */
#define LABHC_CPL_RETURN    0x11  /* rdi=from_cpl, rsi=via, rdx=cs read back at CPL0,
                                     rcx=cs in the exception frame, r8=vector */
#define LABHC_CPUID_VENDOR  0x20  /* rdi=leaf, rsi=eax, rdx=ebx, rcx=ecx, r8=edx */
#define LABHC_CPUID_HV_BIT  0x21  /* rdi=CPUID.1:ECX */
#define LABHC_CPUID_HV_SIG  0x22  /* rsi=eax, rdx=ebx, rcx=ecx, r8=edx of 0x40000000 */
#define LABHC_RDTSC         0x30  /* rdi=tsd, rsi=cpl, rdx=outcome, rcx=error code,
                                     r8=fault rip, r9=frame cs */
#define LABHC_RDTSC_SEEN    0x31  /* rdi=cpl, rsi=value rdtsc returned at CPL0 */
#define LABHC_UMIP          0x32  /* rdi=instruction (LABHC_UMIP_*), rsi=CR4.UMIP, rdx=cpl,
                                     rcx=outcome, r8=error code, r9=rip */
#define LABHC_UMIP_SGDT 0
#define LABHC_UMIP_SIDT 1
#define LABHC_UMIP_SLDT 2
#define LABHC_UMIP_SMSW 3
#define LABHC_UMIP_STR  4
/* The Popek-Goldberg family (lab/catalogue.py `pg-*`): BEGIN names the guest's text that holds
 * the probed instructions and nothing else that traps; the host logs the RIP of each of its own
 * traps/exits there (an instruction's; none where it ran natively). A BATCH then reports one
 * pass: per instruction what the guest saw against its own tables, and the RIP of the probed
 * instruction (whose logged traps are its own); the log starts again. One report per pass,
 * not per instruction: under kvm_pvm every trap costs ~1 ms (firmware/README.md). BEGIN
 * answers in RAX the instructions the host was told to skip (`skip=pg-<insn>`). */
#define LABHC_PG_BEGIN      0x34  /* rdi, rsi = [start, end) of the probed text: RAX = skip mask */
#define LABHC_PG_BATCH      0x36  /* rdi = struct labhc_pg[], rsi = how many, rdx = CR4.UMIP */
/* struct labhc_pg, 6 quadwords: instruction (LABHC_PG_*), seen, expected by the guest's own
 * tables, outcome, error code, RIP of the probed instruction */
#define LABHC_PG_WORDS      6
#define LABHC_PG_LOG        64    /* trapped RIPs the host keeps per batch */
#define LABHC_PG_N          18    /* sgdt sidt sldt smsw str pushf popf lar lsl verr verw
                                     pop push call jmp int ret mov, in this order */
#define LABHC_PG_RET        16
#define LABHC_COST          0x40  /* rdi=op (LABHC_OP_*), rsi=iterations, rdx=cycles */
#define LABHC_PANIC         0x7e  /* rdi=vector, rsi=error code, rdx=rip, rcx=cs */
#define LABHC_DONE          0x7f  /* rdi=number of probes run: end the guest */

/* VMMCALL (SVM hosts only): RAX=LABHC_VMMCALL_PING, the host answers RAX=PONG. */
#define LABHC_VMMCALL_PING  0x4c414201ull
#define LABHC_VMMCALL_PONG  0x4c41424f4b21ull   /* "!KOBAL" read LE: "LABOK!" */

/* via codes */
#define LABHC_VIA_VMRUN     0
#define LABHC_VIA_IRETQ     1
#define LABHC_VIA_UD2       2
#define LABHC_VIA_FAULT     3   /* came back by another exception (r8 of CPL_RETURN = vector) */

/* outcome: 0 = the instruction completed; else OUTCOME_EXC | vector,
 * with OUTCOME_ERR if the vector pushed an error code (then in rcx). */
#define LABHC_OUTCOME_OK    0
#define LABHC_OUTCOME_EXC   0x100
#define LABHC_OUTCOME_ERR   0x200

#define LABHC_OP_CPUID      1

/* An intercepted RDTSC returns host TSC + this offset: no native TSC of a
 * freshly booted machine has 0x1ab0 in bits 63:48, and deltas stay exact. */
#define LAB_TSC_MARK        0x1ab0000000000000ull
#define LAB_TSC_MARK_MASK   0xffff000000000000ull

#endif
