"""A QEMU, GDB or Bochs that stops answering (SIGSTOP from outside, as a user's machine can do
it: a debugger attached, a process stopped or swapped out) at several moments of a run: the run
ends with a verdict that names the stopped process within its timeout + 2 s, and leaves no
process and no temporary folder behind.

Each case is a lab run in a process of its own (the lab's own entry point, run_lab, with its
runs in tmp_path), and the stop comes from this test process. The cases mostly sleep (a stopped
process uses no CPU), so they run side by side, once per module; one test per case then reads
its outcome.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.bochs import missing_reason
from lab.hostinfo import kvm_status

TIMEOUT = 4.0  # a boot's timeout: 3x the slowest healthy boot here (KVM, both witnesses)
BOCHS_TIMEOUT = 10.0  # Bochs boots in about 3 s
SLACK = 2.0  # the bound: a verdict within the timeout + 2 s
END_RECORD = re.compile(rb"@@LAB \d+ end ")

# When the target is stopped: as soon as it exists (QEMU: before its QMP socket; GDB: before
# it attaches), once QEMU has made its QMP socket (before the lab's connection is answered), at
# the host's first probe record, at the host's first exit from its guest, and between the `end`
# record and the emulator's exit (fault=linger holds the firmware a moment at the last two).
START, QMP_SOCKET = "start", "qmp-socket"
MOMENTS = {
    START: None,
    QMP_SOCKET: None,
    "probes": re.compile(rb"@@LAB \d+ obs scope=host "),
    "guest": re.compile(rb"@@LAB \d+ info linger=guest"),
    "teardown": END_RECORD,
}


@dataclass
class Case:
    accel: str
    witness: str
    target: str  # qemu | gdb | bochs (the process stopped)
    moment: str

    @property
    def id(self) -> str:
        return f"{self.accel}-{self.witness}-{self.target}-{self.moment}"


@dataclass
class Outcome:
    case: Case
    took: float = 0.0
    returncode: int | None = None
    stopped_pid: int | None = None
    stopped_at: float | None = None
    missed: str = ""  # the stop came later than its moment
    report: dict | None = None
    output: str = ""
    left: list[str] = field(default_factory=list)  # processes of the run still there
    tmp_left: list[str] = field(default_factory=list)


def cases() -> list[Case]:
    out = []
    for accel in ("tcg", "kvm"):
        for witness in ("serial", "gdb", "both"):
            for moment in MOMENTS:
                out.append(Case(accel, witness, "qemu", moment))
                if witness != "serial" and moment != QMP_SOCKET:
                    out.append(Case(accel, witness, "gdb", moment))
    # Bochs: not at the guest's first exit, whose linger (2^30 TSC cycles) takes Bochs longer
    # than its timeout (its TSC counts emulated instructions).
    out += [Case("bochs", "serial", "bochs", m) for m in MOMENTS if m not in (QMP_SOCKET, "guest")]
    return out


DRIVER = """
import json, sys
from rich.console import Console
from lab.cli import USER_ERRORS, RunOptions, run_lab
accel, witness, timeout, runs, kernel_args = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:]
opts = RunOptions(accel=accel, witness=witness, timeout=timeout, runs_dir=runs, kernel_args=tuple(kernel_args))
try:  # as tasks.py's lab.run does
    status, rep = run_lab(opts, Console(width=100))
except USER_ERRORS as exc:
    print(f"error: {exc}")
    sys.exit(2)
sys.exit(status)
"""

PROGRAMS = {"qemu": "qemu-system", "gdb": "gdb", "bochs": "bochs"}


def _descendants(pid: int) -> list[int]:
    """The process's descendants, from each thread's `children` list (proc(5)): fast enough
    to catch QEMU in the milliseconds before it makes its QMP socket."""
    out, todo = [], [pid]
    while todo:
        for children in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                kids = [int(k) for k in open(children).read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def _booting(case: Case, pid: int) -> bool:
    """Bochs: the boot's process (run with the run folder's bochs.rc), not the one the pre-boot
    starts to describe the CPU model."""
    if case.target != "bochs":
        return True
    try:
        return b"bochs.rc" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


def _marked(tag: str) -> list[str]:
    """Processes that carry this case's environment tag: everything the run started."""
    found = []
    for env in glob.glob("/proc/[0-9]*/environ"):
        try:
            if f"RINGLAB_STALL_CASE={tag}".encode() in open(env, "rb").read().split(b"\0"):
                pid = int(env.split("/")[2])
                found.append(f"{pid} {_comm(pid)}")
        except OSError:
            continue
    return found


