"""The architecture rules, in one place.

Every expected value is derived here from the configuration: the accelerator, and QEMU's
own description of the configured CPU model (QOM properties such as `vendor`, `rdtscp`,
`svm`), never from what the firmware printed and never from constants tuned to one
machine. Change `--cpu` and the expectations change with it.

`plan()` lists every check a boot must produce; a check without an observation is an
`error`, never a `pass`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .ids import check_id

from .catalogue import GUEST_SCOPES, PG_FAMILY, SMM_SCOPE, Row, rows

AT_LEAST_ONCE = ">=1"


# fact -> (the firmware's `info` key for the CPU's answer, the QOM property stating it).
CPU_FACTS = {
    "vendor": ("cpuid.vendor", "vendor"),  # CPUID.0 EBX,EDX,ECX
    "family": ("cpuid.family", "family"), "model": ("cpuid.model", "model"),
    "stepping": ("cpuid.stepping", "stepping"),  # CPUID.1:EAX
    "max_leaf": ("cpuid.max", "level"),  # CPUID.0:EAX
    "tsc": ("cpuid.tsc", "tsc"), "mmx": ("cpuid.mmx", "mmx"),  # CPUID.1:EDX[4], [23]
    "vmx": ("cpuid.vmx", "vmx"), "hypervisor": ("cpuid.hv", "hypervisor"),  # CPUID.1:ECX[5], [31]
    "umip": ("cpuid.umip", "umip"),  # CPUID.(07H,0):ECX[2]
    "svm": ("cpuid.svm", "svm"),  # CPUID.80000001H:ECX[2]
    "syscall": ("cpuid.syscall", "syscall"), "rdtscp": ("cpuid.rdtscp", "rdtscp"),
    "long_mode": ("cpuid.lm", "lm"),  # CPUID.80000001H:EDX[11], [27], [29]
    # MSR-enumerated: MSR_PLATFORM_INFO 0xCE[31] (Intel SDM Vol. 4 2.17). No QOM property states
    # it: the accelerator's offer is the configured value (Facts.cpuid_faulting).
    "cpuid_faulting": ("msr.cpuid_faulting", ""),
}
# Facts the accelerator, not a QOM property, states (every QEMU configuration names them).
ACCEL_FACTS = ("cpuid_faulting",)


# Facts the catalogue's own CPUID probes check (cpuid-vendor, cpuid-hv-bit: the value CPUID
# returns is the check): their rules keep the configured value, so they and cpu-fact both see
# a CPU that shows something else.
PROBED_FACTS = ("vendor", "hypervisor")


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _cpu_value(fact: str, raw: str) -> object:
    if fact == "vendor":
        return raw.rstrip("\0")  # QEMU NUL-pads a short vendor (vendor_bytes)
    if fact in ("family", "model", "stepping", "max_leaf"):
        return int(raw, 0)
    return raw == "1"


def show_fact(v: object) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


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
    mmx: bool = True  # QOM `mmx` (CPUID.1:EDX[23]): with family 5, whether RDPMC exists (rdpmc())
    family: int | None = None  # QOM `family` (CPUID.1:EAX, the displayed family); None: not stated
    model: int | None = None  # QOM `model`
    stepping: int | None = None  # QOM `stepping`
    max_leaf: int | None = None  # QOM `level` (CPUID.0:EAX)
    pmu_version: int | None = None  # CPUID.0AH:EAX[7:0]: only the CPU states it (QEMU passes the host's)
    pmu_counters: int | None = None  # CPUID.0AH:EAX[15:8]: general-purpose counters
    stated: tuple[str, ...] = ()  # the facts the configuration names (what cpu-fact compares)
    from_cpu: tuple[tuple[str, str, str], ...] = ()  # (fact, configured, CPU) where the CPU differs
    cpuid_faulting_cpu: bool | None = None  # MSR_PLATFORM_INFO[31] as the CPU read it (Facts.seen)
    # Ring -2 (the `ring-2` scope, smm_plan): the QEMU machine (`-M`, with its options), whether
    # this KVM runs SMM (KVM_CAP_X86_SMM), and the SMIs per measurement the lab asked for (smm=<n>).
    machine: str = ""
    kvm_smm: bool = False
    smis: int = 0

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
            mmx=bool(qom.get("mmx", True)),
            family=_int(qom.get("family")), model=_int(qom.get("model")), stepping=_int(qom.get("stepping")),
            max_leaf=_int(qom.get("level")),
            features=tuple(sorted((k, v) for k, v in qom.items() if isinstance(v, bool))),
            stated=tuple(f for f, (_, prop) in CPU_FACTS.items() if prop in qom or f in ACCEL_FACTS),
        )

    def configured(self, fact: str) -> object:
        return dict(self.features).get("umip", False) if fact == "umip" else getattr(self, fact)

    def seen(self, info: dict[str, str] | None) -> "Facts":
        """The CPU's architectural facts: these Facts with every fact the firmware read from
        CPUID at boot (`info cpuid.*`, firmware/cpuinfo.c) in place of the configuration's. The
        rules apply to what the CPU shows (SDM Vol. 2A CPUID: software detects a feature by
        CPUID); `from_cpu` keeps where the two differ."""
        if not info:
            return self
        new: dict[str, object] = {}
        for fact, (key, _) in CPU_FACTS.items():
            if key in info:
                new[fact] = _cpu_value(fact, info[key])
        differ = tuple((f, show_fact(self.configured(f)), show_fact(v)) for f, v in new.items()
                       if f in self.stated and v != self.configured(f))
        for fact in PROBED_FACTS:  # what CPUID returns is those probes' own check: kept as configured
            new.pop(fact, None)
        for fact, key in (("pmu_version", "cpuid.pmu_version"), ("pmu_counters", "cpuid.pmu_counters")):
            if key in info and info[key].isdigit():
                new[fact] = int(info[key])
        if "cpuid_faulting" in new:  # a property over the accelerator's offer: the CPU's read is a field
            new["cpuid_faulting_cpu"] = new.pop("cpuid_faulting")
        umip = new.pop("umip", None)
        features = self.features if umip is None else tuple(sorted({**dict(self.features), "umip": umip}.items()))
        return dataclasses.replace(self, **new, features=features, from_cpu=differ)

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
        faults only where the host CPU faults it (host_cpuid_fault; docs/platform.md). That is the
        configured value; once the CPU's own MSR read is known (Facts.seen), it is the CPU's."""
        return self.cpuid_faulting_cpu if self.cpuid_faulting_cpu is not None else self.accel == "kvm"

    @property
    def rdpmc_insn(self) -> bool:
        """RDPMC exists on this CPU (rdpmc_present): a fact deviations can name."""
        return rdpmc_present(self)

    @property
    def smi_count_msr(self) -> bool:
        """MSR_SMI_COUNT (0x34) exists on this CPU model (smi_count_msr_present): a fact
        deviations can name."""
        return smi_count_msr_present(self)

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


