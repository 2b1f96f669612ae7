"""The processes a run starts (QEMU, Bochs, GDB): what state each is in when it stops
answering, and the escalating end that leaves none of them, or their process group, behind.

A process can stop answering without exiting: stopped by a signal or a debugger (state T/t,
e.g. `kill -STOP`, a ptrace attach), stuck in the kernel (D), or swapped out. Every wait of the
lab is bounded; when one runs out, `describe` says which process did not answer and why, and
`end_group` ends it whatever its state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

# proc(5): the state letter in /proc/<pid>/stat.
STATE_NAMES = {
    "R": "running", "S": "sleeping", "D": "in an uninterruptible wait", "T": "stopped",
    "t": "stopped by a tracer", "Z": "a zombie", "X": "dead", "I": "idle",
}
STOPPED = ("T", "t")


def state(pid: int | None) -> str | None:
    """The process's state letter (proc(5)), or None when there is no such process."""
    if pid is None:
        return None
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read().decode(errors="replace")
    except OSError:
        return None
    # The command name in parentheses may itself hold spaces or ')': the state follows the last ')'.
    rest = stat[stat.rfind(")") + 1:].split()
    return rest[0] if rest else None


def is_stopped(pid: int | None) -> bool:
    return state(pid) in STOPPED


def describe(name: str, pid: int | None) -> str:
    """One phrase for a verdict: 'QEMU (pid 12) is stopped (process state T: a signal or a
    debugger stopped it)'."""
    letter = state(pid)
    if letter is None:
        return f"{name} (pid {pid}) has exited"
    what = STATE_NAMES.get(letter, "in state " + letter)
    why = {"T": ": a signal or a debugger stopped it", "t": ": a debugger holds it",
           "D": ": waiting in the kernel", "Z": ": it exited and was not reaped yet"}.get(letter, "")
    return f"{name} (pid {pid}) is {what} (process state {letter}{why})"


def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    try:
        os.killpg(proc.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=max(0.0, seconds))
        return True
    except subprocess.TimeoutExpired:
        return False


def end_group(proc: subprocess.Popen, polite: Callable[[float], object] | None = None, *,
              polite_s: float = 0.5, term_s: float = 0.5, kill_s: float = 3.0) -> list[str]:
    """End `proc` (started with start_new_session=True) and everything in its process group;
    returns the steps taken, for the run folder and the verdict.

    A stopped process acts on nothing but SIGKILL until it is continued (signal(7)): it gets
    SIGCONT first, so the polite request (`polite(seconds)`, e.g. QMP `quit`) and SIGTERM can
    work. Then SIGTERM, then SIGKILL; each wait is bounded, so the whole end takes at most
    polite_s + term_s + kill_s seconds."""
    steps: list[str] = []
    if proc.poll() is None:
        letter = state(proc.pid)
        if letter in STOPPED:
            _signal_group(proc, signal.SIGCONT)
            steps.append(f"SIGCONT (it was stopped, state {letter})")
        if polite is not None:
            t0 = time.monotonic()
            try:
                polite(polite_s)
                steps.append("asked to quit")
            except Exception as exc:  # noqa: BLE001 - the signals below end it anyway
                steps.append(f"asked to quit: no answer ({type(exc).__name__})")
            _wait(proc, polite_s - (time.monotonic() - t0))
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            steps.append("SIGTERM")
            if not _wait(proc, term_s):
                _signal_group(proc, signal.SIGKILL)
                steps.append("SIGKILL")
                if not _wait(proc, kill_s):
                    steps.append(f"still there after SIGKILL ({describe('it', proc.pid)})")
        if proc.poll() is not None and steps:
            steps.append(f"ended (status {proc.returncode})")
    # The process itself is gone; nothing it spawned may linger in its group.
    _signal_group(proc, signal.SIGKILL)
    return steps


def kill_group(proc: subprocess.Popen, grace_s: float = 1.0) -> list[str]:
    """end_group without a polite request: SIGCONT if stopped, SIGTERM, then SIGKILL."""
    return end_group(proc, term_s=grace_s)

