"""`invoke lab.run`: build, boot every requested configuration, judge, report."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from . import build as build_mod
from . import console as console_mod
from . import report as report_mod
from .config import ACCELS, ConfigError
from .hostinfo import KvmStatus, ToolMissing, kvm_status, qemu_binary, require_tool
from .judge import Check
from .runner import WITNESSES, full_report, make_config, new_run_root, run_matrix


@dataclass
class RunOptions:
    accel: str = "all"
    cpu: str = ""
    machine: str = "microvm"
    json: str | None = None
    junit: str | None = None
    tap: bool = False
    qemu: str | None = None
    witness: str = "both"
    hv_signature: str | None = None
    host_mode: str = "auto"
    kernel_args: tuple[str, ...] = ()
    variant: str = "normal"
    timeout: float = 15.0
    runs_dir: str | None = None
    quiet: bool = False
    view: str = "auto"


def select_accels(choice: str, kvm: KvmStatus) -> tuple[list[str], list[tuple[str, str]]]:
    """Accelerators to run, and (accel, reason) for those skipped."""
    if choice == "all":
        wanted = list(ACCELS)
    elif choice == "auto":
        wanted = ["kvm" if kvm.usable else "tcg"]
    elif choice in ACCELS:
        wanted = [choice]
    else:
        raise ConfigError(f"--accel {choice!r}: choose auto, tcg, kvm or all")
    run, skipped = [], []
    for a in wanted:
        if a == "kvm" and not kvm.usable:
            if choice == "kvm":
                raise ConfigError(f"KVM is not usable: {kvm.reason}")
            skipped.append((a, f"KVM not usable: {kvm.reason}"))
        else:
            run.append(a)
    return run, skipped


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def run_lab(opts: RunOptions, console: Console | None = None) -> tuple[int, dict | None]:
    """Returns (exit status, report). Exit 0 only if nothing failed and nothing erred."""
    # With --tap, stdout carries TAP only; the table goes to stderr.
    console = console or console_mod.make_console(stderr=opts.tap)
    if opts.witness not in WITNESSES:
        raise ConfigError(f"--witness {opts.witness!r}: choose one of {', '.join(WITNESSES)}")
    if opts.view not in console_mod.VIEWS:
        raise ConfigError(f"--view {opts.view!r}: choose one of {', '.join(console_mod.VIEWS)}")
    qemu = qemu_binary(opts.qemu)
    if opts.witness != "serial":
        require_tool("gdb")
    kvm = kvm_status()
    accels, skipped = select_accels(opts.accel, kvm)
    art = build_mod.build(opts.variant)
    cfgs = [
        make_config(a, art, qemu=qemu, kvm=kvm, machine=opts.machine, cpu=opts.cpu,
                    hv_signature=opts.hv_signature, host_mode=opts.host_mode,
                    kernel_args=opts.kernel_args, timeout_s=opts.timeout)
        for a in accels
    ]
    run_root = new_run_root(Path(opts.runs_dir) if opts.runs_dir else None)
    skipped_checks = [Check("run.accel", a, "host", "run", {}, None, None, "skip", why, config=a)
                      for a, why in skipped]
    old = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        outcomes = run_matrix(cfgs, run_root, kvm=kvm, witness=opts.witness)
    except _Terminated:
        console.print(f"[red]terminated: QEMU and GDB were stopped; run folder {run_root}[/]")
        return 143, None
    except KeyboardInterrupt:
        console.print(f"[red]interrupted: QEMU and GDB were stopped; run folder {run_root}[/]")
        return 130, None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    rep = full_report(outcomes, qemu, kvm, skipped_checks)
    report_mod.write_json(rep, run_root / "report.json")
    if opts.json:
        report_mod.write_json(rep, Path(opts.json))
    if opts.junit:
        report_mod.write_junit(rep, Path(opts.junit))
    if not opts.quiet:
        console_mod.render(rep, console, view=opts.view)  # a dead boot: its cause and last serial line
        console.print(f"report: {run_root / 'report.json'}")
    if opts.tap:
        print(report_mod.tap(rep), end="")
    s = rep["summary"]
    return (1 if s["fail"] or s["error"] else 0), rep


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


USER_ERRORS = (ConfigError, ToolMissing, build_mod.BuildError)

