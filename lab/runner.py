"""Run the matrix: one QEMU boot per (accelerator, machine, CPU model) runs every probe;
the boots run side by side, each into its own run folder."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, catalogue, deviations, report
from .build import ROOT, Artifacts, host32_of
from .config import BOCHS, SMM_SMIS, ConfigError, Module, RunConfig
from .expectations import Facts, plan, smm_skip, with_smm
from .hostinfo import KvmStatus, host_cpu_flags, kvm_has_smm, kvm_status, qemu_version
from .judge import Check, judge
from .qemu import BootError, BootResult, Machine, cached_cpu_model_facts, free_tcp_port
from .records import Transcript, parse_stream

WITNESSES = ("serial", "gdb", "both")


@dataclass
class RunOutcome:
    cfg: RunConfig
    run_dir: Path
    checks: list[Check]
    boot: BootResult | None = None
    transcript: Transcript | None = None
    facts: Facts | None = None
    error: str = ""  # the boot could not happen at all
    gdb_transcript: Path | None = None
    extras: dict = field(default_factory=dict)

    def as_run_dict(self) -> dict:
        b = self.boot
        info = self.transcript.info if self.transcript else {}
        return {
            "accel": self.cfg.accel,
            "machine": self.cfg.machine,
            "cpu": self.cfg.cpu,
            "config": self.cfg.label,
            "command": b.command if b else [],
            "repro": b.repro if b else "",
            "log": str(self.run_dir / "serial.log"),
            "run_dir": str(self.run_dir),
            "wall_s": round(b.wall_s, 3) if b else None,
            "exit": b.exit if b else "error",
            "exit_detail": (b.exit_detail if b else self.error),
            "cpu_facts": b.cpu_facts if b else {},
            "firmware": {k: v for k, v in info.items() if not k.startswith(("cmdline", "cost."))},
            "costs": {k: int(v) for k, v in info.items() if k.startswith("cost.") and v.isdigit()},
            "gdb_transcript": str(self.gdb_transcript) if self.gdb_transcript else None,
            "gdb_error": self.extras.get("gdb_error"),
            "teardown": self.extras.get("teardown"),
        }


# A run folder's name: its start time and pid, after its kind for all but lab.run's own.
RUN_KINDS = ("debug", "sweep", "bench")
RUN_NAME = re.compile(rf"^(?:({'|'.join(RUN_KINDS)})-)?\d{{8}}-\d{{6}}-\d+$")
DEFAULT_KEEP_RUNS = 20


def keep_runs() -> int:
    """How many run folders `runs/` keeps: $LAB_KEEP_RUNS, default 20 (`invoke clean`: none)."""
    text = os.environ.get("LAB_KEEP_RUNS", str(DEFAULT_KEEP_RUNS))
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"LAB_KEEP_RUNS={text!r}: give a whole number of runs to keep, at least 1")
    return int(text)


def prune_runs(base: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest run folders of each kind (lab.run's, debug-, sweep-,
    bench-; named by their start time) in `base`: a sweep never pushes out the runs."""
    kinds: dict[str, list[Path]] = {}
    for p in base.iterdir():
        m = RUN_NAME.match(p.name)
        if m and p.is_dir():
            kinds.setdefault(m.group(1) or "", []).append(p)
    old = [p for runs in kinds.values() for p in (sorted(runs)[:-keep] if keep else runs)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def new_kind_folder(kind: str) -> Path:
    """A new `runs/<kind>-<time>-<pid>` folder (debug, sweep, bench); the oldest of that kind
    beyond $LAB_KEEP_RUNS go."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = ROOT / "runs" / f"{kind}-{stamp}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    prune_runs(folder.parent, keep_runs())
    return folder


def clean_runs(base: Path | None = None) -> tuple[int, int]:
    """`invoke clean`: empty `runs/` (run, bench and sweep folders). Returns (entries, bytes)."""
    base = base or ROOT / "runs"
    if not base.is_dir():
        return 0, 0
    entries = list(base.iterdir())
    size = sum(f.stat().st_size for p in entries for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(entries), size


def new_run_root(base: Path | None = None, keep: int | None = None) -> Path:
    """A new run folder. In the default `runs/`, the oldest beyond `keep` go (a folder the
    user named is theirs: nothing is deleted there)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = (base or ROOT / "runs") / f"{stamp}-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    if base is None:
        prune_runs(root.parent, keep if keep is not None else keep_runs())
    return root


# -- before any boot: what QEMU says the CPU model is ---------------------------------------
NO_LONG_MODE = "no long mode (CPUID 0x80000001 EDX[29]); the host kernel is 64-bit"  # Bochs (lab/bochs.py)
# The firmware's `skip=` word for the SYSCALL/SYSRET probes (their family in lab/catalogue.py).
SKIP_SYSCALL = "syscall"


@dataclass
class PreBoot:
    """The decision for one configuration, taken from QOM before it boots."""

    cfg: RunConfig
    facts: dict
    skip: str = ""  # the whole configuration cannot boot: why


def preboot(cfg: RunConfig) -> PreBoot:
    """Check the CPU model's facts (QOM) before the probes run. Raises ConfigError for what
    the user asked and this CPU cannot do."""
    if cfg.accel == BOCHS:  # Bochs describes its model itself (lab/bochs.py)
        from . import bochs

        return bochs.preboot(cfg)
    try:
        facts = cached_cpu_model_facts(cfg, ROOT / "runs" / ".cache" / "cpu-facts.json")
    except BootError as exc:
        raise ConfigError(f"--cpu {cfg.cpu}: QEMU cannot start {cfg.label}: {exc}") from None
    if not facts.get("lm", True):
        # SDM Vol. 3A 9.8.5, APM Vol. 2 14.6: long mode needs CPUID.80000001H:EDX.LM[29]. Without it the
        # 32-bit host kernel boots (firmware/arch32): the same probes in protected mode, no hypervisor
        # (its guest scopes and the 64-bit-only rows are skips: lab/expectations.py).
        if cfg.host_mode in ("svm", "vmx", "soft"):
            raise ConfigError(f"--host-mode {cfg.host_mode}: {cfg.label} has no long mode, and the 32-bit host kernel "
                              "it boots runs no hypervisor; use --host-mode auto or none")
        kernel, symbols = host32_of(cfg.kernel)
        if not (kernel.is_file() and symbols.is_file()):
            raise ConfigError(f"{cfg.label} has no long mode and {kernel} does not exist: build it first (invoke build)")
        cfg = dataclasses.replace(cfg, kernel=kernel, symbols=symbols, modules=(), guest_symbols=None)
    # APM Vol. 2 15.4: EFER.SVME can be set only if CPUID Fn8000_0001_ECX[SVM] = 1; SDM Vol. 3C
    # 23.6: VMXON needs CPUID.1:ECX.VMX[5] = 1. A host the CPU cannot run is the user's error.
    for mode, where, example in (("svm", "CPUID 0x80000001 ECX[2]", "TCG: qemu64,+svm"),
                                 ("vmx", "CPUID 1 ECX[5]", "a KVM that nests VMX, or --accel bochs")):
        if cfg.host_mode == mode and not facts.get(mode, False):
            raise ConfigError(
                f"--host-mode {mode}: {cfg.label} has no {mode.upper()} ({where}; QOM {mode}=false), so the "
                f"{mode.upper()} host cannot run the guest; use --host-mode auto or soft, or a CPU with "
                f"{mode.upper()} ({example})"
            )
    if not facts.get("syscall", True):
        # SDM Vol. 2B SYSCALL/SYSRET, APM Vol. 2 6.1.1: #UD unless EFER.SCE=1, which needs
        # CPUID.80000001H:EDX.SYSCALL[11]: the firmware must not run them (their checks are
        # skips with that reason: lab/expectations.py, from the same QOM property).
        cfg = dataclasses.replace(cfg, kernel_args=with_skips(cfg.kernel_args, [SKIP_SYSCALL]))
    # A gate bit the model lacks is reserved: its probes are skips (lab/catalogue.py gate_skips).
    # So is a probe a known deviation of this accelerator on this model would hang.
    model = Facts.from_qemu(cfg.accel, None, facts, hv_signature=cfg.hv_signature, host_mode=cfg.host_mode)
    module = kvm_status().module if cfg.accel == "kvm" else None
    gated = catalogue.gate_skips(model.has) + deviations.skipped_probes(cfg.accel, module, model.has)
    if gated:
        cfg = dataclasses.replace(cfg, kernel_args=with_skips(cfg.kernel_args, gated))
    # What runs only when told (it may write a reserved bit): named for this model, if it may.
    run = catalogue.run_words(model.has, gated)
    if run:
        cfg = dataclasses.replace(cfg, kernel_args=(*cfg.kernel_args, f"run={','.join(run)}"))
    # Ring -2 where the machine has SMM (lab/expectations.py smm_skip): the lab names the SMIs.
    smm = (f"smm={SMM_SMIS}",)
    if not any(a.startswith("smm=") for a in cfg.kernel_args) and \
            smm_skip(with_smm(model, cfg.machine, smm, cfg.accel == "kvm" and kvm_has_smm())) is None:
        cfg = dataclasses.replace(cfg, kernel_args=(*cfg.kernel_args, *smm))
    return PreBoot(dataclasses.replace(cfg, prebooted=True, cpu_facts=json.dumps(facts)), facts)


def preboot_all(cfgs: list[RunConfig]) -> list[PreBoot]:
    """Every configuration's pre-boot decision, side by side (each is a short QEMU start)."""
    from . import bochs  # Bochs describes its models itself (lab/bochs.py)

    with ThreadPoolExecutor(max_workers=max(1, len(cfgs))) as pool:
        return list(pool.map(lambda c: bochs.preboot(c) if c.accel == BOCHS else preboot(c), cfgs))


def with_skips(kernel_args: tuple[str, ...], words: list[str]) -> tuple[str, ...]:
    """The kernel arguments with one `skip=` word holding `words` and any skips already there."""
    have = [w for a in kernel_args if a.startswith("skip=") for w in a[5:].split(",") if w]
    merged = sorted(set(have) | set(words))
    rest = tuple(a for a in kernel_args if not a.startswith("skip="))
    return (f"skip={','.join(merged)}", *rest) if merged else rest


def not_run_check(pre: PreBoot) -> Check:
    """One row for a configuration that does not boot at all."""
    cfg = pre.cfg
    return Check("run.integrity", cfg.accel, "host", "run", {}, None, None, "skip", pre.skip, config=cfg.label)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def make_config(
    accel: str,
    art: Artifacts,
    *,
    qemu: str,
    kvm: KvmStatus,
    machine: str = "microvm",
    cpu: str = "",
    hv_signature: str | None = None,
    host_mode: str = "auto",
    kernel_args: tuple[str, ...] = (),
    timeout_s: float = 15.0,
    with_guest: bool = True,
) -> RunConfig:
    args = with_skips(tuple(kernel_args), deviations.skipped_probes(accel, kvm.module))
    extra = {"hv_signature": hv_signature} if hv_signature else {}
    return RunConfig(
        accel=accel, qemu=qemu, kernel=art.kernel, symbols=art.symbols, machine=machine, cpu=cpu,
        modules=(Module(art.guest),) if with_guest else (), kernel_args=args, timeout_s=timeout_s,
        host_mode=host_mode, guest_symbols=art.guest_symbols if with_guest else None, **extra,
    )


def run_one(cfg: RunConfig, run_dir: Path, kvm: KvmStatus, witness: str = "serial",
            cancel: threading.Event | None = None, *, gdb_record: bool = True) -> RunOutcome:
    """Boot once, judge, and write the run folder's report. Never raises for a bad boot:
    the outcome then carries `error` checks and the reason. `gdb_record=False`: GDB stops the
    CPU where its plan says but reads nothing (lab/bench.py's baseline; its checks are unread)."""
    if cfg.accel == BOCHS:  # the serial witness only (docs/bochs.md)
        from . import bochs

        run_dir.mkdir(parents=True, exist_ok=True)
        return bochs.run_one(cfg, run_dir, cancel)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.prebooted:  # the model's facts decide what the firmware must not run
        try:
            pre = preboot(cfg)
        except ConfigError as exc:
            return _error_outcome(RunOutcome(cfg, run_dir, []), kvm, str(exc))
        if pre.skip:
            return RunOutcome(pre.cfg, run_dir, [not_run_check(pre)])
        cfg = pre.cfg
    outcome = RunOutcome(cfg, run_dir, [])
    # Every wait of this boot (QMP, console, GDB/MI, process exits) ends by this deadline; the
    # teardown after it is bounded too (lab/processes.py), so a verdict comes by timeout + ~2 s.
    deadline = time.monotonic() + cfg.timeout_s
    gdb_port = free_tcp_port() if witness in ("gdb", "both") else None
    gdb = None
    boot = None
    machine = None
    if gdb_port:
        from .witness import GdbWitness  # imported lazily: serial-only runs skip pygdbmi

        gdb = GdbWitness(run_dir, cfg.symbols, cfg.guest_symbols, f"127.0.0.1:{gdb_port}", cfg.accel,
                         deadline=deadline, record=gdb_record)
        outcome.gdb_transcript = gdb.transcript
    try:
        if gdb is not None:
            gdb.prepare_in_background()  # GDB starts and reads the symbols while QEMU starts
        machine = Machine(cfg, run_dir, gdb_port=gdb_port, cancel=cancel, deadline=deadline)
        with machine:
            if gdb is not None:
                machine.companions["GDB"] = gdb.gdb_pid
            start = (lambda qom: _start_witness(gdb, machine, cfg, kvm, qom)) if gdb else None
            boot = machine.run(start=start, facts=json.loads(cfg.cpu_facts) if cfg.cpu_facts else None)
    except BootError as exc:
        outcome.error = str(exc)
        return _error_outcome(outcome, kvm, str(exc))
    finally:
        # Never raises; ends GDB in every case. Readings it could not take are `unreached`.
        # QEMU has exited after a clean boot, so GDB ends at once; after a failed boot it
        # may be stuck at a breakpoint, and the verdict must not wait for it.
        wait = min(5.0, max(1.0, deadline - time.monotonic())) if boot is not None and boot.exit == "ok" else 0.25
        gdb_readings = gdb.finish(timeout=wait) if gdb is not None else {}
        if machine is not None and machine.teardown:
            outcome.extras["teardown"] = {"QEMU": machine.teardown}
        if gdb is not None and gdb.teardown:
            outcome.extras.setdefault("teardown", {})["GDB"] = gdb.teardown
    if gdb is not None and gdb.error:
        outcome.extras["gdb_error"] = gdb.error
        if boot.exit == "timeout" and not machine.stalled:  # what kept the boot from its end may be GDB's
            boot.exit_detail += f"; the GDB witness: {gdb.error.splitlines()[0]}"
    outcome.boot = boot
    outcome.transcript = parse_stream(boot.serial)
    outcome.facts = facts_of(cfg, kvm, boot.cpu_facts)
    outcome.checks = judge(
        outcome.facts, outcome.transcript, gdb_readings=gdb_readings if gdb is not None else None,
        witness=witness, config=cfg.label, boot_exit=boot.exit, boot_detail=boot.exit_detail,
    )
    return outcome


def facts_of(cfg: RunConfig, kvm: KvmStatus, qom: dict) -> Facts:
    """What the configuration says the CPU is (QEMU's QOM properties of the model)."""
    facts = Facts.from_qemu(
        cfg.accel, kvm.module, qom, hv_signature=cfg.hv_signature, host_mode=cfg.host_mode,
        guest_rdtsc_intercept="hv-intercept-rdtsc=0" not in cfg.kernel_args,
        host_cpuid_fault="cpuid_fault" in host_cpu_flags(),
    )
    return with_smm(facts, cfg.machine, cfg.kernel_args, cfg.accel == "kvm" and kvm_has_smm())


def _start_witness(gdb, machine: Machine, cfg: RunConfig, kvm: KvmStatus, qom: dict) -> None:
    """Plan the witness from this CPU's expectations and let the CPU go under GDB. If GDB
    cannot attach, the boot still runs (QMP `cont`) and every witnessed check is an error."""
    from .gdbmi import GdbError, GdbTimeout
    from .witness import witness_plan

    facts = facts_of(cfg, kvm, qom)
    exps = plan(facts)
    deviant = {e.id: d.observed for e in exps if (d := deviations.find(facts, e)) is not None}
    try:
        gdb.start(witness_plan(cfg.accel, facts.kvm_module, exps, deviant), f"guest-{facts.guest_mode}")
    except (GdbError, GdbTimeout) as exc:
        gdb.error = f"GDB could not attach: {exc}"
        if machine.left() > 0:  # else the boot's timeout says so, naming GDB's state
            machine.resume()


def _error_outcome(outcome: RunOutcome, kvm: KvmStatus, why: str) -> RunOutcome:
    cfg = outcome.cfg
    outcome.checks = [Check("run.integrity", cfg.accel, "host", "run", {}, "complete", "no boot", "error",
                            f"QEMU did not boot: {why}", config=cfg.label)]
    return outcome


def host_dict(qemu: str, kvm: KvmStatus) -> dict:
    return {
        "qemu": qemu_version(qemu),
        "qemu_binary": qemu,
        "kvm_module": kvm.module,
        "kvm_usable": kvm.usable,
        "kvm_reason": kvm.reason,
        "host_cpuid_fault": "cpuid_fault" in host_cpu_flags(),
        "kvm_smm": kvm.usable and kvm_has_smm(),  # KVM_CAP_X86_SMM: ring -2 runs under this KVM
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def run_matrix(cfgs: list[RunConfig], run_root: Path, *, kvm: KvmStatus | None = None,
               witness: str = "serial", parallel: int = 2) -> list[RunOutcome]:
    kvm = kvm or kvm_status()
    dirs = [run_root / f"{i}-{_slug(c.label)}" for i, c in enumerate(cfgs)]
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(run_one, c, d, kvm, witness, cancel) for c, d in zip(cfgs, dirs, strict=True)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            # Ctrl-C or SIGTERM: every boot stops at its next poll and tears QEMU down
            # before the pool's exit stops waiting for it.
            cancel.set()
            for f in futures:
                f.cancel()
            raise


def full_report(outcomes: list[RunOutcome], qemu: str, kvm: KvmStatus, skipped: list[Check],
                witness: str = "both") -> dict:
    checks = [c for o in outcomes for c in o.checks] + skipped
    return report.build(__version__, host_dict(qemu, kvm), [o.as_run_dict() for o in outcomes], checks, witness)