def rdpmc_present(f: Facts) -> bool:
    """SDM Vol. 2B RDPMC: "introduced into the IA-32 Architecture in the Pentium Pro processor
    and the Pentium processor with MMX technology": family 6 and later, or family 5 with MMX.
    Unknown family (not stated, not read): present."""
    return f.family is None or f.family >= 6 or (f.family == 5 and f.mmx)


def pmc_exists(f: Facts, counter: int) -> bool:
    """Whether RDPMC's ECX names a counter. AMD64: PerfCtr0-3 always (APM Vol. 3 RDPMC: ECX
    0-3 legacy counters; more with PerfCtrExtCore). Intel with leaf 0AH: CPUID.0AH:EAX[7:0] is
    the version (0: no architectural counters) and [15:8] the general-purpose counters (SDM
    Vol. 3B 20.2.1, Vol. 2B RDPMC "valid ECX ... per CPUID.0AH"); before leaf 0AH, the SDM's
    RDPMC table lists PMC0-1 for P6, Pentium with MMX and the Pentium 4's 18 counters."""
    if f.amd_cpuid_semantics:
        return counter < 4
    if f.max_leaf is not None and f.max_leaf >= 0xA:
        if f.pmu_version is None:  # not read (no firmware record): QEMU's switch stands in
            return f.has("pmu")
        return f.pmu_version > 0 and counter < (f.pmu_counters or 0)
    return counter < (18 if f.family == 15 else 2)


