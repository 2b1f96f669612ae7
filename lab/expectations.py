"""The architecture rules, in one place.

Every expected value is derived here from the configuration: the accelerator, and QEMU's
own description of the configured CPU model (QOM properties such as `vendor`, `rdtscp`,
`svm`), never from what the firmware printed and never from constants tuned to one
machine. Change `--cpu` and the expectations change with it.

`plan()` lists every check a boot must produce; a check without an observation is an
`error`, never a `pass`.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field

from .ids import check_id

from .catalogue import GUEST_SCOPES, Row, rows

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
    tsc: bool = True  # QOM `tsc`: RDTSC exists (CPUID.1:EDX[4])
    long_mode: bool = True  # QOM `lm` (CPUID 0x80000001 EDX[29]); without it the lab boots its 32-bit host
    expose_kvm: bool = True
    tcg_cpuid: bool = True
    hv_signature: str = "LabRingMinus"
    host_mode: str = "auto"
    guest_rdtsc_intercept: bool = True  # the host's RDTSC intercept (hv-intercept-rdtsc)
    features: tuple[tuple[str, bool], ...] = ()  # every boolean QOM property of the model (CPUID bits)
    # The machine running the accelerator faults CPUID at CPL>0 itself (Linux's `cpuid_fault`
    # flag: Intel MSR 0xCE[31], AMD CpuidUserDis). Code a KVM runs natively on that CPU (kvm_pvm's
    # CPL3) only faults where it does (lab/deviations.py kvm_pvm-cpuid-cpl3-native).
    host_cpuid_fault: bool = True

    def has(self, feature: str) -> bool:
        """A CPUID feature by its QOM property name (`rdtscp`, `umip`, `pmu`, ...): what a
        catalogue entry's `needs` names."""
        if feature.startswith("accel:"):  # offered by the accelerator, not a CPUID bit
            return bool(getattr(self, feature[6:].replace("-", "_")))
        if hasattr(self, feature) and isinstance(getattr(self, feature), bool):
            return getattr(self, feature)
        return dict(self.features).get(feature, False)

    @classmethod
    def from_qemu(cls, accel: str, kvm_module: str | None, qom: dict, *, hv_signature: str, host_mode: str,
                  guest_rdtsc_intercept: bool = True, host_cpuid_fault: bool = True) -> "Facts":
        return cls(
            accel=accel,
            kvm_module=kvm_module if accel == "kvm" else None,
            vendor=str(qom.get("vendor", "")),
            rdtscp=bool(qom.get("rdtscp", False)),
            svm=bool(qom.get("svm", False)),
            hypervisor=bool(qom.get("hypervisor", False)),
            syscall=bool(qom.get("syscall", True)),
            tsc=bool(qom.get("tsc", True)),
            long_mode=bool(qom.get("lm", True)),
            expose_kvm=bool(qom.get("kvm", True)),
            tcg_cpuid=bool(qom.get("tcg-cpuid", True)),
            hv_signature=hv_signature,
            host_mode=host_mode,
            guest_rdtsc_intercept=guest_rdtsc_intercept,
            host_cpuid_fault=host_cpuid_fault,
            features=tuple(sorted((k, v) for k, v in qom.items() if isinstance(v, bool))),
        )

    @property
    def guest_mode(self) -> str:
        """Which host runs the guest (firmware/svm.c hv_main): auto picks VMX, then SVM, then the
        software host; a forced SVM or VMX host the CPU lacks runs no guest (`hv=none`)."""
        if self.host_mode == "auto":
            return "vmx" if self.vmx else "svm" if self.svm else "soft"
        if self.host_mode in ("svm", "vmx") and not getattr(self, self.host_mode):
            return "none"
        return self.host_mode

    @property
    def cpuid_faulting(self) -> bool:
        """Whether the virtual CPU offers CPUID faulting (MSR_PLATFORM_INFO 0xCE bit 31; enabled
        by MSR_MISC_FEATURES_ENABLES 0x140 bit 0, Intel SDM Vol. 4 2.17). KVM emulates it for every
        guest whatever the vendor (arch/x86/kvm: CPUID always exits to KVM, which injects #GP(0)
        at CPL>0 when it is enabled); QEMU 7.2's TCG does not implement either MSR. The rule holds
        at every CPL>0 on kvm_intel and kvm_amd; kvm_pvm runs CPL3 natively, so there CPUID
        faults only where the host CPU faults it (host_cpuid_fault; docs/platform.md)."""
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
    # What the skip follows from: MODEL (the virtual CPU lacks the feature, or the engine does
    # not offer it) or SETUP (the host mode chosen runs another scope): counted apart in reports.
    skip_cause: str = ""
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
def cpl_gate(gate: int, cpl: int, *, present: bool = True, protected: bool = True) -> str:
    """An instruction a control bit forbids outside CPL0 (RDTSC/RDTSCP under CR4.TSD, SDM
    Vol. 2B; SGDT/SIDT/SLDT/SMSW/STR under CR4.UMIP, SDM Vol. 3A 2.5): #UD if the CPU lacks
    it (decode-time, before privilege checks); #GP(0) iff the bit is set, CPL>0 and CR0.PE=1;
    otherwise it completes."""
    if not present:
        return "#UD"
    if gate and cpl > 0 and protected:
        return "#GP(0)"
    return "ok"


