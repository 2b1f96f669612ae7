"""The sweep: every CPU model QEMU lists, on every usable accelerator, plus property tweaks
that flip each fact the rules depend on; one lab boot per configuration.

This module plans the configurations (from QEMU's own model list) and runs one of them (the
lab's own runner, as `invoke lab.run` does) into a sweep folder as a JSON report; the
folders of any number of workers or shards merge in lab/sweep_merge.py. Distribution is
pytest's: `tests/sweep/` parametrizes one test per configuration, so pytest-xdist and
pytest-split spread it; `invoke lab.sweep` is only the front door to that run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from . import build as build_mod
from . import report as report_mod
from . import processes
from .qmp import QmpClosed, QmpError, QmpTimeout
from .build import Artifacts
from .config import ConfigError
from .hostinfo import KvmStatus, kvm_status
from .judge import Check
from .runner import full_report, keep_runs, make_config, preboot, prune_runs, run_one

ENGINES = ("tcg", "kvm")
SWEEP_KEY = "sweep"  # the per-configuration report's extra section (docs/records.md contract + this)
_VERSIONED = re.compile(r"-v\d+$")

# What the host kernel can run on is the runner's decision from QOM before the boot
# (lab/runner.py preboot); the sweep takes its skips as they are.
# KVM refuses some models unless IA32_ARCH_CAPABILITIES (MSR 0x10a) is left out: QEMU aborts
# with this line (docs/platform.md). The documented fix is the property `-arch-capabilities`.
MSR_10A = "MSR 0x10a"
ARCH_CAP_FIX = ",-arch-capabilities"
# QEMU's words when it refuses a model for what the accelerator lacks ("CPU model 'host' requires KVM or HVF").
MODEL_REQUIRES = re.compile(r"CPU model '[^']+' requires ")


@dataclass(frozen=True)
class Tweak:
    """A model with properties changed so one fact the rules depend on flips."""

    name: str
    fact: str  # which QOM fact it flips, and so which rule it exercises
    cpu: str
    accels: tuple[str, ...] = ENGINES

    @property
    def model(self) -> str:
        return self.cpu.split(",")[0]


TWEAKS: tuple[Tweak, ...] = (
    Tweak("vendor", "leaf 0 vendor string (and the vendor-dependent out-of-range CPUID rule)",
          "qemu64,vendor=GenuineIntel"),
    Tweak("rdtscp", "RDTSCP present: #UD or not", "qemu64,+rdtscp"),
    Tweak("hypervisor", "CPUID.1:ECX[31]", "qemu64,-hypervisor"),
    Tweak("svm", "which host runs the guest (SVM or the software host)", "qemu64,-svm", ("tcg",)),
    Tweak("svm-on", "SVM asked for where the accelerator may not offer it (QOM then says false)", "qemu64,+svm",
          ("kvm",)),
    Tweak("kvm", "KVM's leaves at 0x40000000 hidden", "qemu64,kvm=off", ("kvm",)),
    Tweak("kvm-intel", "KVM's out-of-range CPUID rule for an Intel vendor", "qemu64,vendor=GenuineIntel,kvm=off",
          ("kvm",)),
    # Under KVM QEMU gives a model the host's vendor: both vendors set explicitly, so either
    # host exercises both out-of-range rules and both RDPMC rules (lab/expectations.py).
    Tweak("kvm-amd", "KVM's out-of-range CPUID rule for an AMD vendor", "qemu64,vendor=AuthenticAMD,kvm=off",
          ("kvm",)),
    Tweak("vendor-amd", "leaf 0 vendor string set to AMD's (on an Intel host under KVM it flips)",
          "qemu64,vendor=AuthenticAMD"),
    Tweak("tcg-cpuid", "TCG's leaves at 0x40000000 hidden", "qemu64,tcg-cpuid=off", ("tcg",)),
    Tweak("lm", "long mode given to a 32-bit model", "qemu32,+lm,+syscall"),
    Tweak("no-lm", "long mode taken away from a 64-bit model", "qemu64,-lm"),
    Tweak("syscall", "SYSCALL/SYSRET absent", "qemu64,-syscall"),
    Tweak("umip", "CR4.UMIP offered", "qemu64,+umip"),
    Tweak("pmu", "performance counters offered", "qemu64,pmu=on"),
)
TWEAK_NAMES = tuple(t.name for t in TWEAKS)


@dataclass(frozen=True)
class SweepConfig:
    """One configuration of the sweep: one pytest test, one boot (two with a retry)."""

    accel: str
    cpu: str  # the -cpu string: a model, or a model with a tweak's properties
    tweak: str = ""
    unavailable: tuple[str, ...] = ()  # QEMU's `unavailable-features` for the model here
    skip: str = ""  # why it cannot run at all (e.g. KVM not usable)

    @property
    def id(self) -> str:
        return f"{self.accel}-{self.cpu}"

    @property
    def slug(self) -> str:
        return f"{self.accel}__{re.sub(r'[^A-Za-z0-9_.+-]+', '_', self.cpu)}"


# -- what QEMU offers -----------------------------------------------------------------------
class _Qmp(contextlib.AbstractContextManager):
    """A QEMU with no machine (`-M none`) for questions about CPU models, on one accelerator.
    Every wait is bounded (lab/qmp.py); leaving the `with` block, or an interruption while it
    starts, always ends that QEMU."""

    TIMEOUT_S = 10.0

    def __init__(self, qemu: str, accel: str):
        from .qemu import BootError, _connect_qmp

        self.accel = accel
        self.dir = tempfile.mkdtemp(prefix=f"ringlab-{os.getpid()}-")
        self.path = os.path.join(self.dir, "qmp.sock")
        self.proc = subprocess.Popen(
            [qemu, "-M", "none", "-accel", accel, "-nodefaults", "-no-user-config", "-display", "none",
             "-qmp", f"unix:{self.path},server=on,wait=off", "-S"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.qmp = None
        try:
            self.qmp = _connect_qmp(self.path, self.proc, time.monotonic() + self.TIMEOUT_S)
        except BootError as exc:
            self.close()  # QEMU has ended: its stderr can be read to the end
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
            # QEMU's own words first when it refused to start; a QEMU that stopped answering is named by exc.
            why = f"{exc}; QEMU said: {err}" if err and "is stopped" in str(exc) else (err or str(exc))
            raise ConfigError(f"QEMU ({self.accel}) could not list its CPU models: {why}") from None
        except BaseException:
            self.close()
            raise

    def cmd(self, name: str, args: dict | None = None):
        try:
            return self.qmp.cmd(name, args, timeout_s=self.TIMEOUT_S)
        except QmpTimeout as exc:
            raise ConfigError(f"QEMU ({self.accel}): {exc}: {processes.describe('QEMU', self.proc.pid)}") from None
        except (QmpClosed, QmpError) as exc:
            raise ConfigError(f"QEMU ({self.accel}): {exc}") from None

    def close(self) -> None:
        qmp = self.qmp
        processes.end_group(self.proc, qmp.quit if qmp else None)
        if qmp is not None:
            qmp.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.dir, "qmp.sock"))
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)

    def __exit__(self, *exc) -> None:
        self.close()
        if self.proc.stderr:
            self.proc.stderr.close()


def parse_tweaks(text: str) -> list[Tweak]:
    if text in ("all", ""):
        return list(TWEAKS)
    if text == "none":
        return []
    names = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [n for n in names if n not in TWEAK_NAMES]
    if unknown:
        raise ConfigError(f"--tweaks {','.join(unknown)}: choose all, none or some of {', '.join(TWEAK_NAMES)}")
    return [t for t in TWEAKS if t.name in names]


def parse_accels(text: str) -> list[str]:
    if text in ("all", ""):
        return list(ENGINES)
    accels = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in accels if a not in ENGINES]
    if bad or not accels:
        raise ConfigError(f"--accel {text!r}: choose all, tcg, kvm or tcg,kvm")
    return accels


def _matches(name: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def plan(qemu: str, kvm: KvmStatus, *, accels: str = "all", models: str = "*", tweaks: str = "all",
         versions: bool = False) -> list[SweepConfig]:
    """Every configuration to run, in a fixed order (xdist workers must collect the same list).
    `models`: comma-separated globs over QEMU's model names (a tweak is in when its model is);
    versioned names (`EPYC-v2`) only with `versions`, since each unversioned name is QEMU's
    alias of one of them."""
    globs = [g.strip() for g in models.split(",") if g.strip()] or ["*"]
    chosen_tweaks = parse_tweaks(tweaks)
    out: list[SweepConfig] = []
    for accel in parse_accels(accels):
        if accel == "kvm" and not kvm.usable:
            out.append(SweepConfig(accel, "*", skip=f"KVM not usable: {kvm.reason}"))
            continue
        with _Qmp(qemu, accel) as q:
            defs = q.cmd("query-cpu-definitions")
        unavailable = {d["name"]: tuple(d.get("unavailable-features") or ()) for d in defs}
        names = sorted((d["name"] for d in defs if versions or not _VERSIONED.search(d["name"])), key=str.lower)
        names = [n for n in names if _matches(n, globs)]
        tw = [t for t in chosen_tweaks if accel in t.accels and _matches(t.model, globs) and t.model in unavailable]
        out += [SweepConfig(accel, n, "", unavailable[n]) for n in names]
        out += [SweepConfig(accel, t.cpu, t.name, unavailable[t.model]) for t in tw]
    return out


# -- one configuration ------------------------------------------------------------------------
def _qemu_words(text: str) -> str:
    """QEMU's own complaint from an error text: its `qemu-system-...:` lines if any, else the text."""
    lines = [ln[ln.index("qemu-system"):].strip() for ln in text.splitlines() if "qemu-system" in ln]
    return " | ".join(lines) if lines else " ".join(text.split())


