"""Invoke tasks: setup, build, lab.run, lab.debug, test, bench, soak.

`invoke --list` shows them; `invoke --help lab.run` shows a task's options.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from invoke import Collection, Exit, Program, task
from invoke.exceptions import ParseError

# invoke reports a task argument it cannot parse (an unknown option, a missing positional
# argument such as lab.judge's PATH) with exit status 1; the lab's bad inputs are one `error:`
# line and exit status 2, whoever finds them.
_parse_tasks = Program.parse_tasks


def _parse_tasks_exit_2(self: Program) -> None:
    try:
        _parse_tasks(self)
    except ParseError as exc:
        raise Exit(f"error: {exc}", code=2) from None


Program.parse_tasks = _parse_tasks_exit_2

# Debian/Ubuntu packages and the program each one provides.
SYSTEM_PACKAGES = {
    "qemu-system-x86": "qemu-system-x86_64",
    "gcc": "gcc",
    "binutils": "objcopy",
    "make": "make",
    "gdb": "gdb",
    "chromium": "chromium",  # the headless browser that checks the sweep's HTML page (tests)
    # Bochs, the third engine (docs/bochs.md), and its boot ISO; a file where a package has no program
    "bochs": "bochs",
    "bochs-term": "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so.0",
    "bochsbios": "/usr/share/bochs/BIOS-bochs-latest",
    "vgabios": "/usr/share/vgabios/vgabios.stdvga.bin",
    "grub-pc-bin": "/usr/lib/grub/i386-pc/multiboot.mod",
    "xorriso": "xorriso",
    "mtools": "mformat",
}


def _fail(message: str) -> Exit:
    return Exit(f"error: {message}", code=2)


@task
def setup(c):
    """Install the system packages the lab needs (QEMU, gcc, binutils, make, gdb, chromium) with apt-get."""
    missing = [pkg for pkg, prog in SYSTEM_PACKAGES.items()
               if not (os.path.exists(prog) if os.path.isabs(prog) else shutil.which(prog))]
    if not missing:
        print("setup: all system packages present")
        return
    if shutil.which("apt-get") is None:
        raise _fail(f"missing {', '.join(missing)} and no apt-get here: install them with your package manager")
    sudo = "" if os.geteuid() == 0 else "sudo "
    if sudo and shutil.which("sudo") is None:
        raise _fail(f"missing {', '.join(missing)}: run as root: apt-get install {' '.join(missing)}")
    print(f"setup: installing {', '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    c.run(f"{sudo}apt-get update -qq", env=env)
    c.run(f"{sudo}apt-get install -y -qq --no-install-recommends {' '.join(missing)}", env=env, hide="out")


@task(help={"variant": "normal (default), or a negative control: lie (wrong values), lie-context (runs probes "
                       "at another CPL/CR4 than it reports), lie-skip (reports probes it never ran), lie-insn, "
                       "lie-int, lie-frame, lie-past, lie-iomap, lie-guest-cpuid (lies about what the CPU executed: "
                       "docs/gdb.md)"})
def build(c, variant="normal"):
    """Build the host kernel and the guest (incremental)."""
    from lab.build import build as do_build
    from lab.cli import USER_ERRORS

    try:
        art = do_build(variant)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    print(f"kernel: {art.kernel}\nsymbols: {art.symbols}\nguest: {art.guest}")
    from lab import bochs

    if not bochs.missing_reason():  # the Bochs boot ISO (docs/bochs.md), incremental too
        try:
            print(f"bochs iso: {bochs.default_iso(art)}")
        except USER_ERRORS as exc:
            raise _fail(str(exc)) from None


@task(
    help={
        "accel": "auto|tcg|kvm|all|bochs|every (default: all, every usable QEMU accelerator; auto: KVM if "
                 "usable, else TCG; bochs: Bochs alone; every: QEMU's and Bochs, Intel VMX and AMD SVM models)",
        "cpu": "MODEL[,+flag,-flag]: QEMU CPU model (default: qemu64,+svm for TCG, qemu64 for KVM; "
               "list: qemu-system-x86_64 -cpu help); with --accel bochs a Bochs model (default: "
               "corei7_skylake_x; list: bochs -help cpu)",
        "machine": "microvm|pc|q35: QEMU machine (default: microvm)",
        "json": "PATH: also write the JSON report here (default: only runs/<run>/report.json)",
        "junit": "PATH: write a JUnit XML report here (default: none)",
        "tap": "print a TAP 13 report on stdout (the table goes to stderr)",
        "qemu": "PATH: QEMU binary (default: $LAB_QEMU, else qemu-system-x86_64 on PATH)",
        "witness": "serial|gdb|both (default: both, GDB confirms the serial verdicts)",
        "hv_signature": "TEXT: 12 ASCII bytes the lab's host shows its guest at CPUID 0x40000000 "
                        "(default: LabRingMinus)",
        "host_mode": "auto|vmx|svm|soft|none: how the host runs its guest (default: auto, VMX or SVM if the "
                     "CPU has it, else the software host)",
        "kernel_arg": "KEY=VALUE for the kernel command line, repeatable (default: none; keys: "
                      "lab/config.py KERNEL_ARGS, e.g. fault=hang)",
        "variant": "normal|lie|lie-context|lie-skip|lie-insn|lie-int|lie-frame|lie-past|lie-iomap|lie-guest-cpuid: "
                   "kernel build (default: normal; the others are negative controls, docs/gdb.md)",
        "timeout": "S: seconds a boot may take before it is an error (default: 15)",
        "view": "auto|table|scope|wide|popek-goldberg: the checks side by side (made for 100 columns), one "
                "scope at a time, every column unfolded at its natural width, or the Popek-Goldberg table "
                "of x86 (default: auto, the table if it fits the terminal or $COLUMNS, else scope)",
        "only": "FAMILY|PROBE|GLOB[,...]: run and judge just these (families: lab/catalogue.py, e.g. tsc; "
                "probes, e.g. cpuid-vendor; check-id globs, e.g. 'rdtsc.tsd1.*'); the rest is absent "
                "(default: everything)",
        "markdown": "PATH: also write a Markdown report here (default: none)",
    },
    iterable=["kernel_arg"],
    auto_shortflags=False,  # -h is help, not --hv-signature
)
def run(c, accel="all", cpu=None, machine="microvm", json=None, junit=None, tap=False, qemu=None,
        witness="both", hv_signature=None, host_mode="auto", kernel_arg=None, variant="normal", timeout="15",
        view="auto", only=None, markdown=None):
    """Boot the lab kernel under each accelerator and judge what it saw."""
    from lab.cli import USER_ERRORS, RunOptions, run_lab
    from lab.inputs import not_empty

    try:
        not_empty(accel=accel, cpu=cpu, machine=machine, json=json, junit=junit, qemu=qemu, witness=witness,
                  hv_signature=hv_signature, host_mode=host_mode, kernel_arg=kernel_arg, variant=variant,
                  timeout=timeout, view=view, only=only, markdown=markdown)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    opts = RunOptions(accel=accel, cpu=cpu or "", machine=machine, json=json, junit=junit, tap=tap, qemu=qemu,
                      witness=witness, hv_signature=hv_signature, host_mode=host_mode,
                      kernel_args=tuple(kernel_arg or ()), variant=variant, timeout=timeout,
                      view=view, only=only, markdown=markdown)
    try:
        status, _ = run_lab(opts)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    if status:
        raise Exit(code=status)


@task(
    help={
        "accel": "tcg|kvm (default: tcg; under KVM break/tbreak become hardware breakpoints)",
        "scope": "host|guest: where the first breakpoint goes (default: host, at kmain; guest: guest_start, "
                 "or under KVM the software host's IRETQ into its guest, soft_enter_iretq)",
        "break_": "SYMBOL|0xADDR: where to stop first instead (a host symbol, or with --scope guest a guest one; "
                  "the names lab-probes prints)",
        "print_only": "print the QEMU and GDB commands instead of starting them (attach from an IDE)",
        "cpu": "MODEL[,+flag,-flag]: QEMU CPU model (default: qemu64,+svm for TCG, qemu64 for KVM)",
        "machine": "microvm|pc|q35: QEMU machine (default: microvm)",
        "kernel_arg": "KEY=VALUE for the kernel command line, repeatable, as for lab.run (default: none)",
        "host_mode": "auto|vmx|svm|soft|none: how the host runs its guest, as for lab.run (default: auto)",
        "variant": "kernel build, as for lab.run (default: normal)",
    },
    iterable=["kernel_arg"],
    auto_shortflags=False,
)
def debug(c, accel="tcg", scope="host", break_=None, print_only=False, cpu=None, machine="microvm",
          kernel_arg=None, host_mode="auto", variant="normal"):
    """Start QEMU paused and open GDB on it, with host and guest symbols and lab-* commands."""
    from lab.build import build as do_build
    from lab.cli import USER_ERRORS
    from lab.debug import check_inputs, debug_session
    from lab.inputs import not_empty

    try:
        not_empty(accel=accel, scope=scope, break_=break_, cpu=cpu, machine=machine, kernel_arg=kernel_arg,
                  host_mode=host_mode, variant=variant)
        check_inputs(accel=accel, scope=scope, cpu=cpu or "", machine=machine, host_mode=host_mode,
                     kernel_args=tuple(kernel_arg or ()), variant=variant)
        do_build(variant)
        status = debug_session(accel=accel, scope=scope, break_symbol=break_, print_only=print_only,
                               cpu=cpu or "", machine=machine, kernel_args=tuple(kernel_arg or ()),
                               host_mode=host_mode, variant=variant)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    sys.exit(status)


@task(help={"args": "ARGS: extra pytest arguments, e.g. '-k parser' or '-n 2' (default: none)"})
def test(c, args=""):
    """Run the test suite (unit tests, boot tests under TCG and KVM, negative controls)."""
    import shlex

    from lab.cli import USER_ERRORS
    from lab.inputs import pytest_args

    try:
        words = pytest_args(args)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    c.run(shlex.join([sys.executable, "-m", "pytest", *words]), pty=False)


@task(help={"rounds": "N: rounds per measurement (default: 5, about 35 s in all on 2 cores; 1: about 10 s; "
                      "the sweep's part adds about 20 s)",
            "check": "exit 1 if a timing target is missed (default: report the figures only)",
            "update_readme": "rewrite the README's performance block from these figures",
            "from_json": "PATH|last: use this bench.json (last: the newest under runs/) instead of measuring"})
def bench(c, rounds="5", check=False, update_readme=False, from_json=None):
    """Time the lab against the floor and a naive runner (about 55 s); figures in runs/bench-*/bench.json.

    The floor is a bare QEMU boot of the lab's kernel; the naive runner boots once per check."""
    from lab.bench import main as bench_main
    from lab.cli import USER_ERRORS
    from lab.inputs import not_empty, whole_number

    try:
        not_empty(from_json=from_json)
        status = bench_main(rounds=whole_number(rounds, "rounds"), check=check, update_readme=update_readme,
                            from_json=from_json)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    sys.exit(status)


