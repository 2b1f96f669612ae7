"""The probe catalogue: the one place a probe is declared.

An entry names the probe (the record's `probe=`), its family, the instruction it executes
(the firmware stub, one ELF label per probed instruction), its dimensions (CPL, the CR4 bit
that gates it, fixed words such as `insn=hlt`), the CPUID feature it needs, the rule that
gives the expected outcome (a function in `lab/expectations.py`, by name), the manual
reference, and how the GDB witness reads it. Everything else derives from here:

- the firmware's probe table and stubs (`firmware_sources()`, generated into
  `firmware/build/probes.gen.{h,S}` by `make`; the firmware keeps only the mechanics of
  running one stub at one CPL under one gate),
- the expectation plan (`lab.expectations.plan()` expands `rows()` and applies the rules),
- the GDB witness plan and its reading of CPU stops (`lab.witness`),
- the probe table in the docs (`markdown_table()`; a test keeps README.md in step).

Adding a probe: docs/probes.md "Adding a probe".
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .ids import check_id

# How a stub is entered and how its observation is formed (the firmware's mechanics).
#   outcome: run the stub at `cpl` under the gate; obs = `ok` (the `ud2` right after the
#            instruction trapped) or the exception the instruction raised.
#   enter:   the stub is the first instruction in the ring; obs = CPL from the CS the CPU
#            pushed for the return trap there.
#   return:  the stub leaves the ring; obs = CPL of the code the CPU returned to.
#   cpuid:   obs = bytes or a bit of the registers CPUID returned (CPL0 only).
#   cpl-of:  obs = the CPL of the code the stub is in (from the CS of its trap).
#   count:   obs = a count the host keeps (exits, traps) or its verdict: no stub, no witness.
#   smm:     obs = what the kernel, or the lab's own SMI handler, saw of an SMI (firmware/smm.c).
KINDS = ("outcome", "enter", "return", "cpuid", "cpl-of", "count", "smm")
# The no-op each stub starts with (probe_pre_<name>), 66 90 in 32- and 64-bit code alike.
PRE_NOP = "xchg %ax, %ax"
# How the ring is entered: IRETQ (SDM Vol. 3A 6.14.3) or SYSRETQ (SDM Vol. 2B SYSRET).
ENTRIES = ("iretq", "sysret")


@dataclass(frozen=True)
class Gate:
    """A control the firmware sets around the probe, and GDB reads back at the stop:
    cr4   a CR4 bit (GDB: CR4 at the stop)
    msr   a bit of MSR `msr` (QEMU's gdbstub shows no MSR: GDB has the CPU run the firmware's
          `witness_rdmsr` at the stop, lab/gdb/collector.py)
    iopl  RFLAGS.IOPL of the ring the stub runs in (GDB: the RFLAGS the CPU pushed)
    iomap the TSS I/O bitmap bit of port `bit`, 1 = allowed (GDB: the bitmap at `tss_iomap`)"""

    reg: str
    bit: int
    name: str  # its name in the manuals, e.g. "TSD"
    param: str  # the record param that says its value, e.g. "tsd"
    needs: str = ""  # the CPUID feature without which it is reserved ("accel:x": Facts.x)
    msr: int = 0


@dataclass(frozen=True)
class Stub:
    """Instruction(s) the firmware executes at the label `probe_insn_<name>`; the label
    `probe_done_<name>` follows them and holds a `ud2` (the return trap: a #UD there with
    the CPU's CS is positive evidence that the instruction completed at that CPL)."""

    name: str  # C identifier
    asm: str  # GNU as, AT&T syntax; "" for a stub that is only its return trap
    rax: str = ""  # what RAX holds on entry: "" (nothing), "cr4" (the current CR4), or a number
    rcx: str = ""  # what RCX holds on entry: "" or a number (e.g. a CPUID subleaf)
    continue_at: bool = False  # a #UD at probe_insn_<name> is a checkpoint: resume after it
    image: str = "host"  # "guest": the stub is in the guest kernel (guests/), not generated
    asm32: str = ""  # the 32-bit host kernel's text when `asm` names 64-bit registers (else `asm`)


@dataclass(frozen=True)
class Probe:
    probe: str  # the record's probe name
    family: str  # groups probes in tables; also a `skip=` word for the firmware
    kind: str  # one of KINDS
    stub: Stub | None  # None: not run from the table (e.g. the real-mode probe, guest probes)
    dims: tuple[tuple[str, tuple], ...]  # ordered record params and their values
    rule: str  # rule function in lab.expectations (RULES)
    ref: str  # Intel SDM / AMD APM section
    summary: str  # one line for the docs
    gate: Gate | None = None
    gate2: Gate | None = None  # a second control (the I/O bitmap next to IOPL)
    uses: tuple[str, ...] = ()  # CPUID features (QOM names) the rule reads, e.g. "pmu"
    opt_in: bool = False  # the firmware runs it only when told (`run=<family>`): it may write a
    #                       bit the model reserves, which some accelerators hang on
    needs: str = ""  # CPUID feature the instruction needs (a Facts field), e.g. "rdtscp"
    entry: str = "iretq"  # how the ring is entered (ENTRIES)
    scopes: tuple[str, ...] = ("host",)
    cpuid: tuple[int, int, str] | None = None  # (leaf, subleaf, "bytes:bdc" | "bit:c31")
    long_mode_only: bool = False  # 64-bit mode only (SYSCALL/SYSRETQ): the 32-bit host neither has nor runs it
    witness: str = "trap"  # how GDB reads it: "trap" (an IDT stub's stop) | "entry" (a stop at the
    #                        stub's label) | "none: why" (everywhere) | per scope: {scope: ...}

    def instances(self) -> list[dict[str, str]]:
        keys = [k for k, _ in self.dims]
        return [dict(zip(keys, (str(v) for v in combo), strict=True))
                for combo in itertools.product(*(vals for _, vals in self.dims))]


    @property
    def gates(self) -> tuple[Gate, ...]:
        return tuple(g for g in (self.gate, self.gate2) if g is not None)

    @property
    def runs_only_when_told(self) -> bool:
        """Opt-in. A gate bit reserved without a CPUID feature needs no word: the firmware
        gates it on its own CPUID read (firmware/probe.c skipped())."""
        return self.opt_in

    def witness_in(self, scope: str) -> str:
        return self.witness.get(scope, "trap") if isinstance(self.witness, dict) else self.witness


@dataclass(frozen=True)
class Row:
    """One check: an entry at one point of its dimensions, in one scope."""

    entry: Probe
    params: dict[str, str] = field(hash=False)
    scope: str = "host"

    @property
    def id(self) -> str:
        return check_id(self.scope, self.entry.probe, self.params)

    @property
    def probe(self) -> str:
        return self.entry.probe

    @property
    def cpl(self) -> int:
        return int(self.params.get("cpl", self.params.get("from_cpl", 0)))

    @property
    def gate_value(self) -> int | None:
        g = self.entry.gate
        return int(self.params[g.param]) if g else None


CR4_TSD = Gate("cr4", 2, "TSD", "tsd")
GUEST_SCOPES = ("guest-svm", "guest-vmx", "guest-soft")  # the hosts that run the guest kernel
RINGS = (1, 2, 3)
CPLS = (0, 1, 2, 3)

REF_CPL = "SDM Vol. 3A 5.5 (CPL is CS[1:0]); APM Vol. 2 4.9.1"
REF_IRET = "SDM Vol. 2A IRET (return to an outer privilege level); APM Vol. 2 8.7.3"
REF_SYSRET = "SDM Vol. 2B SYSRET (CS = IA32_STAR[63:48]+16, CPL 3); APM Vol. 2 6.1.1"
REF_SYSCALL = "SDM Vol. 2B SYSCALL (CS = IA32_STAR[47:32], CPL 0); APM Vol. 2 6.1.1"
REF_EXC_RETURN = "SDM Vol. 3A 6.12.1: an exception from CPL>0 runs its DPL0 handler on the TSS RSP0 stack"
REF_PRIV = "SDM Vol. 3A 5.9: privileged instructions (HLT, MOV to CRn) #GP(0) at CPL>0"
REF_CLI = "SDM Vol. 2A CLI: #GP(0) if CPL > IOPL (IOPL=0, CR4.VME=PVI=0)"
REF_RDTSC = "SDM Vol. 2B RDTSC: #GP(0) if CR4.TSD=1 and CPL>0 (and CR0.PE=1); APM Vol. 3 RDTSC"
REF_RDTSCP = "SDM Vol. 2B RDTSCP: #UD if CPUID.80000001H:EDX[27]=0; else #GP(0) iff CR4.TSD=1 and CPL>0"
REF_VENDOR = "SDM Vol. 2A CPUID leaf 0: EBX,EDX,ECX = vendor; the CPU model's own (QOM `vendor`)"
REF_HV_BIT = "APM Vol. 3 E.3.2: CPUID Fn0000_0001_ECX[31] is reserved for hypervisor use; QOM `hypervisor`"
REF_HV_SIG = "APM Vol. 3 App. E: CPUID 0x40000000-0x400000FF is the hypervisor range; SDM Vol. 2A CPUID (out-of-range leaves)"

CATALOGUE: tuple[Probe, ...] = (
    Probe("cpl-enter", "ring", "enter", Stub("enter_iretq", ""), (("cpl", RINGS), ("via", ("iretq",))),
          "ring_entered", f"{REF_CPL}; {REF_IRET}", "IRETQ to ring n: the first instruction there runs at CPL n"),
    Probe("cpl-enter", "syscall", "enter", Stub("enter_sysret", ""), (("cpl", (3,)), ("via", ("sysret",))),
          "ring_entered", f"{REF_CPL}; {REF_SYSRET}", "SYSRETQ enters CPL3", entry="sysret",
          long_mode_only=True),
    Probe("cpl-return", "ring", "return", Stub("return_ud2", ""), (("from_cpl", RINGS), ("via", ("ud2",))),
          "ring_returned", REF_EXC_RETURN, "an exception (#UD) from ring n runs its handler at CPL0"),
    Probe("cpl-return", "syscall", "return", Stub("return_syscall", "ud2\n    syscall", continue_at=True),
          (("from_cpl", RINGS), ("via", ("syscall",))),
          "ring_returned", REF_SYSCALL, "SYSCALL from ring n reaches the LSTAR entry at CPL0", long_mode_only=True),
    Probe("priv-insn", "priv", "outcome", Stub("hlt", "hlt"), (("insn", ("hlt",)), ("cpl", RINGS)),
          "privileged", REF_PRIV, "HLT needs CPL0"),
    Probe("priv-insn", "priv", "outcome", Stub("mov_cr4", "mov %rax, %cr4", rax="cr4"),
          (("insn", ("mov-cr4",)), ("cpl", RINGS)),
          "privileged", REF_PRIV, "MOV to CR4 (its current value) needs CPL0"),
    Probe("rdtsc", "tsc", "outcome", Stub("rdtsc", "rdtsc"), (("tsd", (0, 1)), ("cpl", CPLS)),
          "cpl_gate", REF_RDTSC, "RDTSC under CR4.TSD", gate=CR4_TSD, needs="tsc"),
    Probe("rdtsc", "tsc", "outcome", None, (("tsd", (1,)), ("cpl", (0,)), ("mode", ("real",))),
          "cpl_gate", f"{REF_RDTSC}; SDM Vol. 3A 20.1 (real-address mode)",
          "RDTSC with CR4.TSD=1 in real mode (CR0.PE=0): no fault", gate=CR4_TSD, needs="tsc",
          witness="realmode"),  # firmware/realmode.S: GDB stops at its copy below 1 MiB, steps the RDTSC
    Probe("rdtscp", "tsc", "outcome", Stub("rdtscp", "rdtscp"), (("tsd", (0, 1)), ("cpl", CPLS)),
          "cpl_gate", REF_RDTSCP, "RDTSCP under CR4.TSD; #UD without the CPUID bit", gate=CR4_TSD,
          needs="rdtscp"),
    Probe("cpuid-vendor", "cpuid", "cpuid", Stub("cpuid_vendor", "cpuid", rax="0", rcx="0"), (("leaf", (0,)),),
          "vendor", REF_VENDOR, "CPUID leaf 0: the vendor string", cpuid=(0, 0, "bytes:bdc")),
    Probe("cpuid-hv-bit", "cpuid", "cpuid", Stub("cpuid_hv_bit", "cpuid", rax="1", rcx="0"), (),
          "hv_bit", REF_HV_BIT, "CPUID.1:ECX[31], the hypervisor bit", cpuid=(1, 0, "bit:c31")),
    Probe("cpuid-hv-signature", "cpuid", "cpuid",
          Stub("cpuid_hv_signature", "cpuid", rax="0x40000000", rcx="0"), (),
          "hv_signature", REF_HV_SIG, "CPUID 0x40000000: the hypervisor's signature",
          cpuid=(0x40000000, 0, "bytes:bcd")),
)

# -- the privilege atlas: user instructions a control forbids outside CPL0 (or CPL <= IOPL) --
CR4_UMIP = Gate("cr4", 11, "UMIP", "umip", needs="umip")  # reserved without UMIP
CR4_PCE = Gate("cr4", 8, "PCE", "pce")
IOPL = Gate("iopl", 12, "IOPL", "iopl")
IO_PORT = 0x80  # an unused port (POST codes): reading or writing it changes nothing
IOMAP = Gate("iomap", IO_PORT, "I/O bitmap", "allow")
CPUID_FAULTING = Gate("msr", 0, "CPUID_FAULTING", "faulting", needs="accel:cpuid-faulting", msr=0x140)
REF_UMIP = ("SDM Vol. 3A 2.5: CR4.UMIP=1 makes SGDT, SIDT, SLDT, SMSW and STR #GP(0) at CPL>0; "
            "SDM Vol. 2B/2A each instruction")
REF_RESERVED = "SDM Vol. 3A 2.5 and Vol. 2A MOV to CR4: setting a reserved CR4 bit is #GP(0)"
REF_RDPMC = ("SDM Vol. 2B RDPMC: #GP(0) if CPL>0 and CR4.PCE=0, or if ECX names no counter "
             "(no PMU: no counter); APM Vol. 3 RDPMC")
REF_IOPL = ("SDM Vol. 1 18.5.1, Vol. 2A CLI/STI: #GP(0) if CPL > IOPL (CR4.VME=PVI=0); IRETQ from CPL0 "
            "loads RFLAGS.IOPL")
REF_IO = ("SDM Vol. 1 18.5.1-18.5.2, Vol. 3A 6.15 (#GP): IN/OUT at CPL > IOPL need the port's bit clear in "
          "the TSS I/O permission bitmap, else #GP(0)")
REF_CPUID_FAULT = ("Intel SDM Vol. 4 2.17: MSR_PLATFORM_INFO 0xCE[31] offers CPUID faulting, "
                   "MSR_MISC_FEATURES_ENABLES 0x140[0] enables it: CPUID at CPL>0 is then #GP(0)")

CATALOGUE += tuple(
    Probe(name, "umip", "outcome", Stub(name, asm), (("umip", (0, 1)), ("cpl", CPLS)), "cpl_gate", REF_UMIP,
          f"{name.upper()} under CR4.UMIP", gate=CR4_UMIP)
    for name, asm in (("sgdt", "sgdt -16(%rsp)"), ("sidt", "sidt -16(%rsp)"), ("sldt", "sldt %ax"),
                      ("smsw", "smsw %ax"), ("str", "str %ax"))
) + tuple(
    # The guest kernel's own (guests/guest/entry.S): at its CPL3, under its own CR4.UMIP. The
    # software host passes the guest's UMIP through to the real CR4 (it binds CPL>0 only).
    Probe(name, "umip", "outcome", Stub(f"guest_{name}", asm, image="guest"), (("umip", (1, 0)), ("cpl", (3,))),
          "cpl_gate", REF_UMIP, f"{name.upper()} at the guest's CPL3 under its own CR4.UMIP", gate=CR4_UMIP,
          scopes=GUEST_SCOPES)
    for name, asm in (("sgdt", "sgdt -16(%rsp)"), ("sidt", "sidt -16(%rsp)"), ("sldt", "sldt %ax"),
                      ("smsw", "smsw %ax"), ("str", "str %ax"))
) + (
    Probe("cr4-reserved", "cr4-reserved", "outcome", Stub("mov_cr4_umip", "mov %rax, %cr4", rax="cr4|0x800"),
          (("bit", ("umip",)), ("cpl", (0,))), "cr4_reserved", REF_RESERVED,
          "setting CR4.UMIP: allowed with UMIP, a reserved bit without", opt_in=True),
    Probe("rdpmc", "pmc", "outcome", Stub("rdpmc", "rdpmc", rcx="0"),
          (("counter", (0,)), ("pce", (0, 1)), ("cpl", CPLS)), "rdpmc", REF_RDPMC,
          "RDPMC of counter 0 under CR4.PCE", gate=CR4_PCE, uses=("pmu",)),
    Probe("cpuid", "cpuid-faulting", "outcome", Stub("cpuid_fault", "cpuid", rax="0", rcx="0"),
          (("faulting", (0, 1)), ("cpl", CPLS)), "cpl_gate", REF_CPUID_FAULT, "CPUID under CPUID faulting",
          gate=CPUID_FAULTING),
    Probe("iopl-insn", "iopl", "outcome", Stub("cli", "cli"), (("insn", ("cli",)), ("iopl", (0, 3)), ("cpl", RINGS)),
          "iopl_sensitive", REF_IOPL, "CLI against RFLAGS.IOPL", gate=IOPL),
    Probe("iopl-insn", "iopl", "outcome", Stub("sti", "sti"), (("insn", ("sti",)), ("iopl", (0, 3)), ("cpl", RINGS)),
          "iopl_sensitive", REF_IOPL, "STI against RFLAGS.IOPL", gate=IOPL),
    Probe("io", "io", "outcome", Stub("inb", f"inb ${IO_PORT:#x}, %al"),
          (("insn", ("in",)), ("iopl", (0, 3)), ("allow", (0, 1)), ("cpl", RINGS)), "io_allowed", REF_IO,
          f"IN from port {IO_PORT:#x} against IOPL and the TSS I/O bitmap", gate=IOPL, gate2=IOMAP),
    Probe("io", "io", "outcome", Stub("outb", f"outb %al, ${IO_PORT:#x}"),
          (("insn", ("out",)), ("iopl", (0, 3)), ("allow", (0, 1)), ("cpl", RINGS)), "io_allowed", REF_IO,
          f"OUT to port {IO_PORT:#x} against IOPL and the TSS I/O bitmap", gate=IOPL, gate2=IOMAP),
)


# -- the guest kernel's probes (guests/guest), one declaration for the three hosts that run it --
REF_GUEST_CPL_SVM = "APM Vol. 2 15.5.1: VMRUN loads the guest's CS and CPL from the VMCB: the guest runs at its own CPL0"
REF_GUEST_CPL_VMX = ("SDM Vol. 3C 26.3.2.2: VM entry loads the guest's CS and SS from the guest-state area "
                     "(CPL = SS.DPL): the guest runs at its own CPL0")
REF_SOFT_CPL = ("Popek & Goldberg 1974: MOV from CS is sensitive but not privileged, so a deprivileged kernel "
                "(ring compression 0->1) reads its real CPL1; SDM Vol. 3A 5.5")
REF_GUEST_TSD = ("the guest's own CR4.TSD applies inside the guest: APM Vol. 2 15.7 (intercepts are checked after "
                 "exceptions such as #GP for privilege); SDM Vol. 3C 25.1.1 (such exceptions take priority over "
                 "VM exits); the software host keeps CR4.TSD=1 and emulates the guest's virtual TSD")
REF_GUEST_CPUID = ("the host answers the guest's CPUID: APM Vol. 2 15.9/15.13 (intercept), SDM Vol. 3C 25.1.2 "
                   "(CPUID exits unconditionally), CPUID faulting for the software host (Intel SDM Vol. 4 MSR 0xCE[31], "
                   "0x140[0]; KVM emulates it, QEMU 7.2 TCG does not: the guest then sees the virtual CPU's own answer)")
REF_INTERCEPT = ("an intercepted instruction exits to the host with its reason: APM Vol. 2 15.9-15.13, App. C; "
                 "SDM Vol. 3C 24.6.2, 25.1.2-25.1.3, App. C; the software host: SDM Vol. 3A 5.9 / 6.15 "
                 "(privileged and IOPL-sensitive instructions #GP at CPL1, the host emulates them)")
REF_GUEST_END = "the guest ran all its probes and ended through its DONE report (docs/records.md)"
_SOFT_GATE = ("none: the software host keeps the guest's CR4.TSD virtual (host memory, not CPU state) and "
              "emulates what the gate decides")
_HOST_ANSWERS = "none: the host, not the CPU, answers it (an exit or a trap the host emulates)"
# The guest's CPUID (guests/guest/entry.S guest_cpuid): GDB stops at its CPUID (guest_cpuid_insn),
# at the #VMEXIT the CPU takes on it (SVM: svm_vmexit_return, exit code and guest RIP from the
# VMCB the CPU just wrote) and where the guest gets its registers back (guest_cpuid_done).
_GUEST_CPUID = {"guest-svm": "cpuid", "guest-soft": "cpuid", "guest-vmx": "none: Bochs has no gdbstub"}

CATALOGUE += (
    Probe("cpl-enter", "ring", "cpl-of", None, (("cpl", (0,)), ("via", ("vmrun",))), "guest_entered",
          REF_GUEST_CPL_SVM, "the guest kernel runs at its own CPL0 under SVM", scopes=("guest-svm",),
          witness="entry"),
    Probe("cpl-enter", "ring", "cpl-of", None, (("cpl", (0,)), ("via", ("vmentry",))), "guest_entered",
          REF_GUEST_CPL_VMX, "the guest kernel runs at its own CPL0 under VMX", scopes=("guest-vmx",),
          witness="none: Bochs has no gdbstub"),
    Probe("cpl-enter", "ring", "cpl-of", Stub("guest_kernel", "lgdt", image="guest"),
          (("cpl", (1,)), ("via", ("ring-compression",))), "guest_entered", REF_SOFT_CPL,
          "the guest kernel, which believes it runs at CPL0, runs at CPL1 under the software host",
          scopes=("guest-soft",)),
    Probe("cpl-enter", "ring", "enter", Stub("guest_enter", "mov %cs, %ax", image="guest"),
          (("cpl", (3,)), ("via", ("iretq",))), "ring_entered", f"{REF_CPL}; {REF_IRET}",
          "the guest's IRETQ to its CPL3", scopes=GUEST_SCOPES),
    Probe("cpl-return", "ring", "return", Stub("guest_enter", "mov %cs, %ax", image="guest"),
          (("from_cpl", (3,)), ("via", ("ud2",))), "guest_returned", REF_EXC_RETURN,
          "an exception at the guest's CPL3 runs the guest's handler at the guest kernel's CPL",
          scopes=GUEST_SCOPES,
          witness={"guest-soft": "none: the software host builds the guest's exception frame (host memory, "
                                 "not what the CPU pushed)"}),
    Probe("rdtsc", "tsc", "outcome", Stub("guest_rdtsc", "rdtsc", image="guest"), (("tsd", (1, 0)), ("cpl", (3,))),
          "cpl_gate", f"{REF_RDTSC}; {REF_GUEST_TSD}", "RDTSC at the guest's CPL3 under the guest's own CR4.TSD",
          gate=CR4_TSD, scopes=GUEST_SCOPES, witness={"guest-soft": _SOFT_GATE}),
    Probe("rdtsc", "tsc", "outcome", None, (("tsd", (1,)), ("cpl", (0,))), "cpl_gate", f"{REF_RDTSC}; {REF_GUEST_TSD}",
          "RDTSC at the guest's CPL0 with its CR4.TSD set", gate=CR4_TSD, scopes=GUEST_SCOPES,
          witness="none: at the guest's CPL0 RDTSC exits to (or is emulated by) the host: no trap in the guest"),
    Probe("rdtsc-intercepted", "tsc", "count", None, (("cpl", (0,)), ("intercept", (1, 0))), "guest_tsc_value",
          REF_INTERCEPT, "the RDTSC value the guest got: the host's (intercepted) or the CPU's", scopes=GUEST_SCOPES,
          witness=_HOST_ANSWERS),
    Probe("cpuid-vendor", "cpuid", "count", None, (("leaf", (0,)),), "vendor", f"{REF_VENDOR}; {REF_GUEST_CPUID}",
          "CPUID leaf 0 as the guest sees it", scopes=GUEST_SCOPES, witness=_GUEST_CPUID, cpuid=(0, 0, "bytes:bdc")),
    Probe("cpuid-hv-bit", "cpuid", "count", None, (), "guest_hv_bit", f"{REF_HV_BIT}; {REF_GUEST_CPUID}",
          "the hypervisor bit as the guest sees it", scopes=GUEST_SCOPES, witness=_GUEST_CPUID,
          cpuid=(1, 0, "bit:c31")),
    Probe("cpuid-hv-signature", "cpuid", "count", None, (), "guest_hv_signature", REF_GUEST_CPUID,
          "CPUID 0x40000000 as the guest sees it: the lab host's signature", scopes=GUEST_SCOPES,
          witness=_GUEST_CPUID, cpuid=(0x40000000, 0, "bytes:bcd")),
    Probe("guest-end", "guest", "count", None, (), "guest_end", REF_GUEST_END, "the guest ran to its end",
          scopes=GUEST_SCOPES, witness=_HOST_ANSWERS),
    Probe("vmexit", "guest", "count", None, (("reason", ("cpuid", "rdtsc", "hlt", "ioio")),), "exit_seen",
          REF_INTERCEPT, "each intercepted instruction exits at least once", scopes=("guest-svm",),
          witness=_HOST_ANSWERS),
    Probe("vmexit", "guest", "count", None, (("reason", ("cpuid", "rdtsc", "hlt", "io")),), "exit_seen",
          REF_INTERCEPT, "each instruction the VMX host exits on exits at least once", scopes=("guest-vmx",),
          witness=_HOST_ANSWERS),
    Probe("trap", "guest", "count", None, (("reason", ("rdtsc", "out", "hlt", "mov-cr", "cpuid")),), "exit_seen",
          REF_INTERCEPT, "each instruction the software host emulates traps at least once", scopes=("guest-soft",),
          witness=_HOST_ANSWERS),
)

# -- ring -2: System Management Mode as the kernel sees it (firmware/smm.c; QEMU pc/q35) ------
# The kernel raises SMIs through the APM control port (0xB2); SeaBIOS's handler answers them,
# then, where the chipset leaves SMRAM unlocked, the lab's own handler at SMBASE+0x8000.
SMM_SCOPE = "ring-2"
REF_SMI = "SDM Vol. 3C 32.2-32.3 (an SMI enters SMM at the next instruction boundary; SMRAM at SMBASE)"
REF_SMI_TSC = f"{REF_SMI}; SDM Vol. 3B 18.17 (the TSC counts on through SMM): the handler's time shows as a longer OUT"
REF_SMI_COUNT = ("Intel SDM Vol. 4 ch. 2 MSR_SMI_COUNT 0x34 (Nehalem and later Intel family 6 models: SMIs since "
                 "reset); AMD64 has no MSR 0x34 (APM Vol. 2 App. A): RDMSR of it is #GP(0)")
REF_SMI_STATE = "SDM Vol. 3C 32.4.1 and 32.10: the processor state is saved in SMRAM on entry and RSM restores it"
REF_RSM = "SDM Vol. 2B RSM: #UD when not in SMM"
REF_SMRAM = ("82441FX (i440FX) SMRAM register 72h / 3 Series MCH SMRAMC 9Dh, as QEMU models them (hw/pci-host/"
             "i440fx.c, q35.c): with D_OPEN=0 outside SMM, A0000h-BFFFFh goes to the PCI bus (VGA), not SMRAM")
REF_SMM_ENV = "SDM Vol. 3C 32.5.1 Table 32-4 (SMM entry: CS = SMBASE>>4 with base SMBASE, CR0.PE=PG=0), CPL0"
REF_SMM_SAVE = ("SDM Vol. 3C 32.4.1; APM Vol. 2 10.2.3 Table 10-2 (the AMD64 save-area layout QEMU writes for every "
                "64-bit vCPU, docs/platform.md 'SMM')")
# GDB stops at the RSM of the lab's handler in SMRAM (absolute symbol smm_rsm_copy, TCG only:
# docs/gdb.md): it counts the entries and reads CS and CR0 in SMM; the rest is the kernel's own reading.
SMM_STOP = "smm"
_SMM_WITNESS = ("none: the kernel's own reading of an SMI (GDB stops only at the lab's handler: its entries, CS "
                "and CR0)")
_FW, _LAB = ("handler", ("firmware",)), ("handler", ("lab",))

CATALOGUE += tuple(
    Probe(probe, "smm", "smm", None, dims, rule, ref, summary, scopes=(SMM_SCOPE,),
          witness=SMM_STOP if probe in ("smi-entries", "smm-cs", "smm-cr0") else _SMM_WITNESS)
    for probe, dims, rule, ref, summary in (
        ("smi-time", (_FW,), "smi_time", REF_SMI_TSC,
         "OUT to APM_CNT 0xB2 (an SMI) against the same OUT to 0xB3 (none): the time SMM took"),
        ("smi-count-msr", (), "smi_count_msr", REF_SMI_COUNT, "RDMSR MSR_SMI_COUNT (0x34): offered by the model?"),
        ("smi-count", (_FW, ("port", ("0xb2", "0xb3"))), "smi_count", REF_SMI_COUNT,
         "MSR_SMI_COUNT across n OUTs to 0xB2 (n SMIs) and to 0xB3 (none)"),
        ("smi-count", (_LAB, ("port", ("0xb2",))), "smi_count", REF_SMI_COUNT,
         "MSR_SMI_COUNT across n SMIs the lab's own handler answered"),
        ("smi-state", (("handler", ("firmware", "lab")),), "smm_unchanged", REF_SMI_STATE,
         "every general register and RFLAGS across an SMI, as the kernel sees them"),
        ("smi-control-regs", (_FW,), "smm_unchanged", REF_SMI_STATE, "CR0, CR3, CR4, EFER across the SMIs"),
        ("rsm", (("smm", (0,)),), "rsm_outside", REF_RSM, "RSM outside SMM"),
        ("smram-hidden", (), "smram_hidden", REF_SMRAM,
         "SMRAM (0xA8000) read from ring 0 with SMRAM closed against D_OPEN=1"),
        ("smi-entries", (_LAB,), "smm_entries", REF_SMI, "the lab's handler at SMBASE+0x8000 counts its entries"),
        ("smm-cs", (_LAB,), "smm_cs", REF_SMM_ENV, "the CS the lab's handler runs with"),
        ("smm-cr0", (_LAB,), "smm_cr0", REF_SMM_ENV, "CR0.PE|PG as the lab's handler reads them (a CPL0 MOV)"),
        ("smm-saved-rip", (_LAB,), "smm_saved_rip", f"{REF_SMM_SAVE}; {REF_SMI}",
         "the save area's RIP: the boundary after the kernel's OUT"),
        ("smm-saved-state", (_LAB,), "smm_saved_state", REF_SMM_SAVE,
         "the save area's RBX, CR3, EFER: the interrupted kernel's"),
        ("smm-alters", (_LAB,), "smm_alters", f"{REF_SMI_STATE}; {REF_SMM_SAVE}",
         "the handler XORs the saved RBX: the kernel sees RBX changed after RSM, nothing else"),
    )
)

# -- Popek & Goldberg (1974) on x86: Robin & Irvine (USENIX Security 2000) listed the x86
# instructions that are sensitive but not privileged, in two groups. The guest kernel runs each
# at the CPL it believes is 0 (guests/guest/guest.c probe_pg), with its own CR4.UMIP clear and
# set, and compares what it saw with its own tables; the host counts its traps/exits around the
# one instruction. obs: `traps` (the host saw it, the guest saw its own view), `leaks` (unseen,
# the guest saw what a CPL0 kernel would not), `same` (unseen, the same view), `wrong` (seen,
# yet the guest saw another view). The rule (lab/expectations.py pg_*) is the SDM's operation
# of the instruction at the CPL and with the state the host runs the guest in.
PG_FAMILY = "popek-goldberg"
PG_REGISTER, PG_PROTECTION = "sensitive register", "protection system"
_PG_WITNESS = ("none: the verdict joins the guest's comparison with the host's count of its own traps/exits "
               "(host memory, not CPU state)")
# (mnemonic, Robin & Irvine's group, rule, what the guest compares, reference)
PG_INSNS = (
    ("sgdt", PG_REGISTER, "pg_umip", "the GDTR base against its own GDT",
     "SDM Vol. 2B SGDT; Vol. 3A 2.5 (CR4.UMIP: #GP(0) at CPL>0)"),
    ("sidt", PG_REGISTER, "pg_umip", "the IDTR base against its own IDT",
     "SDM Vol. 2B SIDT; Vol. 3A 2.5 (CR4.UMIP: #GP(0) at CPL>0)"),
    ("sldt", PG_REGISTER, "pg_umip", "the LDTR selector against the LDT it loaded",
     "SDM Vol. 2B SLDT; Vol. 3A 2.5 (CR4.UMIP: #GP(0) at CPL>0)"),
    ("smsw", PG_REGISTER, "pg_umip", "the machine status word against its own CR0 (TS set)",
     "SDM Vol. 2B SMSW; Vol. 3A 2.5 (CR4.UMIP: #GP(0) at CPL>0)"),
    ("pushf", PG_REGISTER, "pg_reveals", "the IOPL and IF in RFLAGS against what it set (IOPL 3 by IRETQ)",
     "SDM Vol. 2B PUSHF: no privilege check outside virtual-8086 mode"),
    ("popf", PG_REGISTER, "pg_reveals", "whether POPF loading IOPL 3 took effect (read back by PUSHF)",
     "SDM Vol. 2B POPF: at CPL>0 IOPL is left unchanged (IF too at CPL>IOPL), without a fault"),
    ("lar", PG_PROTECTION, "pg_reveals", "ZF and the rights of its DPL0 code selector against its GDT",
     "SDM Vol. 2A LAR: ZF=0 when DPL < CPL or RPL (non-conforming), no fault"),
    ("lsl", PG_PROTECTION, "pg_reveals", "ZF and the limit of its DPL0 data selector against its GDT",
     "SDM Vol. 2A LSL: ZF=0 when DPL < CPL or RPL (non-conforming), no fault"),
    ("verr", PG_PROTECTION, "pg_reveals", "ZF for its DPL0 data selector (readable at CPL0)",
     "SDM Vol. 2B VERR/VERW: ZF=0 when DPL < CPL or RPL, no fault"),
    ("verw", PG_PROTECTION, "pg_reveals", "ZF for its DPL0 data selector (writable at CPL0)",
     "SDM Vol. 2B VERR/VERW: ZF=0 when DPL < CPL or RPL, no fault"),
    ("pop", PG_PROTECTION, "pg_faults", "POP FS of its DPL0 data selector: loaded or not",
     "SDM Vol. 2B POP: a data segment with DPL < CPL is #GP(selector); POP DS/ES/SS are #UD in 64-bit mode"),
    ("push", PG_PROTECTION, "pg_reveals", "PUSH FS after loading its DPL0 data selector: the selector pushed",
     "SDM Vol. 2B PUSH (the selector as loaded, its RPL); PUSH CS/DS/ES/SS are #UD in 64-bit mode"),
    ("call", PG_PROTECTION, "pg_faults", "far CALL through its DPL0 call gate: the CS pushed",
     "SDM Vol. 2A CALL (call gate: selector past the GDT limit #GP(selector); pushes CS with RPL=CPL)"),
    ("jmp", PG_PROTECTION, "pg_faults", "far JMP through its DPL0 call gate: the target reached",
     "SDM Vol. 2A JMP (call gate: selector past the GDT limit #GP(selector))"),
    ("int", PG_PROTECTION, "pg_faults", "INT 0x40 through its DPL0 interrupt gate: the CS in the frame",
     "SDM Vol. 2A INT n (not an interrupt/trap gate: #GP(vector*8+2)); Vol. 3A 6.14.2 (the frame's CS)"),
    ("ret", PG_PROTECTION, "pg_faults", "far RET to its own CS (RPL0): returned or not",
     "SDM Vol. 2B RET (far): a return CS with RPL < CPL is #GP(selector)"),
    ("str", PG_PROTECTION, "pg_umip", "the TR selector against its own TSS selector",
     "SDM Vol. 2B STR; Vol. 3A 2.5 (CR4.UMIP: #GP(0) at CPL>0)"),
    ("mov", PG_PROTECTION, "pg_reveals", "MOV from CS: the selector, whose RPL is the CPL",
     "SDM Vol. 2A MOV (from a segment register: no privilege check); Vol. 3A 5.5 (CPL is CS[1:0])"),
)
CATALOGUE += tuple(
    Probe(f"pg-{name}", PG_FAMILY, "count", None, (("umip", (0, 1)),), rule, ref,
          f"{name.upper()} at the guest kernel's CPL: {what} ({group} instruction, Robin & Irvine 2000)",
          scopes=GUEST_SCOPES, witness=_PG_WITNESS)
    for name, group, rule, what, ref in PG_INSNS
)

# What the `lie` build reports instead of the truth (a negative control both witnesses must
# catch; every other record of that build is the truth).
LIES = {
    "host.cpl-enter.cpl3.iretq": "0",
    "host.cpl-enter.cpl3.sysret": "0",
    "host.rdtsc.tsd1.cpl3": "ok",
    "host.cpuid-vendor.leaf0": "LieLieLieLie",
    # one row per family of the privilege atlas, where every accelerator here faults
    "host.sgdt.umip1.cpl3": "ok",
    "host.rdpmc.counter0.pce0.cpl3": "ok",
    "host.cpuid.faulting1.cpl2": "ok",
    "host.iopl-insn.sti.iopl0.cpl3": "ok",
    "host.io.in.iopl0.allow0.cpl3": "ok",
}


def rows(scope: str = "host") -> list[Row]:
    return [Row(p, params, scope) for p in CATALOGUE if scope in p.scopes for params in p.instances()]


def table_rows() -> list[Row]:
    """The rows the firmware runs from its table, in catalogue order."""
    return [r for r in rows() if r.entry.stub is not None and r.entry.stub.image == "host"]


def stubs(image: str | None = "host") -> list[Stub]:
    seen: dict[str, Stub] = {}
    for p in CATALOGUE:
        if p.stub is not None and image is not None and p.stub.image != image:
            continue
        if p.stub is not None:
            if p.stub.name in seen and seen[p.stub.name] != p.stub:
                raise ValueError(f"stub {p.stub.name!r} declared twice with different bodies")
            seen[p.stub.name] = p.stub
    return list(seen.values())


def features_needed() -> list[str]:
    """The CPUID features (QOM property names) the entries, their rules and their gates need."""
    return sorted({f for p in CATALOGUE for f in (p.needs, *p.uses, *(g.needs for g in p.gates))
                   if f and not f.startswith("accel:")})


def run_words(has, skipped: list[str]) -> list[str]:
    """`run=` words: the families that run only when told, and that this model may run
    (their gate's feature present; not skipped, e.g. by a deviation that would hang)."""
    return sorted({p.family for p in CATALOGUE if p.scopes == ("host",) and p.stub is not None
                   and p.runs_only_when_told and p.family not in skipped
                   and all(has(g.needs) for g in p.gates if g.needs)})


def gate_skips(has) -> list[str]:
    """Families the firmware must not run where the accelerator lacks their gate (`accel:`).
    A gate on a CPUID feature (CR4.UMIP: reserved without it, SDM Vol. 3A 2.5) the firmware
    decides itself from its own CPUID read (firmware/probe.c), so it follows the CPU, not the
    model's description. `has(feature) -> bool`."""
    return sorted({p.family for p in CATALOGUE for g in p.gates
                   if g.needs.startswith("accel:") and not has(g.needs)})


def by_stub(name: str) -> list[Probe]:
    return [p for p in CATALOGUE if p.stub is not None and p.stub.name == name]


# -- the firmware's table ------------------------------------------------------------------
_KIND_C = {k: f"PK_{k.upper()}" for k in KINDS}


def _c_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _c_num(s: str) -> str:
    return s if s else "0"


_GATE_C = {"cr4": "GATE_CR4", "msr": "GATE_MSR", "iopl": "GATE_IOPL", "iomap": "GATE_IOMAP"}


def _c_gate(g: Gate, value: str) -> str:
    reg = g.msr if g.reg == "msr" else g.bit if g.reg == "iomap" else 0
    bit = g.bit if g.reg in ("cr4", "msr") else 0
    return f"{{ {_GATE_C[g.reg]}, {reg:#x}, {bit}, {int(value)} }}"


def to_32bit(asm: str) -> str:
    """A stub's text for the 32-bit host: 64-bit register names become their 32-bit halves
    (%rsp -> %esp, %rax -> %eax), so one entry serves both kernels; `Stub.asm32` overrides."""
    return re.sub(r"%r([abcd]x|sp|bp|si|di)\b", r"%e\1", asm)


# Negative controls (firmware/Makefile): builds whose stub holds another instruction than the
# catalogue declares. The lab never uses these texts: the witness must find them out.
SWAPPED = {"lie-insn": {"rdtsc": "cli\n    nop"}, "lie-int": {"rdtsc": "int $0x4d"}}


def firmware_sources(bits: int = 64, variant: str = "normal") -> dict[str, str]:
    """`probes.gen.S` (one stub per probed instruction, each with its two labels) and
    `probes.gen.h` (the row table the firmware iterates). `bits=32`: the same table with
    the stubs' 32-bit text (`Stub.asm32`) for the 32-bit host kernel (firmware/arch32)."""
    asm = ["/* Generated from lab/catalogue.py by `python3 -m lab.catalogue`: do not edit. */",
           '#include "asm.h"', "    .text"]
    for s in stubs():
        # probe_pre_<name>: a 2-byte no-op the ring is entered at, where the GDB witness stops the
        # CPU before the instruction (and moves it to probe_insn_<name> itself: lab/gdb/collector.py).
        # The instruction stays 16-byte aligned (the no-op before the boundary): measured under
        # kvm_pvm with -cpu max, an unaligned SIDT at CPL0 had its #UD return trap reach a
        # hardware-breakpointed IDT stub as a guest #DB instead of a GDB stop (docs/gdb.md).
        asm += [f"    .globl probe_pre_{s.name}, probe_insn_{s.name}, probe_done_{s.name}", "    .balign 16",
                "    .skip 14, 0xcc", f"probe_pre_{s.name}:", f"    {PRE_NOP}", f"probe_insn_{s.name}:"]
        text = (s.asm32 or to_32bit(s.asm)) if bits == 32 else s.asm
        text = SWAPPED.get(variant, {}).get(s.name, text)
        asm += [f"    {line.strip()}" for line in text.splitlines() if line.strip()]
        asm += [f"probe_done_{s.name}:", "    ud2"]
    h = ["/* Generated from lab/catalogue.py by `python3 -m lab.catalogue`: do not edit. */",
         "#ifndef PROBES_GEN_H", "#define PROBES_GEN_H", '#include "probe.h"', ""]
    for s in stubs():
        h.append(f"extern char probe_pre_{s.name}[], probe_insn_{s.name}[], probe_done_{s.name}[];")
    h += ["", "static const struct probe_stub probe_stubs[] = {"]
    for s in stubs():
        rax_cr4 = s.rax.startswith("cr4")  # "cr4" or "cr4|BITS": the current CR4, BITS set
        rax = s.rax.partition("|")[2] if rax_cr4 else s.rax
        h.append(f"    {{ probe_pre_{s.name}, probe_insn_{s.name}, probe_done_{s.name}, {int(rax_cr4)}, "
                 f"{_c_num(rax)}, {_c_num(s.rcx)}, {int(s.continue_at)} }},")
    h += ["};", f"#define PROBE_NSTUBS {len(stubs())}", "", "static const struct probe_row probe_rows[] = {"]
    index = {s.name: i for i, s in enumerate(stubs())}
    table = [r for r in table_rows() if bits == 64 or not r.entry.long_mode_only]
    for r in table:
        p = r.entry
        keys = list(r.params)
        vals = [r.params[k] for k in keys]
        keys += [""] * (4 - len(keys))
        vals += [""] * (4 - len(vals))
        gates = [_c_gate(g, r.params[g.param]) for g in p.gates] + ["{ GATE_NONE, 0, 0, 0 }"] * (2 - len(p.gates))
        leaf, subleaf, decode = p.cpuid or (0, 0, "")
        lie = LIES.get(r.id, "")
        h.append(
            f"    {{ {_c_str(r.scope)}, {_c_str(p.probe)}, {_c_str(p.family)}, {_KIND_C[p.kind]}, "
            f"{index[p.stub.name]}, {r.cpl}, {int(p.entry == 'sysret')}, "
            f"{{ {', '.join(_c_str(k) for k in keys)} }}, {{ {', '.join(_c_str(v) for v in vals)} }}, "
            f"{{ {', '.join(gates)} }}, "
            f"{_c_str(decode)}, {_c_str(lie)}, {int(p.runs_only_when_told)} }},"
        )
    h += ["};", f"#define PROBE_NROWS {len(table)}", "", "#endif", ""]
    return {"probes.gen.S": "\n".join(asm) + "\n", "probes.gen.h": "\n".join(h)}


def write_firmware_sources(out_dir: Path, bits: int = 64, variant: str = "normal") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in firmware_sources(bits, variant).items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:  # keep make's timestamps when unchanged
            path.write_text(text)


# -- the docs' table -----------------------------------------------------------------------
def markdown_table() -> str:
    """One row per probe family and instruction: what it checks, its dimensions, rule source."""
    out = ["| probe | dimensions | what it checks | reference |", "|---|---|---|---|"]
    for p in CATALOGUE:
        if p.kind == "count":
            continue
        dims = ", ".join(f"{k} {'/'.join(str(v) for v in vals)}" for k, vals in p.dims) or "-"
        gate = "".join(f" (gate {'CR4.' if g.reg == 'cr4' else ''}{g.name})" for g in p.gates)
        needs = f"; needs CPUID `{p.needs}`" if p.needs else ""
        where = "" if p.scopes == ("host",) else f" ({', '.join(p.scopes)})"
        out.append(f"| `{p.probe}`{where} | {dims} | {p.summary}{gate}{needs} | {p.ref} |")
    return "\n".join(out) + "\n"


DOCS_BEGIN, DOCS_END = "<!-- catalogue table: generated by `python3 -m lab.catalogue --docs` -->", "<!-- end of catalogue table -->"
DOCS = ("README.md", "docs/probes.md")


def docs_text(text: str) -> str:
    """`text` with the block between the markers replaced by the current table."""
    begin, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    return text[:begin] + "\n" + markdown_table() + text[end:]


if __name__ == "__main__":  # make: python3 -m lab.catalogue OUT_DIR; docs: --docs
    if sys.argv[1:] == ["--docs"]:
        root = Path(__file__).resolve().parent.parent
        for name in DOCS:
            (root / name).write_text(docs_text((root / name).read_text()))
    elif 2 <= len(sys.argv) <= 4 and not sys.argv[1].startswith("-") and all(
            a == "--bits=32" or a.startswith("--variant=") for a in sys.argv[2:]):
        opts = dict(a[2:].split("=", 1) for a in sys.argv[2:])
        write_firmware_sources(Path(sys.argv[1]), int(opts.get("bits", 64)), opts.get("variant", "normal"))
    else:  # an option it does not know is not a folder to create
        sys.exit("usage: python3 -m lab.catalogue OUT_DIR [--bits=32] [--variant=V] | --docs")
