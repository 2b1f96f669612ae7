"""The architecture rules, in one place.

Every expected value is derived here from the configuration: the accelerator, and QEMU's
own description of the configured CPU model (QOM properties such as `vendor`, `rdtscp`,
`svm`), never from what the firmware printed and never from constants tuned to one
machine. Change `--cpu` and the expectations change with it.

`plan()` lists every check a boot must produce; a check without an observation is an
`error`, never a `pass`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ids import check_id

# -- references (Intel SDM = Intel 64 and IA-32 Architectures SDM; APM = AMD64 APM) --------
# The host probes' references live with their entries in lab/catalogue.py; these serve the
# guest scopes, whose probes the guest kernel runs.
from .catalogue import (  # noqa: E402
    REF_CPL, REF_EXC_RETURN, REF_HV_BIT, REF_IRET, REF_RDTSC, REF_VENDOR, Row, rows,
)

REF_GUEST_CPL = "APM Vol. 2 15.5.1: VMRUN loads the guest's CS and CPL from the VMCB: the guest runs at its own CPL0"
REF_GUEST_TSD = (
    "APM Vol. 2 15.7: instruction intercepts are checked after exceptions such as #GP for "
    "privilege; the guest's own CR4.TSD applies inside the guest"
)
REF_GUEST_SIG = "APM Vol. 2 15.9/15.13: the host intercepts CPUID and answers leaf 0x40000000 itself"
REF_GUEST_END = "the guest ran all its probes and ended through its DONE report (docs/records.md)"
REF_SOFT_CPL = (
    "Popek & Goldberg 1974: MOV from CS is sensitive but not privileged, so a deprivileged "
    "kernel (ring compression 0->1) reads its real CPL1; SDM Vol. 3A 5.5"
)
REF_SOFT_TRAP = "SDM Vol. 3A 5.9 / 6.15: privileged and IOPL-sensitive instructions #GP at CPL1; the host emulates them"
REF_SOFT_CPUID = (
    "CPUID faulting (Intel SDM Vol. 4 MSR 0xCE[31], MSR 0x140[0]) makes CPL>0 CPUID #GP so the host can "
    "answer; KVM emulates it, QEMU 7.2 TCG does not (the guest then sees the virtual CPU's own answer)"
)
REF_INTERCEPT = "APM Vol. 2 15.9-15.13, App. C: an intercepted instruction causes #VMEXIT with its exit code"

AT_LEAST_ONCE = ">=1"


@dataclass(frozen=True)
class Facts:
    """What the configuration says the CPU is. Filled from QEMU (QOM), not the firmware."""

    accel: str
    kvm_module: str | None
    vendor: str
    rdtscp: bool
    svm: bool
    hypervisor: bool
    vmx: bool = False  # CPUID.1:ECX[5]: Intel VMX (Bochs' Intel models; lab/bochs.py)
    syscall: bool = True  # QOM `syscall`: SYSCALL/SYSRET in 64-bit mode (CPUID 0x80000001 EDX[11])
    expose_kvm: bool = True
    tcg_cpuid: bool = True
    hv_signature: str = "LabRingMinus"
    host_mode: str = "auto"
    guest_rdtsc_intercept: bool = True  # the host's RDTSC intercept (hv-intercept-rdtsc)

    @classmethod
    def from_qemu(cls, accel: str, kvm_module: str | None, qom: dict, *, hv_signature: str, host_mode: str,
                  guest_rdtsc_intercept: bool = True) -> "Facts":
        return cls(
            accel=accel,
            kvm_module=kvm_module if accel == "kvm" else None,
            vendor=str(qom.get("vendor", "")),
            rdtscp=bool(qom.get("rdtscp", False)),
            svm=bool(qom.get("svm", False)),
            hypervisor=bool(qom.get("hypervisor", False)),
            syscall=bool(qom.get("syscall", True)),
            expose_kvm=bool(qom.get("kvm", True)),
            tcg_cpuid=bool(qom.get("tcg-cpuid", True)),
            hv_signature=hv_signature,
            host_mode=host_mode,
            guest_rdtsc_intercept=guest_rdtsc_intercept,
        )

    @property
    def guest_mode(self) -> str:
        """Which host runs the guest: SVM when the CPU has it, else the software host."""
        if self.host_mode == "auto":
            return "vmx" if self.vmx else "svm" if self.svm else "soft"  # firmware/vmx.c: hv_main
        return self.host_mode

    @property
    def cpuid_faulting(self) -> bool:
        """Whether the virtual CPU offers CPUID faulting (MSR_PLATFORM_INFO 0xCE bit 31; enabled
        by MSR_MISC_FEATURES_ENABLES 0x140 bit 0, Intel SDM Vol. 4 2.17). KVM emulates it for every
        guest whatever the vendor (arch/x86/kvm: CPUID always exits to KVM, which injects #GP(0)
        at CPL>0 when it is enabled); QEMU 7.2's TCG does not implement either MSR. The rule holds
        at every CPL>0 on kvm_intel and kvm_amd; kvm_pvm does not fault at CPL3 (its user mode
        runs CPUID without an exit): lab/deviations.py names that where a probe runs CPUID at CPL3."""
        return self.accel == "kvm"

    @property
    def amd_cpuid_semantics(self) -> bool:
        """KVM answers an out-of-range CPUID leaf with zeros for AMD and Hygon vendors and with
        the highest basic leaf's data for every other vendor (Intel's rule, SDM Vol. 2A CPUID:
        "If a value entered for CPUID.EAX is higher than the maximum input value ... the data
        for the highest basic information leaf is returned"); KVM's get_out_of_range_cpuid_entry()
        keys it on the guest's vendor string."""
        return self.vendor in ("AuthenticAMD", "AMDisbetter!", "HygonGenuine")