@task(help={"build": "also remove the firmware and guest build folders (default: runs/ only)"})
def clean(c, build=False):
    """Remove everything under runs/ (lab.run itself keeps the last $LAB_KEEP_RUNS, default 20)."""
    from lab.runner import clean_runs

    n, size = clean_runs()
    print(f"clean: removed {n} entries from runs/ ({size / 1e6:.1f} MB)")
    if build:
        for folder in ("firmware", "guests"):
            c.run(f"make -s -C {folder} clean")


@task(help={"n": "N: how many full runs (default: 100, about 2 minutes)",
            "accel": "auto|tcg|kvm|all, as for lab.run (default: all)",
            "witness": "serial|gdb|both (default: both)",
            "json": "PATH: write the soak result here (default: runs/<soak>/soak.json)"})
def soak(c, n="100", accel="all", witness="both", json=None):
    """Run the full matrix N times and report any flake (a status that changes, a fail, an error)."""
    from lab.cli import USER_ERRORS
    from lab.inputs import not_empty, whole_number
    from lab.soak import main as soak_main

    try:
        not_empty(accel=accel, witness=witness, json=json)
        status = soak_main(n=whole_number(n, "n"), accel=accel, witness=witness, json_path=json)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    sys.exit(status)


@task(
    help={
        "accel": "all|tcg|kvm (default: all, every usable one; a KVM that is not usable is a named skip)",
        "models": "GLOBS: comma-separated globs over QEMU's CPU model names, e.g. 'EPYC*,qemu64' (default: *)",
        "tweaks": "all|none|NAME,...: property tweaks (default: all): vendor, rdtscp, hypervisor, svm, svm-on, "
                  "kvm, kvm-intel, tcg-cpuid, lm, no-lm, syscall, umip, pmu",
        "witness": "serial|gdb|both (default: both)",
        "workers": "N|auto: pytest-xdist workers (default: 2; 1 runs without xdist)",
        "out": "DIR: the sweep folder, new or empty (default: runs/sweep-<time>)",
        "versions": "also QEMU's versioned model names (Skylake-Client-v1, ...)",
        "qemu": "PATH: QEMU binary (default: $LAB_QEMU or qemu-system-x86_64)",
        "variant": "normal|lie|lie-context|lie-skip|lie-insn|lie-int|lie-frame|lie-past|lie-iomap|lie-guest-cpuid: "
                   "kernel build (default: normal; the others are negative controls, docs/gdb.md)",
        "timeout": "S: seconds a boot may take before it is an error (default: 15)",
        "splits": "N: pytest-split shards (with --group; default: no split)",
        "group": "K: which pytest-split shard to run, 1..N",
    },
    auto_shortflags=False,
)
def sweep(c, accel="all", models="*", tweaks="all", witness="both", workers="2", out=None, versions=False,
          qemu=None, variant="normal", timeout="15", splits=None, group=None):
    """Every CPU model QEMU lists, on every usable accelerator, plus tweaks (about 70-90 s).

    One pytest test per configuration (pytest-xdist, pytest-split), then one merged matrix
    (table, JSON, JUnit, HTML)."""
    from lab.cli import USER_ERRORS
    from lab.inputs import not_empty
    from lab.sweep import SweepOptions, sweep_main
    from rich.console import Console

    try:
        not_empty(accel=accel, models=models, tweaks=tweaks, witness=witness, workers=workers, out=out, qemu=qemu,
                  variant=variant, timeout=timeout, splits=splits, group=group)
        opts = SweepOptions(accel=accel, models=models, tweaks=tweaks, witness=witness, workers=str(workers),
                            out=out, versions=versions, qemu=qemu, variant=variant, timeout=_number(timeout),
                            splits=_int_or_none(splits, "splits"), group=_int_or_none(group, "group"))
        status = sweep_main(opts, Console(), sys.executable)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    if status:
        raise Exit(code=status)


