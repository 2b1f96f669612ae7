/* vmx.h - Intel VMX definitions (Intel SDM Vol. 3C): capability MSRs (Appendix A),
 * VMCS field encodings (Appendix B), VM-execution/exit/entry control bits (24.6-24.8)
 * and basic exit reasons (Appendix C). Only what the lab's VMX host uses. */
#ifndef VMX_H
#define VMX_H

#include "lab.h"

/* MSRs: 23.7 (IA32_FEATURE_CONTROL), Appendix A (VMX capabilities) */
#define MSR_FEATURE_CONTROL      0x3a
#define FC_LOCK                  (1ull << 0)
#define FC_VMXON_OUTSIDE_SMX     (1ull << 2)
#define MSR_VMX_BASIC            0x480   /* A.1: [30:0] revision id, [55] TRUE controls */
#define MSR_VMX_PINBASED         0x481
#define MSR_VMX_PROCBASED        0x482
#define MSR_VMX_EXIT             0x483
#define MSR_VMX_ENTRY            0x484
#define MSR_VMX_CR0_FIXED0       0x486   /* A.7 */
#define MSR_VMX_CR0_FIXED1       0x487
#define MSR_VMX_CR4_FIXED0       0x488   /* A.8 */
#define MSR_VMX_CR4_FIXED1       0x489
#define MSR_VMX_PROCBASED2       0x48b   /* A.3.3 */
#define MSR_VMX_EPT_VPID_CAP     0x48c   /* A.10 */
#define MSR_VMX_TRUE_PINBASED    0x48d   /* A.3.1: with BASIC[55] */
#define MSR_VMX_TRUE_PROCBASED   0x48e
#define MSR_VMX_TRUE_EXIT        0x48f
#define MSR_VMX_TRUE_ENTRY       0x490
#define VMX_BASIC_TRUE_CTLS      (1ull << 55)
#define EPT_CAP_WALK4            (1ull << 6)
#define EPT_CAP_WB               (1ull << 14)
#define EPT_CAP_2M               (1ull << 16)
#define MSR_FS_BASE              0xc0000100
#define MSR_GS_BASE              0xc0000101
#define MSR_SYSENTER_CS          0x174
#define MSR_SYSENTER_ESP         0x175
#define MSR_SYSENTER_EIP         0x176

#define CR4_VMXE                 (1ull << 13)

/* Primary processor-based controls (24.6.2, table 24-6) */
#define CPU_HLT_EXITING          (1u << 7)
#define CPU_RDTSC_EXITING        (1u << 12)
#define CPU_UNCOND_IO_EXITING    (1u << 24)
#define CPU_SECONDARY            (1u << 31)
/* Secondary processor-based controls (24.6.2, table 24-7) */
#define CPU2_EPT                 (1u << 1)
#define CPU2_VPID                (1u << 5)
/* VM-exit controls (24.7.1): a 64-bit host */
#define EXIT_HOST_64             (1u << 9)
/* VM-entry controls (24.8.1): a 64-bit guest */
#define ENTRY_IA32E_GUEST        (1u << 9)

/* VM-entry interruption information (24.8.3): valid, type 3 = hardware exception */
#define INTR_VALID               (1u << 31)
#define INTR_TYPE_HW_EXCEPTION   (3u << 8)

/* I/O exit qualification (27.2.1, table 27-5) */
#define IOQ_SIZE_MASK            0x7u     /* size - 1 */
#define IOQ_IN                   (1u << 3)
#define IOQ_STRING               (1u << 4)

/* Basic exit reasons (Appendix C) */
#define EXIT_EXCEPTION           0
#define EXIT_TRIPLE_FAULT        2
#define EXIT_CPUID               10
#define EXIT_HLT                 12
#define EXIT_RDTSC               16
#define EXIT_VMCALL              18
#define EXIT_VMCLEAR             19
#define EXIT_VMLAUNCH            20
#define EXIT_VMPTRLD             21
#define EXIT_VMPTRST             22
#define EXIT_VMREAD              23
#define EXIT_VMRESUME            24
#define EXIT_VMWRITE             25
#define EXIT_VMXOFF              26
#define EXIT_VMXON               27
#define EXIT_IO                  30
#define EXIT_INVALID_GUEST_STATE 33
#define EXIT_MSR_LOADING         34
#define EXIT_MACHINE_CHECK       41
#define EXIT_EPT_VIOLATION       48
#define EXIT_EPT_MISCONFIG       49
#define EXIT_INVEPT              50
#define EXIT_INVVPID             53
#define EXIT_ENTRY_FAILURE       (1u << 31)   /* 27.2.1: bit 31 of the exit reason */