@dataclass(frozen=True)
class Expectation:
    scope: str
    probe: str
    params: dict[str, str]
    expected: str
    rule: str
    skip: str | None = None  # why this check cannot run in this configuration
    id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", check_id(self.scope, self.probe, self.params))

    def matches(self, observed: str) -> bool:
        if self.expected == AT_LEAST_ONCE:
            return observed.isdigit() and int(observed) >= 1
        return observed == self.expected


def _p(**kw: object) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items()}


# -- the rules: one function per catalogue `rule`, (facts, params, info) -> expected value ------
def tsc_read(insn: str, tsd: int, cpl: int, *, rdtscp_present: bool = True, protected: bool = True) -> str:
    """RDTSC/RDTSCP: #UD if RDTSCP is absent (decode-time, before privilege checks);
    #GP(0) iff CR4.TSD=1 and CPL>0 and CR0.PE=1; otherwise it completes."""
    if insn == "rdtscp" and not rdtscp_present:
        return "#UD"
    if tsd and cpl > 0 and protected:
        return "#GP(0)"
    return "ok"


def privileged(insn: str, cpl: int) -> str:
    """HLT and MOV to CR4 need CPL0; CLI needs CPL <= IOPL, and the lab runs with IOPL=0."""
    del insn  # same rule for all three with IOPL=0
    return "#GP(0)" if cpl > 0 else "ok"


def vendor_bytes(vendor: str) -> str:
    """CPUID leaf 0's 12 bytes for a QOM `vendor`: QEMU packs the string into EBX, EDX, ECX,
    NUL-padded, so the `base` model's empty vendor reads as twelve NULs."""
    return vendor.encode("latin-1")[:12].ljust(12, b"\0").decode("latin-1")


def hv_signature(facts: Facts, info: dict[str, str] | None = None) -> str:
    """What leaf 0x40000000 (EBX,ECX,EDX) returns on this accelerator's virtual CPU.
    TCG: QEMU answers the range up to 0x40000001 itself, with its signature only when
    `tcg-cpuid` is on, else zeros (target/i386/cpu.c, whatever the vendor). KVM: QEMU
    defines the leaf only when `kvm` is on; otherwise the leaf is out of range and KVM's
    vendor rule applies (Facts.amd_cpuid_semantics): zeros, or the highest basic leaf's data,
    which the firmware reports as `info cpuid.top` (the CPU's own answer for CPUID.0:EAX)."""
    if facts.accel == "tcg":
        return "TCGTCGTCGTCG" if facts.tcg_cpuid else "\0" * 12
    if facts.expose_kvm:
        return "KVMKVMKVM\0\0\0"
    if facts.amd_cpuid_semantics:
        return "\0" * 12
    top = (info or {}).get("cpuid.top")
    return top if top is not None else "the highest basic leaf's data (info cpuid.top missing)"


def _skip(facts: Facts, row: Row) -> str | None:
    if row.entry.family == "syscall" and not facts.syscall:
        return "no SYSCALL/SYSRET on this CPU model (CPUID 0x80000001 EDX[11]; QOM `syscall`)"
    return None


RULES = {
    "ring_entered": lambda f, p, i: p["cpl"],  # IRETQ/SYSRET load CS (and so the CPL) from the frame / STAR
    "ring_returned": lambda f, p, i: "0",  # the #UD handler's gate and LSTAR's CS are DPL0
    "privileged": lambda f, p, i: privileged(p["insn"], int(p["cpl"])),
    "iopl_sensitive": lambda f, p, i: privileged(p["insn"], int(p["cpl"])),
    "vendor": lambda f, p, i: vendor_bytes(f.vendor),
    "hv_bit": lambda f, p, i: "1" if f.hypervisor else "0",
    "hv_signature": lambda f, p, i: hv_signature(f, i),
}