@task(help={"dir": "DIR: a sweep folder (repeatable: one per worker machine or shard)",
            "out": "DIR: where matrix.json, matrix.junit.xml and matrix.html go (default: the first --dir)",
            "partial": "accept a partial sweep (fewer reports than its plan.json lists): exit 0 if all else "
                       "passed (default: a partial sweep exits 1)"},
      iterable=["dir"], auto_shortflags=False)
def merge(c, dir=None, out=None, partial=False):  # noqa: A002 - the option is --dir
    """Merge sweep folders (workers, shards) into one model x engine matrix: table, JSON, JUnit, HTML."""
    from lab.cli import USER_ERRORS
    from lab.sweep_merge import check_merge_input, merge_main
    from rich.console import Console

    from lab.inputs import not_empty

    try:
        not_empty(dir=dir, out=out)
        folders, target = check_merge_input(list(dir or ()), out)
        status = merge_main(folders, target, Console(), partial_ok=partial)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    if status:
        raise Exit(code=status)


def _number(value) -> float:
    try:
        return float(value)
    except ValueError:
        raise _fail(f"--timeout {value!r}: a number of seconds") from None


def _int_or_none(value, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _fail(f"--{name} {value!r}: a whole number") from None


@task(
    help={
        "path": "RUN_DIR|BOOT_DIR|serial.log: a saved run (runs/<time>), one of its boot folders, or its serial.log",
        "only": "FAMILY|PROBE|GLOB[,...]: judge just these, as lab.run --only (default: what the saved run asked)",
        "json": "PATH: write the new JSON report here (default: none; the saved one is left as it is)",
        "markdown": "PATH: write a Markdown report here (default: none)",
        "view": "auto|table|scope|wide|popek-goldberg, as for lab.run (default: auto)",
    },
    positional=["path"],
    auto_shortflags=False,
)
def judge(c, path=None, only=None, json=None, markdown=None, view="auto"):
    """Judge a saved run again with today's rules (nothing boots) and say which verdicts changed."""
    from lab.cli import USER_ERRORS
    from lab.console import make_console
    from lab.rejudge import judge_main

    if path in ("-h", "--help"):  # invoke hands a positional argument the help flag
        sys.exit(subprocess.run([sys.executable, "-m", "invoke", "--help", "lab.judge"]).returncode)
    if path is None:
        raise _fail("lab.judge needs a saved run: invoke lab.judge RUN_DIR|BOOT_DIR|serial.log (runs/<time>)")
    from lab.inputs import not_empty

    try:
        not_empty(path=path, only=only, json=json, markdown=markdown, view=view)
        status = judge_main(path, make_console(), only=only, json_path=json, markdown=markdown, view=view)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    if status:
        raise Exit(code=status)


lab = Collection("lab")
lab.add_task(run)
lab.add_task(judge)
lab.add_task(debug)
lab.add_task(sweep)
lab.add_task(merge)
ns = Collection()
ns.add_collection(lab)
for t in (setup, build, test, bench, soak, clean):
    ns.add_task(t)