def tsc_read(insn: str, tsd: int, cpl: int, *, rdtscp_present: bool = True, protected: bool = True) -> str:
    """RDTSC/RDTSCP: RDTSCP needs CPUID.80000001H:EDX[27]; then the CR4.TSD rule."""
    return cpl_gate(tsd, cpl, present=insn != "rdtscp" or rdtscp_present, protected=protected)


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


# A model without long mode boots the 32-bit host kernel (firmware/README.md "The 32-bit host").
NO_HV_32 = "the 32-bit host kernel (no long mode: QOM lm=false) runs no hypervisor (info hv=none)"
LONG_MODE_ONLY = ("runs in 64-bit mode only (SDM Vol. 2B SYSCALL/SYSRET: SYSRETQ and the lab's SYSCALL probes "
                  "are 64-bit); the host kernel is 32-bit (no long mode: QOM lm=false)")


def _said(facts: Facts, text: str) -> str:
    """A reason in the engine's vocabulary: QEMU describes a model by QOM properties, Bochs by
    the CPUID table it dumps for the model (lab/bochs.py)."""
    if facts.accel != "bochs":
        return text
    return re.sub(r"QOM `?(\w+)`?(=\w+)?", "Bochs' CPUID dump of the model", text)


def _guest_skip(facts: Facts, scope: str) -> str | None:
    """Why a guest scope does not run in this configuration (None: it runs)."""
    host = scope.removeprefix("guest-")
    if not facts.long_mode:
        return _said(facts, NO_HV_32)
    if host == "svm" and not facts.svm:
        if facts.accel == "kvm":
            return f"no SVM under KVM ({facts.kvm_module or 'unknown module'} gives its guests no SVM)"
        return _said(facts, "no SVM: this CPU model has none (CPUID 0x80000001 ECX[2]; QOM `svm`)")
    if host == "vmx" and not facts.vmx:
        return "no VMX: this CPU model has none (CPUID.1:ECX[5]; SDM Vol. 3C 23.6)"
    if facts.guest_mode == host:
        return None
    if facts.guest_mode == "none":
        if facts.host_mode in ("svm", "vmx"):
            return f"--host-mode {facts.host_mode} on a CPU without {facts.host_mode.upper()}: no guest runs"
        return "host mode none: no guest runs"
    if host == "soft":
        return f"the {facts.guest_mode.upper()} host runs the guest (--host-mode soft forces the software host)"
    return f"the {facts.guest_mode.upper() if facts.guest_mode != 'soft' else 'software'} host runs the guest"


MODEL, SETUP = "cpu-model", "setup"  # Expectation.skip_cause


def _skip_cause(facts: Facts, row: Row, reason: str | None) -> str:
    """A guest scope another host mode runs is the setup's doing; every other skip of the plan
    follows from what the CPU model (or the engine) offers."""
    if reason is None:
        return ""
    host = row.scope.removeprefix("guest-")
    if row.scope != "host" and facts.long_mode and not (host == "svm" and not facts.svm) \
            and not (host == "vmx" and not facts.vmx) and reason == _guest_skip(facts, row.scope):
        return SETUP
    return MODEL


def _skip(facts: Facts, row: Row) -> str | None:
    if row.scope != "host" and _guest_skip(facts, row.scope):
        return _guest_skip(facts, row.scope)
    if row.entry.long_mode_only and not facts.long_mode:
        return _said(facts, LONG_MODE_ONLY)
    if row.entry.family == "syscall" and not facts.syscall:
        return _said(facts, "no SYSCALL/SYSRET on this CPU model (CPUID 0x80000001 EDX[11]; QOM `syscall`)")
    for gate in row.entry.gates:
        if gate.needs.startswith("accel:") and not facts.has(gate.needs):
            return f"{facts.accel} does not offer {gate.needs[6:]} ({gate.name}): not run"
        if gate.needs and not facts.has(gate.needs):
            return (f"CR4.{gate.name} is reserved on this CPU model (no `{gate.needs}`: setting it is a #GP(0), "
                    "SDM Vol. 3A 2.5): not judged")
    return None


def _soft(scope: str) -> bool:
    return scope == "guest-soft"


