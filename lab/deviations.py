"""Known deviations of accelerators from the architecture, as data.

Keyed by what the lab detected (accelerator and the kernel module behind /dev/kvm), never
by host name. A deviation turns the matching check into `xfail` when the accelerator shows
exactly the deviant value, and into `xpass` if it stops deviating. A deviation that would
stop the machine (a KVM internal error) is not run at all: its checks are `skip` with the
reason, and `kernel_args` tells the firmware to leave the probe out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .expectations import Expectation, Facts


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

    def applies(self, facts: Facts, exp: Expectation) -> bool:
        if facts.accel != self.accel or facts.kvm_module != self.kvm_module:
            return False
        if exp.scope != self.scope or exp.probe != self.probe:
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
    Deviation(
        "kvm_pvm-rdtscp-emulation", "kvm", KVM_PVM, "host", "rdtscp", {}, None,
        "kvm_pvm: executing RDTSCP (absent from its CPUID) is a KVM internal error that stops "
        "QEMU; not run under kvm_pvm",
        skip_arg="rdtscp",
    ),
)


def find(facts: Facts, exp: Expectation) -> Deviation | None:
    for dev in DEVIATIONS:
        if dev.applies(facts, exp):
            return dev
    return None


def skipped_probes(accel: str, kvm_module: str | None) -> list[str]:
    """Probes the firmware must not run on this accelerator (they would stop QEMU). Decided
    before the boot, from what the lab detected, so it goes on the kernel command line."""
    module = kvm_module if accel == "kvm" else None
    return sorted({d.skip_arg for d in DEVIATIONS if d.skip_arg and d.accel == accel and d.kvm_module == module})
