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
from . import bochs as bochs_mod
from .config import (ACCELS, BOCHS, HOST_MODES, MACHINES, ConfigError, check_cpu_model, check_kernel_arg,
                     check_only, check_signature, only_asked, only_skip_words, parse_timeout)
from .hostinfo import KvmStatus, ToolMissing, cpu_models, kvm_status, qemu_binary, require_tool
from .judge import Check
from .runner import (WITNESSES, full_report, keep_runs, make_config, new_run_root, not_run_check,
                     preboot_all, run_matrix)


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
    timeout: float | str = 15.0  # seconds; text from the command line is checked by validate()
    runs_dir: str | None = None
    quiet: bool = False
    view: str = "auto"
    only: str | None = None  # FAMILY|PROBE|GLOB[,...]: run and judge just those (config.check_only)
    markdown: str | None = None  # PATH: also a Markdown report (lab/report.py)


def select_accels(choice: str, kvm: KvmStatus) -> tuple[list[str], list[tuple[str, str]]]:
    """Accelerators to run, and (accel, reason) for those skipped."""
    if choice == "all":
        wanted = list(ACCELS)
    elif choice in (BOCHS, bochs_mod.EVERY):  # Bochs alone, or next to QEMU's (docs/bochs.md)
        wanted = [BOCHS] if choice == BOCHS else [*ACCELS, BOCHS]
    elif choice == "auto":
        wanted = ["kvm" if kvm.usable else "tcg"]
    elif choice in ACCELS:
        wanted = [choice]
    else:
        raise ConfigError(f"--accel {choice!r}: choose auto, tcg, kvm, all, bochs or every")
    run, skipped = [], []
    for a in wanted:
        if a == "kvm" and not kvm.usable:
            if choice == "kvm":
                raise ConfigError(f"KVM is not usable: {kvm.reason}")
            skipped.append((a, f"KVM not usable: {kvm.reason}"))
        elif a == BOCHS and bochs_mod.missing_reason():
            skipped.append((a, bochs_mod.missing_reason()))
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
    qemu, timeout, kvm, accels, skipped = check_options(opts)
    witness = opts.witness
    if accels and set(accels) == {BOCHS}:
        # Debian's Bochs has its internal debugger, not a gdbstub (docs/bochs.md): serial only.
        if witness == "gdb":
            raise ConfigError("--witness gdb: Bochs has no gdbstub, so GDB cannot witness it (docs/bochs.md); "
                              "use --witness serial, or a QEMU accelerator")
        witness = "serial"
    only = check_only(opts.only)
    kernel_args = tuple(opts.kernel_args)
    if only:  # the firmware leaves out every other host family (firmware/probe.c `skip=`)
        from .runner import with_skips

        kernel_args = with_skips(kernel_args, only_skip_words(only))
    art = build_mod.build(opts.variant)
    cfgs = [
        make_config(a, art, qemu=bochs_mod.bochs_binary() if a == BOCHS else qemu, kvm=kvm, machine=opts.machine,
                    cpu=cpu,
                    hv_signature=opts.hv_signature, host_mode=opts.host_mode,
                    kernel_args=kernel_args, timeout_s=timeout)
        for a, cpu in bochs_mod.engine_cpus(accels, opts.cpu, every=opts.accel == bochs_mod.EVERY)
    ]
    # From the first QEMU on (the pre-boot CPU query), Ctrl-C and SIGTERM stop everything cleanly.
    old = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    run_root = None
    try:
        pres = preboot_all(cfgs)  # the engine's description of each CPU model decides before any boot
        booting = [p for p in pres if not p.skip]
        run_root = new_run_root(Path(opts.runs_dir) if opts.runs_dir else None)
        skipped_checks = [Check("run.accel", a, "host", "run", {}, None, None, "skip", why, config=a)
                          for a, why in skipped] + [not_run_check(p) for p in pres if p.skip]
        outcomes = run_matrix([p.cfg for p in booting], run_root, kvm=kvm, witness=witness)
    except _Terminated:
        console.print(f"[red]terminated: QEMU and GDB were stopped{_folder(run_root)}[/]")
        return 143, None
    except KeyboardInterrupt:
        console.print(f"[red]interrupted: QEMU and GDB were stopped{_folder(run_root)}[/]")
        return 130, None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if only:  # what was not asked is absent, not an error (the boot's own row stays)
        for o in outcomes:
            o.checks = [c for c in o.checks if kept_by_only(c, only)]
    rep = full_report(outcomes, qemu, kvm, skipped_checks, witness)
    if only:
        rep["only"] = list(only)
    bochs_runs = [o for o in outcomes if o.cfg.accel == BOCHS]
    if bochs_runs:  # the header names the engine that ran (lab/console.py)
        rep["host"]["bochs"] = next((v for o in bochs_runs if (v := bochs_mod.version(o.run_dir))), "unknown version")
    if BOCHS in {o.cfg.accel for o in outcomes} and len(outcomes) > 1:  # engines side by side (lab/differential.py)
        from . import differential  # only with Bochs in the run

        rep["differential"] = differential.build(rep)
    report_mod.write_json(rep, run_root / "report.json")
    if opts.json:
        report_mod.write_json(rep, report_mod.check_target(opts.json, "--json"))
    if opts.junit:
        report_mod.write_junit(rep, report_mod.check_target(opts.junit, "--junit"))
    if opts.markdown:
        report_mod.write_markdown(rep, report_mod.check_target(opts.markdown, "--markdown"))
    if not opts.quiet:
        console_mod.render(rep, console, view=opts.view)  # a dead boot: its cause and last serial line
        if "differential" in rep:
            from . import differential

            differential.render(rep["differential"], console)
        console.print(f"report: {run_root / 'report.json'}")
    if opts.tap:
        print(report_mod.tap(rep), end="")
    s = rep["summary"]
    return (1 if s["fail"] or s["error"] else 0), rep