def _skip_report(cfg: SweepConfig, qemu: str, kvm: KvmStatus, reason: str, cpu: str = "") -> dict:
    label = f"{cfg.accel}/microvm/{cpu or cfg.cpu}"
    check = Check("run.integrity", cfg.accel, "host", "run", {}, None, None, "skip", reason, config=label)
    rep = full_report([], qemu, kvm, [check])
    rep["runs"] = [{"accel": cfg.accel, "machine": "microvm", "cpu": cpu or cfg.cpu, "config": label, "command": [],
                    "repro": "", "exit": "skipped", "exit_detail": reason}]
    return rep


def _error_report(cfg: SweepConfig, qemu: str, kvm: KvmStatus, why: str, cpu: str) -> dict:
    label = f"{cfg.accel}/microvm/{cpu}"
    check = Check("run.integrity", cfg.accel, "host", "run", {}, "complete", "no boot", "error",
                  f"QEMU did not start: {why}", config=label)
    rep = full_report([], qemu, kvm, [check])
    rep["runs"] = [{"accel": cfg.accel, "machine": "microvm", "cpu": cpu, "config": label, "command": [],
                    "repro": "", "exit": "error", "exit_detail": why}]
    return rep


TIMEOUT_RETRY_FACTOR = 2  # the second try of a boot that timed out gets twice the time


