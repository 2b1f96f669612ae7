"""Every input of every task (tasks.py) is checked before any work: a bad value is one `error:`
line naming the option, exit status 2, and nothing created (no run folder, no file, no QEMU).
The options come from invoke's own description of the tasks, so a new option without a bad
value here (and so without a check) fails the enumeration test."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

import tasks
from lab.build import ROOT

# task -> option (invoke's attribute name) -> bad inputs (command-line words after the task)
BAD = {
    "bench": {"rounds": ["--rounds abc", "--rounds 0"],
              "from_json": ["--from-json ''", "--from-json /nonexistent/bench.json"]},
    "build": {"variant": ["--variant nosuch"]},
    "lab.debug": {
        "accel": ["--accel bochs", "--accel nosuch"],
        "scope": ["--scope nosuch"],
        "break_": ["--break ''", "--break nosuchsymbol", "--scope guest --break kmain"],
        "cpu": ["--cpu nosuchmodel", "--cpu qemu64,+nosuchflag", "--cpu ''"],
        "machine": ["--machine nosuch"],
        "kernel_arg": ["--kernel-arg nosuch=1", "--kernel-arg ''"],
        "host_mode": ["--host-mode nosuch"],
        "variant": ["--variant nosuch"],
    },
    "lab.merge": {"dir": ["--dir ''", "--dir /nonexistent/sweep"], "out": ["--out ''"]},
    "lab.run": {
        "accel": ["--accel nosuch"],
        "cpu": ["--cpu nosuchmodel", "--cpu ''", "--cpu qemu64,+nosuchflag"],
        "machine": ["--machine nosuch", "--accel bochs --machine q35"],
        "json": ["--json ''", "--json /nonexistent/r.json", "--json {tmp}/r.x --junit {tmp}/r.x"],
        "junit": ["--junit ''", "--junit /nonexistent/r.xml"],
        "qemu": ["--qemu ''", "--qemu /nonexistent/qemu"],
        "witness": ["--witness nosuch"],
        "hv_signature": ["--hv-signature short", "--hv-signature ''"],
        "host_mode": ["--host-mode nosuch"],
        "kernel_arg": ["--kernel-arg nosuch=1", "--kernel-arg fault=nosuch"],
        "variant": ["--variant nosuch"],
        "timeout": ["--timeout abc", "--timeout 0"],
        "view": ["--view nosuch"],
        "only": ["--only ''", "--only nosuchfamily"],
        "markdown": ["--markdown ''", "--markdown /nonexistent/r.md", "--json {tmp}/r.x --markdown {tmp}/r.x"],
    },
    "lab.judge": {
        "path": ["/nonexistent/run", "''"],
        "only": ["runs --only nosuchfamily"],
        "json": ["runs --json /nonexistent/r.json", "runs --json ''"],
        "markdown": ["runs --markdown /nonexistent/r.md"],
        "view": ["runs --view nosuch"],
    },
    "lab.sweep": {
        "accel": ["--accel nosuch"],
        "models": ["--models ''", "--models 'nosuchmodel*'"],
        "tweaks": ["--tweaks ''", "--tweaks nosuch"],
        "witness": ["--witness nosuch"],
        "workers": ["--workers 0", "--workers abc"],
        "out": ["--out ''", "--out docs"],  # docs/: a folder that is not empty
        "qemu": ["--qemu /nonexistent/qemu"],
        "variant": ["--variant nosuch"],
        "timeout": ["--timeout abc"],
        "splits": ["--splits 2", "--splits abc --group 1"],
        "group": ["--group 1"],
    },
    "soak": {"n": ["-n abc", "-n 0", "-n -1"], "accel": ["--accel foo"], "witness": ["--witness foo"],
             "json": ["--json ''"]},
    "test": {"args": ["--args \"'unbalanced\""]},
}


def options() -> list[tuple[str, str]]:
    """(task, option) for every valued option of every task: invoke's own description."""
    return [(name, arg.name) for name in sorted(tasks.ns.task_names)
            for arg in tasks.ns[name].get_arguments() if arg.kind is not bool]


def test_every_option_of_every_task_has_bad_inputs_here():
    have = {(task, opt) for task, opts in BAD.items() for opt in opts}
    missing = [o for o in options() if o not in have]
    assert not missing, f"options with no bad input (and no check) in tests/test_every_input.py: {missing}"
    assert not have - set(options()), "bad inputs for options that no longer exist"


def _tree(root) -> set[str]:
    """The project's top level and runs/: where a task that started working leaves things."""
    names = {p.name for p in root.iterdir()}
    runs = root / "runs"
    return names | ({f"runs/{p.name}" for p in runs.iterdir()} if runs.is_dir() else set())


def _qemus() -> set[str]:
    """Orphaned QEMU, Bochs or GDB processes on this checkout's kernel: a task that exited and
    left one behind (its parent gone, it is the init process's). Another test's live ones have
    their lab as parent."""
    out = subprocess.run(["pgrep", "-P", "1", "-f", f"(qemu-system|bochs|gdb).*{ROOT}/"],
                         capture_output=True, text=True).stdout
    return set(out.split())


CASES = [(task, opt, words) for task, opts in BAD.items() for opt, inputs in opts.items() for words in inputs]


@pytest.mark.parametrize("task,opt,words", CASES, ids=[f"{t} {w}" for t, _, w in CASES])
def test_a_bad_input_is_one_error_line_and_exit_2_before_any_work(task, opt, words, tmp_path):
    before, qemus = _tree(ROOT), _qemus()
    argv = [sys.executable, "-m", "invoke", task, *shlex.split(words.format(tmp=tmp_path))]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "100"})
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (argv, proc.returncode, out[-2000:])
    assert len(errors) == 1 and "Traceback" not in out, out[-2000:]
    flag = "-n" if opt == "n" else "--" + opt.rstrip("_").replace("_", "-")
    named = {"json": ("--json", "--junit"), "markdown": ("--json", "--markdown"), "path": ("lab.judge", "''", "PATH", "/nonexistent")}.get(opt, (flag,))
    assert any(f in errors[0] for f in named) or "KVM" in errors[0], errors[0]
    assert _tree(ROOT) == before, sorted(_tree(ROOT) ^ before)  # nothing created
    assert not list(tmp_path.iterdir())
    assert _qemus() <= qemus


@pytest.mark.parametrize("words", ["lab.judge", "lab.run --nosuch", "soak -n"])
def test_what_invoke_itself_cannot_parse_is_one_error_line_and_exit_2(words):
    """A missing positional argument, an unknown option, an option without its value: invoke's own
    parse errors, which tasks.py makes the lab's `error:` line and exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "invoke", *words.split()], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, proc.stdout, proc.stderr)