def _expected(facts: Facts, row: Row, info: dict[str, str]) -> str:
    p = row.params
    if row.entry.rule == "tsc_read":
        present = getattr(facts, row.entry.needs) if row.entry.needs else True
        return tsc_read(row.probe, int(p["tsd"]), int(p["cpl"]), rdtscp_present=present,
                        protected=p.get("mode") != "real")
    return RULES[row.entry.rule](facts, p, info)


def host_plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    """One expectation per catalogue row (lab/catalogue.py), by the row's rule."""
    info = info or {}
    return [Expectation(r.scope, r.probe, r.params, _expected(facts, r, info), r.entry.ref, _skip(facts, r))
            for r in rows("host")]


def guest_svm_plan(facts: Facts) -> list[Expectation]:
    skip = None
    if not facts.svm:
        skip = "no SVM: this CPU model has none (CPUID 0x80000001 ECX[2]; QOM `svm`)"
        if facts.accel == "kvm":
            skip = f"no SVM under KVM ({facts.kvm_module or 'unknown module'} gives its guests no SVM)"
    elif facts.guest_mode != "svm":
        skip = f"host mode {facts.guest_mode}: the SVM host does not run"
    s = "guest-svm"
    rows = [
        Expectation(s, "cpl-enter", _p(cpl=0, via="vmrun"), "0", REF_GUEST_CPL, skip),
        Expectation(s, "cpl-enter", _p(cpl=3, via="iretq"), "3", f"{REF_CPL}; {REF_IRET}", skip),
        Expectation(s, "cpl-return", _p(from_cpl=3, via="ud2"), "0", REF_EXC_RETURN, skip),
        Expectation(s, "cpuid-vendor", _p(leaf=0), vendor_bytes(facts.vendor), f"{REF_VENDOR}; passed through by the host",
                    skip),
        Expectation(s, "cpuid-hv-bit", {}, "1", f"{REF_HV_BIT}; set by the host", skip),
        Expectation(s, "cpuid-hv-signature", {}, facts.hv_signature, REF_GUEST_SIG, skip),
        Expectation(s, "rdtsc", _p(tsd=1, cpl=3), "#GP(0)", f"{REF_RDTSC}; {REF_GUEST_TSD}", skip),
        Expectation(s, "rdtsc", _p(tsd=0, cpl=3), "ok", REF_RDTSC, skip),
        Expectation(s, "rdtsc", _p(tsd=1, cpl=0), "ok", REF_RDTSC, skip),
        Expectation(s, "rdtsc-intercepted", _p(cpl=0, intercept=int(facts.guest_rdtsc_intercept)),
                    "host-value" if facts.guest_rdtsc_intercept else "native", REF_INTERCEPT, skip),
    ]
    rows.append(Expectation(s, "guest-end", {}, "done", REF_GUEST_END, skip))
    reasons = ("cpuid", "rdtsc", "hlt", "ioio") if facts.guest_rdtsc_intercept else ("cpuid", "hlt", "ioio")
    for reason in reasons:
        rows.append(Expectation(s, "vmexit", _p(reason=reason), AT_LEAST_ONCE, REF_INTERCEPT, skip))
    return rows


