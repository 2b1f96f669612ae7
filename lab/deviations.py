"""Known deviations of accelerators from the architecture, as data.

Keyed by what the lab detected (accelerator and the kernel module behind /dev/kvm), never
by host name. A deviation turns the matching check into `xfail` when the accelerator shows
exactly the deviant value, and into `xpass` if it stops deviating. A deviation that would
stop the machine (a KVM internal error) is not run at all: its checks are `skip` with the
reason, and `kernel_args` tells the firmware to leave the probe out.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import catalogue
from .expectations import Expectation, Facts


ANY = "(any other value)"  # `observed` of a deviation found by comparison: its values are in the check


@dataclass(frozen=True)
class Deviation:
    name: str
    accel: str
    kvm_module: str | None
    scope: str
    probe: str
    params: dict[str, str]  # must all match the check's params
    observed: str | None  # the deviant value; None: the probe is not run (it would hang QEMU)
    reason: str
    skip_arg: str | None = None  # kernel `skip=` word that keeps the probe from running
    when: tuple[tuple[str, bool], ...] = ()  # CPU model facts it needs (Facts.has), e.g. no `umip`

    def matches(self, observed: str | None) -> bool:
        return observed is not None and (self.observed == ANY or observed == self.observed)

    def applies(self, facts: Facts, exp: Expectation) -> bool:
        if facts.accel != self.accel or facts.kvm_module != self.kvm_module:
            return False
        if exp.scope != self.scope or exp.probe != self.probe:
            return False
        if any(facts.has(feature) != value for feature, value in self.when):
            return False
        # Only where the rule expects something else: an accelerator that happens to follow
        # the rule in this configuration passes (never an xpass by accident).
        if self.observed is not None and self.observed == exp.expected:
            return False
        return all(exp.params.get(k) == v for k, v in self.params.items())


KVM_PVM = "kvm_pvm"
DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "kvm_pvm-rdtsc-tsd-cpl3", "kvm", KVM_PVM, "host", "rdtsc", {"tsd": "1", "cpl": "3"}, "ok",
        "kvm_pvm does not enforce CR4.TSD at CPL3: RDTSC completes (PVM runs guest user mode "
        "with the host's CR4)",
    ),
    Deviation(
        "kvm_pvm-rdtsc-tsd-cpl3", "kvm", KVM_PVM, "guest-soft", "rdtsc", {"tsd": "1", "cpl": "3"}, "ok",
        "kvm_pvm does not enforce CR4.TSD at CPL3: the guest's user-mode RDTSC never traps, so the "
        "software host cannot apply the guest's virtual TSD",
    ),
    Deviation(
        "kvm_pvm-syscall-cpl3", "kvm", KVM_PVM, "host", "cpl-return", {"from_cpl": "3", "via": "syscall"}, "3",
        "kvm_pvm: SYSCALL from CPL3 jumps to LSTAR but stays at CPL3 (CS reads 0x33)",
    ),
    # Found by comparison (lab/expectations.py cpu_fact_plan): the fact, the configured and the
    # CPU's value are in the check's reason, and the rules judge the CPU's value (Facts.seen).
    Deviation(
        "kvm_pvm-cpuid-differs", "kvm", KVM_PVM, "host", "cpu-fact", {}, ANY,
        "kvm_pvm's CPUID does not show all QEMU configured (it passes some of the host CPU's bits through)",
    ),
    Deviation(
        "kvm_pvm-cpuid-cpl3-native", "kvm", KVM_PVM, "host", "cpuid", {"faulting": "1", "cpl": "3"}, "ok",
        "kvm_pvm runs CPL3 natively on a host CPU without CPUID faulting (no `cpuid_fault` in the host's "
        "/proc/cpuinfo): CPUID there completes although MSR 0x140[0] is set; CPL1/2 (emulated) fault",
        when=(("host_cpuid_fault", False),),
    ),
    Deviation(
        "kvm_pvm-rdtscp-emulation", "kvm", KVM_PVM, "host", "rdtscp", {}, None,
        "kvm_pvm: executing RDTSCP (absent from its CPUID) is a KVM internal error that stops "
        "QEMU; not run under kvm_pvm",
        skip_arg="rdtscp",
    ),
    # -- the privilege atlas (lab/catalogue.py) ---------------------------------------------------
    Deviation(
        "tcg-cr4-reserved-loop", "tcg", None, "host", "cr4-reserved", {"bit": "umip"}, None,
        "QEMU 7.2 TCG: MOV to CR4 with a reserved bit (UMIP on a model without it) raises no #GP: its "
        "helper_write_crN takes an SVM_EXIT_ERR #VMEXIT outside any guest and loops, so QEMU never ends "
        "(measured; newer QEMU raises #GP(0)); not run under TCG",
        skip_arg="cr4-reserved", when=(("umip", False),),
    ),
    Deviation(
        "kvm_pvm-umip-offered", "kvm", KVM_PVM, "host", "cr4-reserved", {"bit": "umip"}, "ok",
        "kvm_pvm accepts CR4.UMIP on a CPU whose CPUID enumerates no UMIP (CPUID.(07H,0):ECX[2]=0 as the CPU "
        "reported it): the reserved bit is set without #GP(0)", when=(("umip", False),),
    ),
    *(Deviation(
        "tcg-rdpmc-no-family-check", "tcg", None, "host", "rdpmc", {"pce": "0", "cpl": str(c)}, "#GP(0)",
        "QEMU 7.2 TCG decodes RDPMC on a CPU before P6 / Pentium with MMX (no RDPMC: #UD, SDM Vol. 2B "
        "RDPMC) and applies the CR4.PCE privilege check instead", when=(("rdpmc_insn", False),),
    ) for c in (1, 2, 3)),
    Deviation(
        "tcg-rdpmc-unimplemented", "tcg", None, "host", "rdpmc", {"cpl": "0"}, "#UD",
        "QEMU 7.2 TCG does not implement RDPMC: where CR4.PCE or CPL0 lets it run, it raises #UD",
    ),
    Deviation(
        "tcg-rdpmc-unimplemented", "tcg", None, "host", "rdpmc", {"pce": "1"}, "#UD",
        "QEMU 7.2 TCG does not implement RDPMC: where CR4.PCE or CPL0 lets it run, it raises #UD",
    ),
    Deviation(
        "kvm_pvm-rdpmc-gp", "kvm", KVM_PVM, "host", "rdpmc", {}, "#GP(0)",
        "kvm_pvm: RDPMC is #GP(0) in every case (no counter is readable), also with pmu=on",
    ),
    *(Deviation(
        "kvm_pvm-iopl-ignored", "kvm", KVM_PVM, "host", probe, {"iopl": "3"}, None,
        "kvm_pvm does not let IRETQ set RFLAGS.IOPL: rings 1-3 run at IOPL 0 whatever the frame says "
        "(measured: the GDB witness reads IOPL 0 in the RFLAGS the CPU pushed for the IOPL=3 rows, and "
        "CLI/IN/OUT #GP there); the IOPL=3 rows cannot be set up: not run",
        skip_arg="iopl=3",
    ) for probe in ("iopl-insn", "io")),
)


# Hiding counters the architecture has (AMD64's PerfCtr0-3, a pre-0AH Intel family's PMC0-1:
# lab/expectations.py pmc_exists) is the configuration's deviation: QEMU's `pmu=off` gives a
# hardware KVM's guest no vPMU, and RDPMC of a counter the CPU should have is then #GP(0).
# (Intel models with leaf 0AH enumerate no counters then: the rule itself says #GP(0).)
DEVIATIONS += tuple(
    Deviation("qemu-pmu-off-hides-counters", "kvm", module, "host", "rdpmc", params, "#GP(0)",
              "QEMU pmu=off: KVM gives the guest no counters, so RDPMC of a counter the CPU's vendor and "
              "family define (APM Vol. 3 RDPMC; SDM Vol. 2B RDPMC) is #GP(0)", when=(("pmu", False),))
    for module in ("kvm_intel", "kvm_amd") for params in ({"cpl": "0"}, {"pce": "1"})
)


# -- the 32-bit host kernel (CPU models without long mode: firmware/arch32) ----------------------
# Under kvm_pvm a 32-bit IRET to an outer privilege level is a KVM internal error (an emulation
# failure that stops QEMU; docs/platform.md): every row the 32-bit host enters by IRET to CPL>0
# is not run there (`skip=cpl=1,...`: firmware/probe.c). kvm_intel and kvm_amd run it (SDM Vol. 2A IRET).
DEVIATIONS += tuple(
    Deviation(
        "kvm_pvm-iret32-outer", "kvm", KVM_PVM, "host", r.probe, r.params, None,
        "kvm_pvm: a 32-bit IRET to CPL>0 (the 32-bit host kernel's way into rings 1-3) is a KVM internal "
        "error that stops QEMU; not run on the 32-bit host under kvm_pvm",
        skip_arg=next(f"{k}={v}" for k, v in r.params.items() if k in ("cpl", "from_cpl")),
        when=(("long_mode", False),),
    )
    for r in catalogue.table_rows() if r.cpl > 0 and not r.entry.long_mode_only
)
# The Popek-Goldberg family (lab/catalogue.py PG_INSNS) under the software host: the guest kernel
# runs at CPL1, where kvm_pvm cannot run a far CALL/JMP through a call gate nor an INT n (a KVM
# internal error that stops QEMU: docs/platform.md), nor LAR, LSL, VERR, VERW (measured: each
# alone stops QEMU with "KVM internal error. Suberror: 1"); the host's BEGIN answers "skip".
DEVIATIONS += tuple(
    Deviation(f"kvm_pvm-pg-{insn}-cpl1", "kvm", KVM_PVM, "guest-soft", f"pg-{insn}", {}, None,
              f"kvm_pvm: {what} at CPL1 (the software host's guest kernel) is a KVM internal error that "
              "stops QEMU (docs/platform.md); not run under kvm_pvm", skip_arg=f"pg-{insn}")
    for insn, what in (("call", "a far CALL through a call gate"), ("jmp", "a far JMP through a call gate"),
                       ("int", "INT n"), *((i, i.upper()) for i in ("lar", "lsl", "verr", "verw")))
)
# A model without the TSC (486: CPUID.1:EDX[4]=0): RDTSC is #UD by the rule (SDM Vol. 2B RDTSC),
# yet QEMU 7.2's TCG executes it (measured), and then applies CR4.TSD as on a CPU with a TSC
# (it accepts setting TSD there too). The values it shows, named; a TCG that follows the rule
# shows #UD and passes.
_TCG_TSC = ("QEMU 7.2 TCG executes RDTSC on a CPU model without the TSC (CPUID.1:EDX[4]=0, QOM tsc=false) "
            "instead of raising #UD, applying CR4.TSD as if it had one")
DEVIATIONS += tuple(
    Deviation("tcg-rdtsc-without-tsc", "tcg", None, "host", "rdtsc", params, observed, _TCG_TSC,
              when=(("tsc", False),))
    for params, observed in (({"tsd": "0"}, "ok"), ({"tsd": "1", "cpl": "0"}, "ok"),
                             *(({"tsd": "1", "cpl": str(c)}, "#GP(0)") for c in (1, 2, 3)))
)
# kvm_pvm too (measured at CPL0, the only CPL its 32-bit host runs): the CPU executes RDTSC.
DEVIATIONS += tuple(
    Deviation("kvm_pvm-rdtsc-without-tsc", "kvm", KVM_PVM, "host", "rdtsc", params, "ok",
              "kvm_pvm executes RDTSC on a CPU model without the TSC (CPUID.1:EDX[4]=0, QOM tsc=false) "
              "instead of raising #UD", when=(("tsc", False),))
    for params in ({"tsd": "0", "cpl": "0"}, {"tsd": "1", "cpl": "0"})
)


def find(facts: Facts, exp: Expectation) -> Deviation | None:
    matches = [dev for dev in DEVIATIONS if dev.applies(facts, exp)]
    # One that keeps the probe from running wins: then nothing is observed at all.
    return next((dev for dev in matches if dev.observed is None), matches[0] if matches else None)


def skipped_probes(accel: str, kvm_module: str | None, has=None) -> list[str]:
    """Probes the firmware must not run on this accelerator (they would stop QEMU). Decided
    before the boot, from what the lab detected, so it goes on the kernel command line.
    `has(feature)`: the CPU model's facts, for deviations that depend on the model; without
    it only the deviations that do not are decided."""
    module = kvm_module if accel == "kvm" else None
    return sorted({d.skip_arg for d in DEVIATIONS if d.skip_arg and d.accel == accel and d.kvm_module == module
                   and (all(has(f) == v for f, v in d.when) if has else not d.when)})


# -- ring -2 (lab/catalogue.py SMM_SCOPE): QEMU's SMM model against the manuals ------------------
# QEMU's, not an accelerator's: the same on TCG and every KVM that runs SMM.
_QEMU_ENGINES = (("tcg", None), *(("kvm", m) for m in ("kvm_intel", "kvm_amd", KVM_PVM)))
DEVIATIONS += tuple(
    Deviation("qemu-smi-count-every-model", accel, module, catalogue.SMM_SCOPE, "smi-count-msr", {}, "ok",
              "QEMU implements MSR_SMI_COUNT (0x34) for every CPU model (TCG's helper_rdmsr, KVM's common MSR code): "
              "RDMSR 0x34 reads the SMI count on a model whose manuals define no such MSR (AMD64, pre-Nehalem Intel)",
              when=(("smi_count_msr", False),))
    for accel, module in _QEMU_ENGINES
) + tuple(
    Deviation("qemu-aseg-falls-through", accel, module, catalogue.SMM_SCOPE, "smram-hidden", {}, "visible",
              "QEMU with no device on the legacy VGA window (the lab's -nodefaults): with SMRAM closed the chipset "
              "routes A0000h-BFFFFh to PCI as the datasheet says, but nothing there claims it and QEMU's memory map "
              "lets the RAM beneath (SMRAM) show through, for reads and writes (closed_write=1); on hardware the "
              "access would end on the PCI bus (master abort: reads all ones). With -device VGA it reads 0xff "
              "(docs/platform.md 'SMM')")
    for accel, module in _QEMU_ENGINES
)