/* VMCS field encodings (Appendix B) */
enum vmcs_field {
    /* 16-bit guest / host state */
    GUEST_ES_SEL = 0x800, GUEST_CS_SEL = 0x802, GUEST_SS_SEL = 0x804, GUEST_DS_SEL = 0x806,
    GUEST_FS_SEL = 0x808, GUEST_GS_SEL = 0x80a, GUEST_LDTR_SEL = 0x80c, GUEST_TR_SEL = 0x80e,
    HOST_ES_SEL = 0xc00, HOST_CS_SEL = 0xc02, HOST_SS_SEL = 0xc04, HOST_DS_SEL = 0xc06,
    HOST_FS_SEL = 0xc08, HOST_GS_SEL = 0xc0a, HOST_TR_SEL = 0xc0c,
    VPID = 0x0000,    /* 16-bit control (24.6.12) */
    /* 64-bit */
    EPT_POINTER = 0x201a, GUEST_PHYS_ADDR = 0x2400,
    VMCS_LINK_POINTER = 0x2800, GUEST_DEBUGCTL = 0x2802,
    /* 32-bit control */
    PIN_CONTROLS = 0x4000, CPU_CONTROLS = 0x4002, EXCEPTION_BITMAP = 0x4004,
    EXIT_CONTROLS = 0x400c, ENTRY_CONTROLS = 0x4012, ENTRY_INTR_INFO = 0x4016,
    CPU_CONTROLS2 = 0x401e,
    /* 32-bit read-only */
    VM_INSTRUCTION_ERROR = 0x4400, EXIT_REASON = 0x4402, EXIT_INTR_INFO = 0x4404,
    EXIT_INSN_LEN = 0x440c,
    /* 32-bit guest */
    GUEST_ES_LIMIT = 0x4800, GUEST_CS_LIMIT = 0x4802, GUEST_SS_LIMIT = 0x4804, GUEST_DS_LIMIT = 0x4806,
    GUEST_FS_LIMIT = 0x4808, GUEST_GS_LIMIT = 0x480a, GUEST_LDTR_LIMIT = 0x480c, GUEST_TR_LIMIT = 0x480e,
    GUEST_GDTR_LIMIT = 0x4810, GUEST_IDTR_LIMIT = 0x4812,
    GUEST_ES_AR = 0x4814, GUEST_CS_AR = 0x4816, GUEST_SS_AR = 0x4818, GUEST_DS_AR = 0x481a,
    GUEST_FS_AR = 0x481c, GUEST_GS_AR = 0x481e, GUEST_LDTR_AR = 0x4820, GUEST_TR_AR = 0x4822,
    GUEST_INTERRUPTIBILITY = 0x4824, GUEST_ACTIVITY = 0x4826, GUEST_SYSENTER_CS = 0x482a,
    HOST_SYSENTER_CS = 0x4c00,
    /* natural width */
    CR0_MASK = 0x6000, CR4_MASK = 0x6002, CR0_SHADOW = 0x6004, CR4_SHADOW = 0x6006,
    EXIT_QUALIFICATION = 0x6400,
    GUEST_CR0 = 0x6800, GUEST_CR3 = 0x6802, GUEST_CR4 = 0x6804,
    GUEST_ES_BASE = 0x6806, GUEST_CS_BASE = 0x6808, GUEST_SS_BASE = 0x680a, GUEST_DS_BASE = 0x680c,
    GUEST_FS_BASE = 0x680e, GUEST_GS_BASE = 0x6810, GUEST_LDTR_BASE = 0x6812, GUEST_TR_BASE = 0x6814,
    GUEST_GDTR_BASE = 0x6816, GUEST_IDTR_BASE = 0x6818, GUEST_DR7 = 0x681a, GUEST_RSP = 0x681c,
    GUEST_RIP = 0x681e, GUEST_RFLAGS = 0x6820, GUEST_PENDING_DBG = 0x6822,
    GUEST_SYSENTER_ESP = 0x6824, GUEST_SYSENTER_EIP = 0x6826,
    HOST_CR0 = 0x6c00, HOST_CR3 = 0x6c02, HOST_CR4 = 0x6c04, HOST_FS_BASE = 0x6c06,
    HOST_GS_BASE = 0x6c08, HOST_TR_BASE = 0x6c0a, HOST_GDTR_BASE = 0x6c0c, HOST_IDTR_BASE = 0x6c0e,
    HOST_SYSENTER_ESP = 0x6c10, HOST_SYSENTER_EIP = 0x6c12, HOST_RSP = 0x6c14, HOST_RIP = 0x6c16,
};

/* VMX instructions report failure in RFLAGS (30.2): CF=1 VMfailInvalid, ZF=1
 * VMfailValid (error number in VM_INSTRUCTION_ERROR). Each returns 0 on success. */
static inline int vmx_on(u64 pa)
{
    u8 bad;
    __asm__ volatile("vmxon %1; setna %0" : "=q"(bad) : "m"(pa) : "cc", "memory");
    return bad;
}
static inline int vmx_clear(u64 pa)
{
    u8 bad;
    __asm__ volatile("vmclear %1; setna %0" : "=q"(bad) : "m"(pa) : "cc", "memory");
    return bad;
}
static inline int vmx_ptrld(u64 pa)
{
    u8 bad;
    __asm__ volatile("vmptrld %1; setna %0" : "=q"(bad) : "m"(pa) : "cc", "memory");
    return bad;
}
static inline void vmx_off(void) { __asm__ volatile("vmxoff" ::: "cc", "memory"); }
static inline int vmwrite(u64 field, u64 value)
{
    u8 bad;
    __asm__ volatile("vmwrite %2, %1; setna %0" : "=q"(bad) : "r"(field), "rm"(value) : "cc", "memory");
    return bad;
}
static inline u64 vmread(u64 field)
{
    u64 v = 0;
    __asm__ volatile("vmread %1, %0" : "=r"(v) : "r"(field) : "cc");
    return v;
}

struct hv_gregs;
/* vmx_run.S: VMLAUNCH (launched=0) or VMRESUME with the guest GPRs from *g; on VM
 * exit the GPRs go back to *g. Returns 0 after a VM exit, 1 for VMfailInvalid, 2 for
 * VMfailValid (the entry did not happen). */
int vmx_run(struct hv_gregs *g, int launched);
extern char vmx_exit_entry[];   /* HOST_RIP */

struct hv_config;
/* vmx.c: the VMX host. 0: it ran (or said why not); -1: no usable VMX, *why says why. */
int vmx_main(const struct bootinfo *bi, struct hv_config *cfg, const char **why);

#endif