def run_config(cfg: SweepConfig, *, art: Artifacts, qemu: str, kvm: KvmStatus, out_dir: Path,
               witness: str = "both", timeout_s: float = 15.0) -> dict:
    """Run one configuration with the lab's runner (its pre-boot decision from QOM, then the
    boot), write `<accel>__<cpu>.json` into the sweep folder, and return that report. A KVM
    refusal over MSR 0x10a is retried once with `-arch-capabilities`, named in the report; a
    boot that times out is retried once with TIMEOUT_RETRY_FACTOR times the timeout, named too
    (`timeout_retry`); a model QEMU itself lists as unusable here and refuses to start is a
    skip in QEMU's words."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict = {"accel": cfg.accel, "cpu": cfg.cpu, "tweak": cfg.tweak, "retry": None, "skip": None,
                  "unavailable_features": list(cfg.unavailable),
                  "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}  # which xdist worker ran it
    if cfg.skip:
        meta["skip"] = cfg.skip
        rep = _skip_report(cfg, qemu, kvm, cfg.skip)
    else:
        rep = _attempt(cfg, cfg.cpu, art, qemu, kvm, out_dir / "runs" / cfg.slug, witness, timeout_s, meta)
        if rep is None:
            retry_cpu = cfg.cpu + ARCH_CAP_FIX
            rep = _attempt(cfg, retry_cpu, art, qemu, kvm, out_dir / "runs" / f"{cfg.slug}-retry", witness,
                           timeout_s, meta, retry=False)
        first = rep["runs"][0] if rep.get("runs") else {}
        if first.get("exit") == "timeout":
            # A boot that ran out of time under load (other boots share the cores) is tried once
            # more with a longer timeout, and named: a hang hangs again and stays an error.
            longer = timeout_s * TIMEOUT_RETRY_FACTOR
            meta["timeout_retry"] = {"timeout_s": timeout_s, "retry_timeout_s": longer,
                                     "why": first.get("exit_detail", ""), "first_run_dir": first.get("run_dir", "")}
            rep = _attempt(cfg, first.get("cpu") or cfg.cpu, art, qemu, kvm, out_dir / "runs" / f"{cfg.slug}-timeout-retry",
                           witness, longer, meta, retry=False)
    rep[SWEEP_KEY] = meta
    report_mod.write_json(rep, out_dir / f"{cfg.slug}.json")
    return rep


def _attempt(cfg: SweepConfig, cpu: str, art: Artifacts, qemu: str, kvm: KvmStatus, run_dir: Path,
             witness: str, timeout_s: float, meta: dict, retry: bool = True) -> dict | None:
    """One try: the report, or None when KVM refused MSR 0x10a and a retry should follow."""
    rc = make_config(cfg.accel, art, qemu=qemu, kvm=kvm, cpu=cpu, timeout_s=timeout_s)
    try:
        pre = preboot(rc)
    except ConfigError as exc:
        text = str(exc)
        if retry and cfg.accel == "kvm" and MSR_10A in text and ARCH_CAP_FIX not in cpu:
            meta["retry"] = {"cpu": cpu + ARCH_CAP_FIX, "why": _qemu_words(text)}
            return None
        if cfg.unavailable and MODEL_REQUIRES.search(text):
            # QEMU lists the model as unavailable here and refuses it for what it requires
            # (`host` under TCG); any other refusal is an error.
            meta["skip"] = (f"QEMU refuses this model on {cfg.accel} (unavailable: {', '.join(cfg.unavailable)}): "
                            f"{_qemu_words(text)}")
            return _skip_report(cfg, qemu, kvm, meta["skip"], cpu)
        return _error_report(cfg, qemu, kvm, text, cpu)
    if pre.skip:
        meta["skip"] = pre.skip
        return _skip_report(cfg, qemu, kvm, pre.skip, cpu)
    outcome = run_one(pre.cfg, run_dir, kvm, witness)
    text = outcome.error + (outcome.boot.stderr if outcome.boot else "")
    if retry and cfg.accel == "kvm" and MSR_10A in text and ARCH_CAP_FIX not in cpu:
        meta["retry"] = {"cpu": cpu + ARCH_CAP_FIX, "why": _qemu_words(text)}
        return None
    return full_report([outcome], qemu, kvm, [])


def bad_checks(rep: dict) -> list[dict]:
    return [c for c in rep["checks"] if c["status"] in ("fail", "error")]


def bad_lines(checks: list[dict], limit: int = 4) -> list[str]:
    """The fail and error checks, one line each: a dead boot makes every check an error, so
    its cause (run.integrity) comes first, then a few more and how many were left out."""
    bad = sorted((c for c in checks if c["status"] in ("fail", "error")), key=lambda c: c["id"] != "run.integrity")
    lines = [f"{c['status']} {c['id']}: {c['reason']}" for c in bad[:limit]]
    return lines + ([f"... and {len(bad) - limit} more in the report"] if len(bad) > limit else [])


def report_files(folders: list[Path]) -> list[Path]:
    """The per-configuration reports in sweep folders (not the merged outputs, not run folders)."""
    files: dict[Path, None] = {}
    for folder in folders:
        for p in sorted(Path(folder).glob("*__*.json")):
            files[p.resolve()] = None
    return list(files)


# -- the front door: one pytest run ------------------------------------------------------------
SWEEP_TESTS = "tests/sweep"
PLAN_NAME = "plan.json"  # the configurations a sweep folder is meant to hold (`<slug>.json` each)
DURATIONS = "tests/sweep/durations.json"  # pytest-split's record (--store-durations) of a full sweep
SPLIT_ALGORITHM = "least_duration"  # pytest-split's most even assignment


@dataclass
class SweepOptions:
    accel: str = "all"
    models: str = "*"
    tweaks: str = "all"
    witness: str = "both"
    workers: str = "2"
    out: str | None = None
    versions: bool = False
    qemu: str | None = None
    variant: str = "normal"
    timeout: float = 15.0
    splits: int | None = None
    group: int | None = None
    extra: list[str] = field(default_factory=list)


def pytest_command(opts: SweepOptions, out: Path, python: str) -> list[str]:
    # Every xdist worker starts pytest again: leave out plugins the sweep does not use
    # (hypothesis' alone costs about 1 s per start when it is installed).
    cmd = [python, "-m", "pytest", SWEEP_TESTS, "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
           f"--sweep-dir={out}", f"--sweep-accel={opts.accel}", f"--sweep-models={opts.models}",
           f"--sweep-tweaks={opts.tweaks}", f"--sweep-witness={opts.witness}", f"--sweep-variant={opts.variant}",
           f"--sweep-timeout={opts.timeout}"]
    if opts.versions:
        cmd.append("--sweep-versions")
    if opts.qemu:
        cmd.append(f"--sweep-qemu={opts.qemu}")
    if opts.workers not in ("0", "1"):
        cmd += ["-n", opts.workers]
    if opts.splits:
        cmd += [f"--splits={opts.splits}", f"--group={opts.group}", f"--durations-path={DURATIONS}",
                f"--splitting-algorithm={SPLIT_ALGORITHM}"]
    return cmd + opts.extra


def _check_out(out: Path) -> None:
    """The sweep folder: new or empty of reports, its parent existing and writable."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a folder")
        if report_files([out]):
            raise ConfigError(f"--out {out}: already holds a sweep's reports; name a new folder")
        if any(out.iterdir()):
            raise ConfigError(f"--out {out}: not empty; name a new or an empty folder")
        if not os.access(out, os.W_OK):
            raise ConfigError(f"--out {out}: not writable")
    elif not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    elif not os.access(out.parent, os.W_OK):
        raise ConfigError(f"--out {out}: cannot create it in {out.parent} (not writable)")