def guest_vmx_plan(facts: Facts) -> list[Expectation]:
    """The VMX host's guest (firmware/vmx.c): the guest-svm checks, by the VMX rules (Intel SDM
    Vol. 3C chapters 24-27). Self-contained: its references live here."""
    ref_cpl = ("SDM Vol. 3C 26.3.2.2: VM entry loads the guest's CS and SS from the guest-state area "
               "(CPL = SS.DPL): the guest runs at its own CPL0")
    ref_tsd = ("SDM Vol. 3C 25.1.1: exceptions based on privilege level (RDTSC's #GP(0) under CR4.TSD) take "
               "priority over VM exits; the guest's own CR4.TSD applies inside the guest")
    ref_sig = "SDM Vol. 3C 25.1.2: CPUID causes a VM exit unconditionally; the host answers leaf 0x40000000"
    ref_exit = ("SDM Vol. 3C 24.6.2 (HLT, RDTSC and unconditional I/O exiting), 25.1.2-25.1.3, App. C: "
                "the instruction causes a VM exit with its basic exit reason")
    skip = None
    if not facts.vmx:
        skip = "no VMX: this CPU model has none (CPUID.1:ECX[5]; SDM Vol. 3C 23.6)"
    elif facts.guest_mode != "vmx":
        skip = f"host mode {facts.guest_mode}: the VMX host does not run"
    s = "guest-vmx"
    tsc_value = "host-value" if facts.guest_rdtsc_intercept else "native"
    rows = [
        Expectation(s, "cpl-enter", _p(cpl=0, via="vmentry"), "0", ref_cpl, skip),
        Expectation(s, "cpl-enter", _p(cpl=3, via="iretq"), "3", f"{REF_CPL}; {REF_IRET}", skip),
        Expectation(s, "cpl-return", _p(from_cpl=3, via="ud2"), "0", REF_EXC_RETURN, skip),
        Expectation(s, "cpuid-vendor", _p(leaf=0), facts.vendor, f"{REF_VENDOR}; passed through by the host", skip),
        Expectation(s, "cpuid-hv-bit", {}, "1", f"{REF_HV_BIT}; set by the host", skip),
        Expectation(s, "cpuid-hv-signature", {}, facts.hv_signature, ref_sig, skip),
        Expectation(s, "rdtsc", _p(tsd=1, cpl=3), "#GP(0)", f"{REF_RDTSC}; {ref_tsd}", skip),
        Expectation(s, "rdtsc", _p(tsd=0, cpl=3), "ok", REF_RDTSC, skip),
        Expectation(s, "rdtsc", _p(tsd=1, cpl=0), "ok", REF_RDTSC, skip),
        Expectation(s, "rdtsc-intercepted", _p(cpl=0, intercept=int(facts.guest_rdtsc_intercept)), tsc_value,
                    "SDM Vol. 3C 25.1.3, 24.6.2: with RDTSC exiting the host supplies the value", skip),
        Expectation(s, "guest-end", {}, "done", REF_GUEST_END, skip),
    ]
    reasons = ("cpuid", "rdtsc", "hlt", "io") if facts.guest_rdtsc_intercept else ("cpuid", "hlt", "io")
    rows += [Expectation(s, "vmexit", _p(reason=r), AT_LEAST_ONCE, ref_exit, skip) for r in reasons]
    return rows


def guest_soft_plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    skip = None
    if facts.guest_mode != "soft":
        skip = (f"the {facts.guest_mode.upper()} host runs the guest (--host-mode soft forces the software host)"
                if facts.guest_mode in ("svm", "vmx") else f"host mode {facts.guest_mode}: no guest")
    s = "guest-soft"
    faulting = facts.cpuid_faulting
    hv_bit = "1" if faulting else ("1" if facts.hypervisor else "0")
    sig = facts.hv_signature if faulting else hv_signature(facts, info)
    rows = [
        # The guest kernel believes it runs at CPL0; the software host put it at CPL1.
        Expectation(s, "cpl-enter", _p(cpl=1, via="ring-compression"), "1", REF_SOFT_CPL, skip),
        Expectation(s, "cpl-enter", _p(cpl=3, via="iretq"), "3", f"{REF_CPL}; {REF_IRET}", skip),
        Expectation(s, "cpl-return", _p(from_cpl=3, via="ud2"), "1", f"{REF_SOFT_CPL}; {REF_EXC_RETURN}", skip),
        Expectation(s, "cpuid-vendor", _p(leaf=0), vendor_bytes(facts.vendor), REF_VENDOR, skip),
        Expectation(s, "cpuid-hv-bit", {}, hv_bit, f"{REF_HV_BIT}; {REF_SOFT_CPUID}", skip),
        Expectation(s, "cpuid-hv-signature", {}, sig, REF_SOFT_CPUID, skip),
        Expectation(s, "rdtsc", _p(tsd=1, cpl=3), "#GP(0)", f"{REF_RDTSC}; the host keeps CR4.TSD=1 and "
                    "reflects the #GP into the guest's handler", skip),
        Expectation(s, "rdtsc", _p(tsd=0, cpl=3), "ok", f"{REF_RDTSC}; emulated with the guest's virtual TSD=0", skip),
        Expectation(s, "rdtsc", _p(tsd=1, cpl=0), "ok", f"{REF_RDTSC}; emulated: virtual CPL0", skip),
        Expectation(s, "rdtsc-intercepted", _p(cpl=0, intercept=int(facts.guest_rdtsc_intercept)),
                    "host-value" if facts.guest_rdtsc_intercept else "native", REF_SOFT_TRAP, skip),
        Expectation(s, "guest-end", {}, "done", REF_GUEST_END, skip),
    ]
    for reason in ("rdtsc", "out", "hlt", "mov-cr") + (("cpuid",) if faulting else ()):
        rows.append(Expectation(s, "trap", _p(reason=reason), AT_LEAST_ONCE, REF_SOFT_TRAP, skip))
    return rows


def plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    """Every check of a boot. `info`: the firmware's `info` records, used only where the rule
    itself names the CPU's own answer (hv_signature's highest-basic-leaf case)."""
    return host_plan(facts, info) + guest_svm_plan(facts) + guest_vmx_plan(facts) + guest_soft_plan(facts, info)
