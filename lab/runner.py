"""Run the matrix: one QEMU boot per (accelerator, machine, CPU model) runs every probe;
the boots run side by side, each into its own run folder."""

from __future__ import annotations

import datetime
import os
import platform
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, deviations, report
from .build import ROOT, Artifacts
from .config import Module, RunConfig
from .expectations import Facts
from .hostinfo import KvmStatus, kvm_status, qemu_version
from .judge import Check, judge
from .qemu import BootError, BootResult, Machine, free_tcp_port
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
        }


def new_run_root(base: Path | None = None) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = (base or ROOT / "runs") / f"{stamp}-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root


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
    skip = deviations.skipped_probes(accel, kvm.module)
    args = tuple(kernel_args)
    if skip:
        args = (f"skip={','.join(skip)}", *args)
    extra = {"hv_signature": hv_signature} if hv_signature else {}
    return RunConfig(
        accel=accel, qemu=qemu, kernel=art.kernel, symbols=art.symbols, machine=machine, cpu=cpu,
        modules=(Module(art.guest),) if with_guest else (), kernel_args=args, timeout_s=timeout_s,
        host_mode=host_mode, guest_symbols=art.guest_symbols if with_guest else None, **extra,
    )


def run_one(cfg: RunConfig, run_dir: Path, kvm: KvmStatus, witness: str = "serial",
            cancel: threading.Event | None = None) -> RunOutcome:
    """Boot once, judge, and write the run folder's report. Never raises for a bad boot:
    the outcome then carries `error` checks and the reason."""
    run_dir.mkdir(parents=True, exist_ok=True)
    outcome = RunOutcome(cfg, run_dir, [])
    gdb_port = free_tcp_port() if witness in ("gdb", "both") else None
    gdb = None
    boot = None
    if gdb_port:
        from .witness import GdbWitness  # imported lazily: serial-only runs skip pygdbmi

        gdb = GdbWitness(run_dir, cfg.symbols, cfg.guest_symbols, f"127.0.0.1:{gdb_port}", cfg.accel)
        outcome.gdb_transcript = gdb.transcript
    try:
        if gdb is not None:
            gdb.prepare()  # GDB starts and reads the symbols while QEMU starts
        with Machine(cfg, run_dir, gdb_port=gdb_port, cancel=cancel) as machine:
            start = (lambda qom: _start_witness(gdb, machine, cfg, qom)) if gdb else None
            boot = machine.run(start=start)
    except BootError as exc:
        outcome.error = str(exc)
        return _error_outcome(outcome, kvm, str(exc))
    finally:
        # Never raises; ends GDB in every case. Readings it could not take are `unreached`.
        # QEMU has exited after a clean boot, so GDB ends at once; after a failed boot it
        # may be stuck at a breakpoint, and the verdict must not wait for it.
        wait = 5.0 if boot is not None and boot.exit == "ok" else 0.5
        readings = gdb.finish(timeout=wait) if gdb is not None else []
    gdb_readings = {r.check_id: r.value for r in readings}
    if gdb is not None and gdb.error:
        outcome.extras["gdb_error"] = gdb.error
    outcome.boot = boot
    outcome.transcript = parse_stream(boot.serial)
    outcome.facts = Facts.from_qemu(
        cfg.accel, kvm.module, boot.cpu_facts, hv_signature=cfg.hv_signature, host_mode=cfg.host_mode,
        guest_rdtsc_intercept="hv-intercept-rdtsc=0" not in cfg.kernel_args,
    )
    outcome.checks = judge(
        outcome.facts, outcome.transcript, gdb_readings=gdb_readings if witness != "serial" else None,
        config=cfg.label, boot_exit=boot.exit, boot_detail=boot.exit_detail,
    )
    return outcome


def _start_witness(gdb, machine: Machine, cfg: RunConfig, qom: dict) -> None:
    """Let the CPU go under GDB, planning for the scopes this CPU will run. If GDB cannot
    attach, the boot still runs (QMP `cont`) and every witnessed check becomes an error."""
    from .gdbmi import GdbError, GdbTimeout

    guest_svm = bool(qom.get("svm")) and cfg.host_mode in ("auto", "svm") and cfg.guest_symbols
    try:
        gdb.start(scopes=("host", "guest-svm") if guest_svm else ("host",))
    except (GdbError, GdbTimeout) as exc:
        gdb.error = f"GDB could not attach: {exc}"
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


def full_report(outcomes: list[RunOutcome], qemu: str, kvm: KvmStatus, skipped: list[Check]) -> dict:
    checks = [c for o in outcomes for c in o.checks] + skipped
    return report.build(__version__, host_dict(qemu, kvm), [o.as_run_dict() for o in outcomes], checks)
