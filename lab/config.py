"""One boot's configuration, validated before anything starts."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from . import catalogue

ACCELS = ("tcg", "kvm")  # QEMU accelerators
# Bochs, a third x86 implementation, with Intel VMX models (lab/bochs.py, docs/bochs.md).
BOCHS = "bochs"
ENGINES = (*ACCELS, BOCHS)
# TCG emulates AMD SVM, so its default CPU offers it; a KVM guest gets SVM only where the
# host's KVM nests it, and `qemu64` is the model that boots under every KVM (docs/platform.md:
# some KVMs abort `host`/`max` on MSR 0x10a unless `,-arch-capabilities`).
DEFAULT_CPU = {"tcg": "qemu64,+svm", "kvm": "qemu64", BOCHS: "corei7_skylake_x"}
DEFAULT_MACHINE = "microvm"
MACHINES = ("microvm", "pc", "q35")
HOST_MODES = ("auto", "vmx", "svm", "soft", "none")
DEFAULT_SIGNATURE = "LabRingMinus"
# Fault injection for the lab's own robustness tests (firmware/faults.c).
FAULT_KINDS = ("hang", "triple", "garbage", "longline", "cut", "exception", "table-exception", "kvm-internal",
               "linger")
# Probes the firmware leaves out when asked with `skip=`: a probe name or a family of the
# catalogue's table (firmware/probe.c matches either; lab/catalogue.py).
# The guest's Popek-Goldberg probes too, by name (firmware/hv_guest.c LABHC_PG_BEGIN).
SKIP_WORDS = tuple(sorted({w for r in catalogue.table_rows()
                           for w in (r.probe, r.entry.family, *(f"{k}={v}" for k, v in r.params.items()))}
                          | {p.probe for p in catalogue.CATALOGUE if p.family == catalogue.PG_FAMILY}))
_BOOL = ("0", "1")
# Ring -2 (firmware/smm.c): the SMIs per measurement the lab asks for on a machine with SMM
# (QEMU's pc and q35: SMRAM and the APM control port 0xB2; microvm has neither).
SMM_MACHINES = ("pc", "q35")
SMM_SMIS = 8
SMM_MAX_SMIS = 32  # firmware/smm.c MAX_SMIS
SMM_FAULTS = ("no-smi", "no-restore")  # negative controls: SMIs reported, never raised; a handler losing R12

# The kernel command line keys `--kernel-arg` accepts: the one list of them (firmware/README.md
# and docs/records.md describe what each does). key -> accepted values (None: a list of
# SKIP_WORDS). `hv-signature` and `host-mode` have their own options.
KERNEL_ARGS: dict[str, tuple[str, ...] | None] = {
    "skip": None,
    "run": None,  # opt-in families (lab/catalogue.py Probe.opt_in): the lab names them from the model
    "realmode": _BOOL,
    "fault": FAULT_KINDS,
    "hv-intercept-cpuid": _BOOL,
    "hv-intercept-rdtsc": _BOOL,
    "hv-npt": _BOOL,
    "hv-fault": ("unknown-exit", "no-rdtsc-exit"),  # no-rdtsc-exit: firmware/vmx.c forgets that exit
    "soft-fault": ("no-emulate-rdtsc", "unknown-hlt", "no-emulate-umip"),
    "smm": tuple(str(n) for n in range(1, SMM_MAX_SMIS + 1)),  # the lab names it on pc/q35 (runner.preboot)
    "smm-fault": SMM_FAULTS,
}
OWN_OPTION = {"hv-signature": "--hv-signature", "host-mode": "--host-mode"}

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
    prebooted: bool = False  # lab.runner.preboot() decided it from the model's facts
    # ...and those facts, QEMU's QOM answer for exactly this binary, accelerator, machine and
    # model (JSON text; "" when none): the boot uses them instead of asking QEMU again.
    cpu_facts: str = ""

    def __post_init__(self) -> None:
        if self.accel not in ENGINES:
            raise ConfigError(f"unknown accelerator {self.accel!r}: choose one of {', '.join(ENGINES)}")
        if not self.cpu:
            object.__setattr__(self, "cpu", DEFAULT_CPU[self.accel])
        if not _CPU_RE.match(self.cpu):
            raise ConfigError(f"--cpu {self.cpu!r} is not a QEMU CPU model (e.g. qemu64,+svm)")
        base_machine = self.machine.split(",")[0]
        if base_machine not in MACHINES:
            raise ConfigError(f"unknown machine {self.machine!r}: choose one of {', '.join(MACHINES)}")
        if self.host_mode not in HOST_MODES:
            raise ConfigError(f"--host-mode {self.host_mode!r}: choose one of {', '.join(HOST_MODES)}")
        check_signature(self.hv_signature)
        if self.timeout_s <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
        for word in self.kernel_args:
            check_kernel_arg(word, lab_owned_ok=True)
        for path in (self.kernel, self.symbols, *[m.path for m in self.modules]):
            if not Path(path).is_file():
                raise ConfigError(f"{path} does not exist: build it first (invoke build)")

    @property
    def label(self) -> str:
        """Short name for tables and run folders: accel/machine/cpu."""
        machine = "i440fx" if self.accel == BOCHS else self.machine  # Bochs' one PC
        return f"{self.accel}/{machine}/{self.cpu}"

    def cmdline(self) -> str:
        words = [f"hv-signature={self.hv_signature}", f"host-mode={self.host_mode}", *self.kernel_args]
        return " ".join(words)


def check_signature(sig: str) -> None:
    """12 bytes for CPUID 0x40000000 EBX,ECX,EDX (4 bytes each); printable ASCII without
    spaces, as the kernel command line carries it."""
    raw = sig.encode("utf-8")
    if len(raw) != 12 or not _CMDLINE_VALUE_RE.match(sig):
        ascii_note = "" if sig.isascii() else ", not all ASCII"
        raise ConfigError(
            f"--hv-signature must be exactly 12 bytes of printable ASCII without spaces, "
            f"got {sig!r} ({len(raw)} bytes in UTF-8{ascii_note})"
        )


def check_kernel_arg(word: str, *, lab_owned_ok: bool = False) -> None:
    """One `key=value` word for the kernel command line, checked against KERNEL_ARGS."""
    if not _CMDLINE_VALUE_RE.match(word) or "=" not in word:
        raise ConfigError(f"--kernel-arg {word!r} must be key=value without spaces")
    key, _, value = word.partition("=")
    if key in OWN_OPTION and not lab_owned_ok:
        raise ConfigError(f"--kernel-arg {key}=...: use {OWN_OPTION[key]} instead")
    if key in OWN_OPTION:
        return
    if key not in KERNEL_ARGS:
        raise ConfigError(f"--kernel-arg {word!r}: unknown key {key!r}; known keys: {', '.join(KERNEL_ARGS)}")
    allowed = KERNEL_ARGS[key]
    values = value.split(",") if allowed is None else [value]
    for v in values:
        if v not in (allowed or SKIP_WORDS):
            raise ConfigError(f"--kernel-arg {key}={v!r}: choose one of {', '.join(allowed or SKIP_WORDS)}")


def parse_timeout(text: str | float) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--timeout {text!r}: give a number of seconds, e.g. 15") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--timeout {text!r}: give a positive number of seconds, e.g. 15")
    return value


def check_cpu_model(cpu: str, models: frozenset[str], qemu: str) -> None:
    """The model part of --cpu (before the first comma) must be one QEMU lists."""
    if not _CPU_RE.match(cpu):
        raise ConfigError(f"--cpu {cpu!r} is not a QEMU CPU model (e.g. qemu64,+svm)")
    base = cpu.split(",")[0]
    if base in models:
        return
    by_lower = {m.lower(): m for m in models}
    close = difflib.get_close_matches(base.lower(), sorted(by_lower), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(by_lower[c] for c in close)}?" if close else ""
    raise ConfigError(f"--cpu {cpu!r}: QEMU has no CPU model {base!r}{hint} (list: {qemu} -cpu help)")


# -- `--only`: one question at a time -------------------------------------------------------
def _only_targets() -> list[tuple[str, str, str]]:
    """(check id, probe, family) for every catalogue row of every scope, and the boot's own."""
    rows = [r for scope in ("host", *catalogue.GUEST_SCOPES, catalogue.SMM_SCOPE) for r in catalogue.rows(scope)]
    return [(r.id, r.probe, r.entry.family) for r in rows]