def rdpmc(f: Facts, cpl: int, pce: int, counter: int) -> str:
    """RDPMC (SDM Vol. 2B, APM Vol. 3): #UD on a CPU without it; #GP(0) at CPL>0 with
    CR4.PCE=0 (CR0.PE=1), or where ECX names no counter; else it reads the counter."""
    if not rdpmc_present(f):
        return "#UD"
    if cpl > 0 and not pce:
        return "#GP(0)"
    return "ok" if pmc_exists(f, counter) else "#GP(0)"


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
    if row.entry.family == PG_FAMILY and row.params.get("umip") == "1" and not facts.has("umip"):
        return PG_NO_UMIP
    for gate in row.entry.gates:
        if gate.needs.startswith("accel:") and not facts.has(gate.needs):
            if gate.needs == "accel:cpuid-faulting" and facts.cpuid_faulting_cpu is not None:
                return ("the CPU does not offer CPUID faulting (MSR_PLATFORM_INFO 0xCE[31] = 0, as it reported at "
                        "boot; Intel SDM Vol. 4 2.17): not run")
            return f"{facts.accel} does not offer {gate.needs[6:]} ({gate.name}): not run"
        if gate.needs and not facts.has(gate.needs):
            said = ("as the CPU reported it at boot" if gate.needs in (x[0] for x in facts.from_cpu) or
                    any(k == gate.needs for k in facts.stated) else "as configured")
            return (f"CR4.{gate.name} is reserved on this CPU (`{gate.needs}`=0 {said}: setting it is a #GP(0), "
                    "SDM Vol. 3A 2.5; the firmware gates on its own CPUID read): not judged")
    return None


# -- the Popek-Goldberg family (lab/catalogue.py PG_INSNS) -----------------------------------
# The guest kernel runs at CPL0 under the SVM and VMX hosts (VMRUN / VM entry load its own
# CS, GDTR, IDTR, LDTR, TR and RFLAGS: APM Vol. 2 15.5.1, SDM Vol. 3C 26.3.2), which intercept
# none of these instructions (firmware/svm.c, vmx.c: CPUID, RDTSC, HLT, I/O, VMMCALL; no
# descriptor-table exiting, CR0 guest/host mask 0): each runs natively on the guest's state and
# CR4.UMIP binds only CPL>0 (SDM Vol. 3A 2.5): `same`. Under the software host it runs at CPL1
# (ring compression) with IOPL 0, on the host's GDT, IDT, TR and LDTR (its own tables are
# virtual: firmware/soft_trap.c) and with the guest's CR4.UMIP in the real CR4: an instruction
# that faults there traps to the host, which emulates it (`traps`); one that completes shows
# the real state, never the guest's (its tables live in its window, the host's outside it:
# firmware/hv_guest.c hv_guest_load), so the guest sees what a CPL0 kernel would not (`leaks`).
PG_NO_UMIP = ("CR4.UMIP is reserved on this CPU (`umip`=0: SDM Vol. 3A 2.5): the guest runs its umip=1 "
              "pass only where its CPUID offers UMIP")


def _pg(scope: str, faults_at_cpl1: bool) -> str:
    if scope != "guest-soft":
        return "same"
    return "traps" if faults_at_cpl1 else "leaks"


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
    "rdpmc": lambda f, s, p, i: rdpmc(f, int(p["cpl"]), int(p["pce"]), int(p["counter"])),
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
    # Completes at any CPL outside virtual-8086 mode and shows the real state (PUSHF, POPF, LAR,
    # LSL, VERR, VERW, PUSH, MOV from CS: their entries' references).
    "pg_reveals": lambda f, s, p, i: _pg(s, False),
    # #GP at CPL1 on the host's tables (POP FS of a DPL0 segment, far CALL/JMP through a gate
    # selector past the host GDT's limit, INT n through a vector the host's IDT has no gate
    # for, far RET to RPL0): the host emulates it.
    "pg_faults": lambda f, s, p, i: _pg(s, True),
    # SGDT, SIDT, SLDT, SMSW, STR: #GP(0) at CPL>0 iff CR4.UMIP (SDM Vol. 3A 2.5).
    "pg_umip": lambda f, s, p, i: _pg(s, p["umip"] == "1"),
}


def _expected(facts: Facts, row: Row, info: dict[str, str]) -> str | None:
    p = row.params
    if row.entry.rule == "cpl_gate":
        gate = row.entry.gate
        return cpl_gate(int(p[gate.param]), int(p["cpl"]), present=facts.has(row.entry.needs) if row.entry.needs else True,
                        protected=p.get("mode") != "real")
    return RULES[row.entry.rule](facts, row.scope, p, info)


