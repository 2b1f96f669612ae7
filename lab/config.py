"""One boot's configuration, validated before anything starts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ACCELS = ("tcg", "kvm")
# TCG emulates AMD SVM, so its default CPU offers it; this KVM passes no SVM to its guests,
# and `qemu64` is the model that boots under every KVM (FACTS: -cpu host/max need
# -arch-capabilities under kvm_pvm).
DEFAULT_CPU = {"tcg": "qemu64,+svm", "kvm": "qemu64"}
DEFAULT_MACHINE = "microvm"
MACHINES = ("microvm", "pc", "q35")
HOST_MODES = ("auto", "svm", "soft", "none")
DEFAULT_SIGNATURE = "LabRingMinus"
# Fault injection for the lab's own robustness tests (firmware/faults.c).
FAULT_KINDS = ("hang", "triple", "garbage", "longline", "cut", "exception", "kvm-internal")

_CPU_RE = re.compile(r"^[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.+\-=]+)*$")
_CMDLINE_VALUE_RE = re.compile(r"^[\x21-\x7e]*$")


class ConfigError(ValueError):
    """Bad input from the user: one clear message, nothing started."""


@dataclass(frozen=True)
class Module:
    path: Path
    args: str = ""


@dataclass(frozen=True)
class RunConfig:
    accel: str
    qemu: str
    kernel: Path  # the ELF32 copy QEMU boots
    symbols: Path  # the ELF64 with symbols, for GDB
    machine: str = DEFAULT_MACHINE
    cpu: str = ""
    modules: tuple[Module, ...] = ()
    kernel_args: tuple[str, ...] = ()  # key=value words for the multiboot command line
    timeout_s: float = 15.0
    gdbstub: bool = False  # start paused with a loopback gdbstub (the GDB witness attaches)
    hv_signature: str = DEFAULT_SIGNATURE
    host_mode: str = "auto"
    guest_symbols: Path | None = None

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise ConfigError(f"unknown accelerator {self.accel!r}: choose one of {', '.join(ACCELS)}")
        if not self.cpu:
            object.__setattr__(self, "cpu", DEFAULT_CPU[self.accel])
        if not _CPU_RE.match(self.cpu):
            raise ConfigError(f"--cpu {self.cpu!r} is not a QEMU CPU model (e.g. qemu64,+svm)")
        base_machine = self.machine.split(",")[0]
        if base_machine not in MACHINES:
            raise ConfigError(f"unknown machine {self.machine!r}: choose one of {', '.join(MACHINES)}")
        if self.host_mode not in HOST_MODES:
            raise ConfigError(f"--host-mode {self.host_mode!r}: choose one of {', '.join(HOST_MODES)}")
        sig = self.hv_signature.encode("latin-1", "replace")
        if len(sig) != 12 or not _CMDLINE_VALUE_RE.match(self.hv_signature):
            raise ConfigError(
                f"--hv-signature must be exactly 12 printable ASCII characters without spaces, "
                f"got {self.hv_signature!r} ({len(sig)} bytes)"
            )
        if self.timeout_s <= 0:
            raise ConfigError("timeout must be positive")
        for word in self.kernel_args:
            if not _CMDLINE_VALUE_RE.match(word) or "=" not in word:
                raise ConfigError(f"kernel argument {word!r} must be key=value without spaces")
            key, _, value = word.partition("=")
            if key == "fault" and value not in FAULT_KINDS:
                raise ConfigError(f"fault={value!r}: choose one of {', '.join(FAULT_KINDS)}")
        for path in (self.kernel, self.symbols, *[m.path for m in self.modules]):
            if not Path(path).is_file():
                raise ConfigError(f"{path} does not exist: build it first (invoke build)")

    @property
    def label(self) -> str:
        """Short name for tables and run folders: accel/machine/cpu."""
        return f"{self.accel}/{self.machine}/{self.cpu}"

    def cmdline(self) -> str:
        words = [f"hv-signature={self.hv_signature}", f"host-mode={self.host_mode}", *self.kernel_args]
        return " ".join(words)