def run_case(case: Case, base: Path) -> Outcome:
    out = Outcome(case)
    runs = base / case.id
    timeout = BOCHS_TIMEOUT if case.accel == "bochs" else TIMEOUT
    args = ["fault=linger"] if case.moment in ("guest", "teardown") else []
    env = dict(os.environ, RINGLAB_STALL_CASE=case.id, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, case.accel, case.witness, str(timeout), str(runs), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    marker = MOMENTS[case.moment]

    def stopper() -> None:
        program = PROGRAMS[case.target]
        while proc.poll() is None:
            targets = [p for p in _descendants(proc.pid) if _comm(p).startswith(program) and _booting(case, p)]
            if targets and case.moment == QMP_SOCKET and not glob.glob(f"/tmp/ringlab-{proc.pid}-*/qmp.sock"):
                targets = []
            if case.target == "qemu" and case.moment == START and targets and glob.glob(f"/tmp/ringlab-{proc.pid}-*/qmp.sock"):
                out.missed = "QEMU had made its QMP socket already"  # too late for `start`: say so
            if targets:
                if marker is not None:
                    logs = glob.glob(str(runs / "*" / "*" / "serial.log"))
                    if not any(marker.search(open(log, "rb").read()) for log in logs):
                        time.sleep(0.001)
                        continue
                pid = targets[0]
                os.kill(pid, signal.SIGSTOP)
                out.stopped_pid, out.stopped_at = pid, time.monotonic() - t0
                return
            time.sleep(0.001)

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    try:
        output, _ = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:  # the lab hung: the test fails, and cleans up after it
        proc.kill()
        output, _ = proc.communicate()
    out.took = time.monotonic() - t0
    out.returncode = proc.returncode
    out.output = output.decode(errors="replace")
    thread.join(1)
    reports = glob.glob(str(runs / "*" / "report.json"))
    out.report = json.loads(Path(reports[0]).read_text()) if reports else None
    time.sleep(0.05)  # a process killed a moment ago leaves /proc a moment later
    out.left = _marked(case.id)
    out.tmp_left = glob.glob(f"/tmp/ringlab-{proc.pid}-*")
    for line in out.left:  # a failed case must not leave its processes to the next
        pid = int(line.split()[0])
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return out


def _runnable(case: Case) -> str:
    """Why a case cannot run here ("" when it can)."""
    if case.accel == "kvm" and not kvm_status().usable:
        return f"KVM not usable: {kvm_status().reason}"
    if case.accel == "bochs":
        return missing_reason()
    return ""


CASES = cases()


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, artifacts) -> dict[str, Outcome]:  # noqa: ARG001 - built first
    """Every selected case's outcome (`-k` selects cases by their ids)."""
    base = tmp_path_factory.mktemp("stalls")
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "callspec", None) and "case" in item.callspec.params}
    todo = [c for c in CASES if c.id in selected and not _runnable(c)]
    # Three at a time: a stopped process sleeps, so the 2 cores serve the others' boots.
    with ThreadPoolExecutor(max_workers=3) as pool:
        return {o.case.id: o for o in pool.map(lambda c: run_case(c, base), todo)}


def _verdict_text(out: Outcome) -> str:
    """Everything the run said about why it ended: each run's exit detail, GDB's error, the
    run folder's checks' reasons, and the console."""
    rep = out.report or {}
    parts = [out.output]
    for run in rep.get("runs", []):
        parts += [str(run.get("exit_detail")), str(run.get("gdb_error"))]
    return "\n".join(parts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_stopped_process_gives_a_verdict_in_time_and_leaves_nothing(case, outcomes):
    why = _runnable(case)
    if why:
        pytest.skip(why)
    out = outcomes[case.id]
    timeout = BOCHS_TIMEOUT if case.accel == "bochs" else TIMEOUT
    name = {"qemu": "QEMU", "gdb": "GDB", "bochs": "Bochs"}[case.target]
    assert out.stopped_pid is not None, f"the run ended before {case.moment} came: {out.output[-1500:]}"
    assert not out.missed, out.missed
    # The verdict: in time, a report, and the stopped process named with its state.
    assert out.took <= timeout + SLACK, f"{out.took:.2f} s (stopped at {out.stopped_at:.2f} s): {out.output[-1500:]}"
    # A GDB stopped after its last planned stop (after the end record; under kvm_pvm, whose
    # plan has no stop in the guest's part, at the guest) has recorded everything: its readings
    # stand (exit 0 if all pass), and the report still names it. A stopped emulator costs the
    # run its verdicts.
    assert out.returncode in ((0, 1) if case.target == "gdb" else (1,)), out.output[-1500:]
    assert out.report is not None, out.output[-1500:]
    text = _verdict_text(out)
    assert f"{name} (pid {out.stopped_pid}) is stopped (process state T" in text, text[-2500:]
    assert "Traceback" not in out.output, out.output
    # Nothing left: no process of the run (by the environment it passed on), no temporary folder.
    assert not out.left, f"left running: {out.left}"
    assert not out.tmp_left, f"left in /tmp: {out.tmp_left}"
    if case.target != "gdb":  # the escalating end, in the run folder's report
        steps = [s for run in out.report["runs"] for s in (run.get("teardown") or {}).get(name, [])]
        assert steps and steps[0].startswith("SIGCONT (it was stopped"), (steps, out.report["runs"])



# -- the other entry points: lab.sweep's model query, lab.debug's QEMU ------------------------
@pytest.mark.tcg
def test_the_sweeps_model_query_names_a_stopped_qemu_in_time(monkeypatch, no_leftovers):
    """lab.sweep asks a QEMU with no machine for its CPU models: one stopped after it made its
    QMP socket is one error naming it, within the query's bound, and nothing is left."""
    import lab.qemu
    from lab.config import ConfigError
    from lab.hostinfo import qemu_binary
    from lab.sweep import _Qmp

    real = lab.qemu._wait_for_path

    def stop_once_made(path, proc, deadline):  # the moment the hang began
        real(path, proc, deadline)
        os.kill(proc.pid, signal.SIGSTOP)

    monkeypatch.setattr(lab.qemu, "_wait_for_path", stop_once_made)
    monkeypatch.setattr(_Qmp, "TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"QEMU \(pid \d+\) is stopped \(process state T"):
        with _Qmp(qemu_binary(), "tcg"):
            pass
    assert time.monotonic() - t0 < 1.0 + SLACK


@pytest.mark.tcg
def test_lab_debug_ends_a_stopped_qemu_and_its_socket(tmp_path, artifacts, no_leftovers):  # noqa: ARG001
    from lab.debug import plan_session, start_qemu, stop_qemu

    s = plan_session("tcg", "host", unix_socket=True, run_dir=tmp_path / "d")
    proc = start_qemu(s)
    os.kill(proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    stop_qemu(s, proc)
    assert time.monotonic() - t0 < SLACK and proc.poll() is not None
    assert not os.path.exists(os.path.dirname(s.gdb_addr))