def scope_plan(facts: Facts, scope: str, info: dict[str, str] | None = None) -> list[Expectation]:
    """One expectation per catalogue row of the scope (lab/catalogue.py), by the row's rule,
    applied to the CPU's facts where the firmware reported them (Facts.seen)."""
    facts = facts.seen(info)
    out = []
    for r in rows(scope):
        expected = _expected(facts, r, info or {})
        if expected is not None:
            why = _skip(facts, r)
            out.append(Expectation(scope, r.probe, r.params, expected, r.entry.ref, why, _skip_cause(facts, r, why)))
    return out


def host_plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    return scope_plan(facts, "host", info)


REF_CPU_FACT = ("the configuration's CPU (QEMU's QOM model) against the CPU's own CPUID answer at boot "
                "(firmware/cpuinfo.c; SDM Vol. 2A / APM Vol. 3 CPUID): the accelerator must show what it was told")


def cpu_fact_plan(facts: Facts) -> list[Expectation]:
    """`cpu-fact`: one check per fact the configuration states; expected is the configured
    value, the observation the CPU's (judge.py reads it from the `info cpuid.*` records)."""
    return [Expectation("host", "cpu-fact", {"fact": f}, show_fact(facts.configured(f)), REF_CPU_FACT)
            for f in CPU_FACTS if f in facts.stated]


# -- ring -2: System Management Mode (lab/catalogue.py SMM_SCOPE, firmware/smm.c) --------------
# Intel family 6 models whose MSR table in the SDM (Vol. 4 ch. 2) lists MSR_SMI_COUNT (34H):
# Nehalem (1AH, 1EH, 1FH, 2EH) and every later core (Westmere, Sandy/Ivy Bridge, Haswell,
# Broadwell, Skylake and its successors) and Atom since Silvermont (Airmont, Goldmont, Tremont),
# Knights Landing/Mill. Bonnell/Saltwell Atoms, Core 2 (0FH, 17H, 1DH) and family 15 have none.
SMI_COUNT_MODELS = frozenset({
    0x1A, 0x1E, 0x1F, 0x2E, 0x25, 0x2C, 0x2F, 0x2A, 0x2D, 0x3A, 0x3E, 0x3C, 0x3F, 0x45, 0x46,
    0x3D, 0x47, 0x4F, 0x56, 0x4E, 0x5E, 0x55, 0x8E, 0x9E, 0x66, 0x6A, 0x6C, 0x7D, 0x7E, 0x8C,
    0x8D, 0x8F, 0x97, 0x9A, 0xA5, 0xA6, 0xA7, 0xB7, 0xBA, 0xBF, 0xCF, 0xAA, 0xAC, 0xAD, 0xAE,
    0x37, 0x4A, 0x4D, 0x5A, 0x5D, 0x4C, 0x5C, 0x5F, 0x7A, 0x86, 0x96, 0x9C, 0xBE, 0x57, 0x85,
})
# SeaBIOS relocates every CPU's SMBASE from the reset default 30000H (SDM Vol. 3C 32.11) to
# A0000H on QEMU (its src/fw/smm.c), the ASEG the chipsets' SMRAM control maps.
SEABIOS_SMBASE = 0xA0000
SMRAM_D_LCK = 0x10  # i440FX SMRAM 72h / Q35 SMRAMC 9Dh bit 4: D_OPEN can no longer be set


def smi_count_msr_present(f: Facts) -> bool:
    """MSR_SMI_COUNT (0x34): an Intel model-specific MSR (SDM Vol. 4 ch. 2, SMI_COUNT_MODELS);
    AMD64 defines none (APM Vol. 2 App. A). An Intel model whose family or model is not stated
    is taken to have it (QEMU's Intel models all state both)."""
    if f.vendor != "GenuineIntel":
        return False
    if f.family is None or f.model is None:
        return True
    return f.family == 6 and f.model in SMI_COUNT_MODELS


def smm_skip(f: Facts) -> str | None:
    """Why the ring -2 scope does not run in this configuration (None: it runs). From the
    configuration only: the machine, its `smm=` option, the accelerator's SMM support."""
    from .config import SMM_MACHINES  # config imports the catalogue, not the rules

    base, *opts = f.machine.split(",") if f.machine else ("",)
    if f.accel == "bochs":
        return "Bochs boots its own BIOS from an ISO: the lab raises SMIs on QEMU's pc and q35 only"
    if base not in SMM_MACHINES:
        return (f"no SMM on {base or 'this machine'}: QEMU's microvm has no SMRAM and no APM control port 0xB2 "
                "(run --machine pc or q35)")
    if "smm=off" in opts:
        return f"-machine {f.machine}: QEMU runs it without SMM (no SMRAM, OUT 0xB2 raises no SMI)"
    if f.accel == "kvm" and not f.kvm_smm:
        return (f"{f.kvm_module or 'this KVM'} offers no SMM (KVM_CAP_X86_SMM = 0): QEMU runs {base} with smm off, "
                "so no SMI is ever raised")
    if f.smis <= 0:
        return "no smm=<n> on the kernel command line: the firmware raised no SMI"
    return None