_FAMILIES: dict[str, str] = {}


def only_families() -> dict[str, str]:
    """check id -> its family, for every catalogue row (made once)."""
    if not _FAMILIES:
        _FAMILIES.update({cid: family for cid, _, family in _only_targets()})
    return _FAMILIES


def only_matches(word: str, check_id: str, probe: str, family: str) -> bool:
    """A `--only` word names a family, a probe, or is a glob over check ids (with or without
    their scope: `rdtsc.tsd1.*` or `host.rdtsc.*`)."""
    import fnmatch

    if word in (probe, family):
        return True
    bare = check_id.split(".", 1)[1] if "." in check_id else check_id
    return fnmatch.fnmatchcase(check_id, word) or fnmatch.fnmatchcase(bare, word)


def check_only(text: str | None) -> tuple[str, ...]:
    """`--only FAMILY|PROBE|GLOB[,...]`: each word must select at least one check of the catalogue.
    Returns the words ("" or None: everything)."""
    if text is None or text == "":
        if text == "":
            raise ConfigError("--only '': name a probe family, a probe or a check-id glob, e.g. --only tsc "
                              "or --only 'rdtsc.tsd1.*'")
        return ()
    words = tuple(w.strip() for w in text.split(","))
    targets = _only_targets()
    families = sorted({f for _, _, f in targets})
    for word in words:
        if not word or not _CMDLINE_VALUE_RE.match(word):
            raise ConfigError(f"--only {text!r}: an empty or blank word; give comma-separated families, probes or "
                              "check-id globs")
        if not any(only_matches(word, *t) for t in targets):
            close = difflib.get_close_matches(word, families + sorted({p for _, p, _ in targets}), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"--only {word!r} selects no check{hint} (families: {', '.join(families)}; probes and "
                              "check ids: python3 -m lab.catalogue --docs, docs/probes.md)")
    return words


def only_skip_words(words: tuple[str, ...]) -> list[str]:
    """The firmware's `skip=` words for `--only`: every host-table family none of whose rows
    the words select (firmware/probe.c skips a family by name). Guest probes run with the guest."""
    if not words:
        return []
    keep = {r.entry.family for r in catalogue.table_rows()
            if any(only_matches(w, r.id, r.probe, r.entry.family) for w in words)}
    return sorted({r.entry.family for r in catalogue.table_rows()} - keep)


def only_asked(check_id: str, probe: str, words: tuple[str, ...]) -> bool:
    """Whether `--only` words select a check (its family from the catalogue; else its probe)."""
    family = only_families().get(check_id, probe)
    return any(only_matches(w, check_id, probe, family) for w in words)