def validate(opts: SweepOptions, kvm: KvmStatus) -> tuple[Path, list[SweepConfig]]:
    """Every option checked before any boot: one ConfigError (or ToolMissing) names the problem."""
    from .build import ROOT, VARIANTS
    from .hostinfo import qemu_binary, require_tool
    from .runner import WITNESSES

    if opts.witness not in WITNESSES:
        raise ConfigError(f"--witness {opts.witness!r}: choose one of {', '.join(WITNESSES)}")
    if opts.variant not in VARIANTS:
        raise ConfigError(f"--variant {opts.variant!r}: choose one of {', '.join(VARIANTS)}")
    if not (opts.workers == "auto" or (opts.workers.isdigit() and int(opts.workers) >= 1)):
        raise ConfigError(f"--workers {opts.workers!r}: a number of pytest-xdist workers (at least 1), or auto")
    if opts.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    if (opts.splits is None) != (opts.group is None) or (opts.splits and not 1 <= opts.group <= opts.splits):
        raise ConfigError("--splits N and --group K go together, with 1 <= K <= N")
    parse_tweaks(opts.tweaks)
    accels = parse_accels(opts.accel)
    if accels == ["kvm"] and not kvm.usable:
        raise ConfigError(f"KVM is not usable: {kvm.reason}")
    qemu = qemu_binary(opts.qemu)
    if opts.witness != "serial":
        require_tool("gdb")
    stamp = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out = Path(opts.out).resolve() if opts.out else ROOT / "runs" / stamp
    _check_out(out)
    # pytest runs in the project folder: paths the user gave relative to theirs are made absolute.
    opts.out, opts.qemu = str(out), os.path.abspath(qemu)
    cfgs = plan(qemu, kvm, accels=opts.accel, models=opts.models, tweaks=opts.tweaks, versions=opts.versions)
    if not [c for c in cfgs if c.cpu != "*"]:
        raise ConfigError(f"--models {opts.models!r} matches no CPU model QEMU lists")
    return out, cfgs