def _exit_seen(f: Facts, scope: str, p: dict) -> str | None:
    """Each reason the host intercepts (or, soft: emulates) is seen at least once; RDTSC only
    with the RDTSC intercept on, CPUID under the software host only with CPUID faulting."""
    if p["reason"] == "rdtsc" and not f.guest_rdtsc_intercept:
        return None
    if p["reason"] == "cpuid" and _soft(scope) and not f.cpuid_faulting:
        return None
    return AT_LEAST_ONCE


# rule name -> (facts, scope, params, info) -> expected value, or None: not a check here.
RULES = {
    "ring_entered": lambda f, s, p, i: p["cpl"],  # IRETQ/SYSRET load CS (so the CPL) from the frame / STAR
    "ring_returned": lambda f, s, p, i: "0",  # the #UD handler's gate and LSTAR's CS are DPL0
    "guest_entered": lambda f, s, p, i: p["cpl"],  # VMRUN/VM entry: its own CPL0; soft: CPL1
    "guest_returned": lambda f, s, p, i: "1" if _soft(s) else "0",  # the guest kernel's CPL
    "privileged": lambda f, s, p, i: privileged(p["insn"], int(p["cpl"])),
    # CLI/STI: #GP(0) iff CPL > IOPL (SDM Vol. 2A CLI/STI, CR4.VME=PVI=0).
    "iopl_sensitive": lambda f, s, p, i: "#GP(0)" if int(p["cpl"]) > int(p.get("iopl", 0)) else "ok",
    # IN/OUT: CPL <= IOPL, or the port's bit clear in the TSS I/O bitmap (SDM Vol. 1 18.5).
    "io_allowed": lambda f, s, p, i: "ok" if int(p["cpl"]) <= int(p["iopl"]) or p["allow"] == "1" else "#GP(0)",
    # RDPMC: #GP(0) at CPL>0 with CR4.PCE=0; else counter 0 exists only with a PMU (QOM `pmu`).
    "rdpmc": lambda f, s, p, i: ("#GP(0)" if int(p["cpl"]) > 0 and p["pce"] == "0"
                                 else "ok" if f.has("pmu") else "#GP(0)"),
    # MOV to CR4 setting a feature's bit: allowed with the feature, reserved (#GP(0)) without.
    "cr4_reserved": lambda f, s, p, i: "ok" if f.has(p["bit"]) else "#GP(0)",
    "vendor": lambda f, s, p, i: vendor_bytes(f.vendor),
    "hv_bit": lambda f, s, p, i: "1" if f.hypervisor else "0",
    "hv_signature": lambda f, s, p, i: hv_signature(f, i),
    # The lab's hosts set the bit and answer 0x40000000 themselves; the software host only
    # where CPUID faulting lets it see the guest's CPUID (Facts.cpuid_faulting).
    "guest_hv_bit": lambda f, s, p, i: "1" if (not _soft(s) or f.cpuid_faulting or f.hypervisor) else "0",
    "guest_hv_signature": lambda f, s, p, i: (f.hv_signature if (not _soft(s) or f.cpuid_faulting)
                                              else hv_signature(f, i)),
    "guest_tsc_value": lambda f, s, p, i: ((None if int(p["intercept"]) != f.guest_rdtsc_intercept else
                                            "host-value" if f.guest_rdtsc_intercept else "native")),
    "guest_end": lambda f, s, p, i: "done",
    "exit_seen": lambda f, s, p, i: _exit_seen(f, s, p),
}


def _expected(facts: Facts, row: Row, info: dict[str, str]) -> str | None:
    p = row.params
    if row.entry.rule == "cpl_gate":
        gate = row.entry.gate
        return cpl_gate(int(p[gate.param]), int(p["cpl"]), present=facts.has(row.entry.needs) if row.entry.needs else True,
                        protected=p.get("mode") != "real")
    return RULES[row.entry.rule](facts, row.scope, p, info)


def scope_plan(facts: Facts, scope: str, info: dict[str, str] | None = None) -> list[Expectation]:
    """One expectation per catalogue row of the scope (lab/catalogue.py), by the row's rule."""
    out = []
    for r in rows(scope):
        expected = _expected(facts, r, info or {})
        if expected is not None:
            why = _skip(facts, r)
            out.append(Expectation(scope, r.probe, r.params, expected, r.entry.ref, why, _skip_cause(facts, r, why)))
    return out


def host_plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    return scope_plan(facts, "host", info)


def plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    """Every check of a boot. `info`: the firmware's `info` records, used only where the rule
    itself names the CPU's own answer (hv_signature's highest-basic-leaf case)."""
    return [e for scope in ("host", *GUEST_SCOPES) for e in scope_plan(facts, scope, info)]