def _smm_row_skip(f: Facts, row: Row, info: dict[str, str]) -> str | None:
    """Rows that depend on what the platform reported at boot: the lab's handler needs SMRAM
    unlocked; a count needs the MSR the CPU offers."""
    if "smm.smram" in info and int(info["smm.smram"], 0) & SMRAM_D_LCK and (
            row.params.get("handler") == "lab" or row.probe == "smram-hidden"):
        return (f"SMRAM is locked (D_LCK set: {info['smm.smram']}; chipset datasheet SMRAM register): D_OPEN cannot be "
                "set, so ring 0 can neither look at SMRAM nor install its own SMI handler")
    if row.probe == "smi-count" and info.get("smm.msr_smi_count") == "0":
        return ("the CPU offers no MSR_SMI_COUNT (RDMSR 0x34 was #GP(0) at boot, as smi-count-msr judges): "
                "no count to read")
    return None


SMM_RULES = {
    "smi_time": lambda f, p: "stolen",  # the TSC counts through SMM (SDM Vol. 3B 18.17)
    "smi_count_msr": lambda f, p: "ok" if smi_count_msr_present(f) else "#GP(0)",
    # One SMI per OUT to APM_CNT (the chipset raises SMI# on the write); none for APM_STS.
    "smi_count": lambda f, p: str(f.smis) if p["port"] == "0xb2" else "0",
    "smm_unchanged": lambda f, p: "unchanged",  # RSM restores what the SMI saved (SDM 32.10)
    "rsm_outside": lambda f, p: "#UD",
    "smram_hidden": lambda f, p: "hidden",
    "smm_entries": lambda f, p: str(f.smis),  # each SMI enters at SMBASE+8000H
    "smm_cs": lambda f, p: hex(SEABIOS_SMBASE >> 4),  # Table 32-4: CS selector = SMBASE >> 4
    "smm_cr0": lambda f, p: "0x0",  # Table 32-4: CR0.PE and PG cleared
    "smm_saved_rip": lambda f, p: "boundary",  # the save area holds the next instruction's RIP
    "smm_saved_state": lambda f, p: "kernel",
    "smm_alters": lambda f, p: "rbx",  # RSM loads the RBX the handler wrote, and only that changed
}


def smm_plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    """The `ring-2` scope: one expectation per catalogue row, skipped as a whole with the reason
    where the configuration has no SMM (smm_skip)."""
    facts = facts.seen(info)
    whole = smm_skip(facts)
    out = []
    for r in rows(SMM_SCOPE):
        why = whole or _smm_row_skip(facts, r, info or {})
        out.append(Expectation(SMM_SCOPE, r.probe, r.params, SMM_RULES[r.entry.rule](facts, r.params), r.entry.ref,
                               why, MODEL if why else ""))
    return out


def with_smm(facts: Facts, machine: str, kernel_args: tuple[str, ...], kvm_smm: bool) -> Facts:
    """`facts` with the ring -2 configuration: the machine, this KVM's SMM support, and the
    SMIs the kernel command line asks for (smm=<n>)."""
    smis = next((int(a[4:]) for a in kernel_args if a.startswith("smm=") and a[4:].isdigit()), 0)
    return dataclasses.replace(facts, machine=machine, kvm_smm=kvm_smm, smis=smis)


def plan(facts: Facts, info: dict[str, str] | None = None) -> list[Expectation]:
    """Every check of a boot. `info`: the firmware's `info` records: the CPU's own CPUID
    answers (the rules apply to them: Facts.seen) and the `cpu-fact` comparisons; without it
    (before the boot) the configuration's facts stand in."""
    cpu = cpu_fact_plan(facts) if info is not None else []
    return cpu + [e for scope in ("host", *GUEST_SCOPES) for e in scope_plan(facts, scope, info)] \
        + smm_plan(facts, info)