def kept_by_only(check: Check, only: tuple[str, ...]) -> bool:
    """`--only` keeps what it names, and the boot's and the guest's own ends (run.integrity, guest-end)."""
    return check.id == "run.integrity" or check.probe == "guest-end" or only_asked(check.id, check.probe, only)


def check_options(opts: RunOptions) -> tuple[str, float, KvmStatus, list[str], list[tuple[str, str]]]:
    """Every option of a run, before any work (lab.run, soak): the QEMU binary, the timeout, the
    KVM status and the accelerators to run and to skip; one ConfigError/ToolMissing otherwise."""
    if opts.witness not in WITNESSES:
        raise ConfigError(f"--witness {opts.witness!r}: choose one of {', '.join(WITNESSES)}")
    if opts.view not in console_mod.VIEWS:
        raise ConfigError(f"--view {opts.view!r}: choose one of {', '.join(console_mod.VIEWS)}")
    qemu, timeout = validate(opts)
    if opts.witness != "serial":
        require_tool("gdb")
    kvm = kvm_status()
    accels, skipped = select_accels(opts.accel, kvm)
    return qemu, timeout, kvm, accels, skipped


def _folder(run_root: Path | None) -> str:
    return f"; run folder {run_root}" if run_root else " before any boot"


def validate(opts: RunOptions) -> tuple[str, float]:
    """Every path and value the user gave, before any work: raises ConfigError/ToolMissing
    (one line each) and creates nothing. Returns the QEMU binary and the timeout."""
    timeout = parse_timeout(opts.timeout)
    check_only(opts.only)
    named = [(flag, path) for flag, path in (("--json", opts.json), ("--junit", opts.junit),
                                             ("--markdown", opts.markdown)) if path is not None]
    for flag, path in named:
        if path == "":
            raise ConfigError(f"{flag} '': name a file")
        report_mod.check_target(path, flag)
    for i, (flag, path) in enumerate(named):  # one file written twice: the second overwrites the first
        for other, same in named[i + 1:]:
            if Path(path).expanduser().resolve() == Path(same).expanduser().resolve():
                raise ConfigError(f"{flag} and {other} name the same file {path}: give each its own")
    if opts.machine.split(",")[0] not in MACHINES:
        raise ConfigError(f"--machine {opts.machine!r}: choose one of {', '.join(MACHINES)}")
    if opts.accel == BOCHS and opts.machine != RunOptions.machine:
        raise ConfigError(f"--machine {opts.machine}: a QEMU machine; Bochs boots the PC its own configuration "
                          "describes (docs/bochs.md): leave --machine out with --accel bochs")
    if opts.host_mode not in HOST_MODES:
        raise ConfigError(f"--host-mode {opts.host_mode!r}: choose one of {', '.join(HOST_MODES)}")
    if opts.hv_signature is not None:
        check_signature(opts.hv_signature)
    for word in opts.kernel_args:
        check_kernel_arg(word)
    keep_runs()
    qemu = qemu_binary(opts.qemu)
    if opts.accel in (BOCHS, bochs_mod.EVERY):
        bochs_mod.check_choice(opts.accel, opts.cpu)  # Bochs' own model names
    elif opts.cpu:
        check_cpu_model(opts.cpu, cpu_models(qemu), qemu)
    return qemu, timeout


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


USER_ERRORS = (ConfigError, ToolMissing, build_mod.BuildError)