def _run_pytest(cmd: list[str], cwd: Path) -> int:
    """pytest in its own process group. Ctrl-C or SIGTERM reach it as SIGINT, which pytest and
    its xdist workers turn into KeyboardInterrupt: every boot tears its QEMU and GDB down."""
    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)
    stopped = 0

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopped
        stopped = 128 + signum
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=60 if stopped else None)
                break
            except subprocess.TimeoutExpired:  # pytest did not stop within a minute
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return stopped or rc


def sweep_main(opts: SweepOptions, console: Console, python: str) -> int:
    """`invoke lab.sweep`: one pytest run over the configurations, then the merged matrix."""
    from .build import ROOT
    from .sweep_merge import merge_main  # here: lab/sweep_merge.py imports this module

    kvm = kvm_status()
    out, cfgs = validate(opts, kvm)
    build_mod.build(opts.variant)  # a build failure is one clear error, not one per test
    out.mkdir(parents=True, exist_ok=True)
    # What the sweep means to report: lab.merge tells a partial sweep from a whole one by it.
    report_mod.write_json({"configs": sorted(c.slug for c in cfgs)}, out / PLAN_NAME)
    if out.parent == ROOT / "runs":  # the default place: kept as lab.run's folders are
        prune_runs(out.parent, keep_runs())
    cmd = pytest_command(opts, out, python)
    console.print(f"sweep: {len(cfgs)} configurations into {out}", highlight=False)
    console.print(f"pytest: {shlex.join(cmd)}", highlight=False, soft_wrap=True)
    t0 = time.monotonic()
    rc = _run_pytest(cmd, ROOT)
    wall = time.monotonic() - t0
    if rc in (130, 143):
        console.print(f"[red]sweep stopped: pytest ended its boots; the reports so far are in {out}[/]")
        return rc
    if not report_files([out]):
        console.print(f"[red]the pytest run wrote no report (pytest exit {rc})[/]")
        return rc or 1
    status = merge_main([out], out, console)
    console.print(f"sweep wall time: {wall:.1f} s (pytest exit {rc})", highlight=False)
    return status or rc
