"""A GDB/MI driver that waits for completion, not for a quiet period.

pygdbmi's readers return when output stops for a while (a timeout), which costs a fixed
delay per command and can cut a slow answer in two. Here every command carries its own
numeric token and a call returns as soon as GDB's result record for that token
(`^done`, `^running`, `^connected`, `^error`, `^exit`) arrives. Reads are select()-based with
short polls; there is no fixed sleep anywhere.

GDB runs in its own process group and is always torn down by the context manager
(interrupt and detach if a target is attached, `-gdb-exit`, then SIGTERM, then SIGKILL to
the group).
Every line sent and received goes to a transcript file with timestamps.

Usage:
    with Gdb(transcript=run_dir / "gdb.mi.log", accel="tcg") as gdb:
        gdb.connect("127.0.0.1:1234", symbols="firmware/build/host.elf64")
        gdb.breakpoint("*exc_dispatch")   # hardware under KVM, software under TCG
        gdb.cont()
        stop = gdb.wait_stopped(5.0)
        cs = gdb.read_register("cs")
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pygdbmi.IoManager import IoManager

from . import processes

__all__ = [
    "Gdb",
    "GdbClosed",
    "GdbError",
    "GdbTimeout",
    "MiResult",
    "HW_BREAKPOINT_SLOTS",
    "TARGET_CLOSED",
    "mi_quote",
]

# x86 has four debug address registers (DR0-DR3); QEMU's KVM gdbstub offers exactly those.
HW_BREAKPOINT_SLOTS = 4
# Synthetic stop reason when the remote end goes away (QEMU exited, e.g. isa-debug-exit).
TARGET_CLOSED = "target-closed"


class GdbError(RuntimeError):
    """GDB answered `^error` (message is GDB's own) or could not run the command."""

    def __init__(self, command: str, message: str):
        super().__init__(f"gdb: {command!r} failed: {message}")
        self.command = command
        self.message = message


class GdbClosed(GdbError):
    """GDB's output ended (the process died or exited) while we waited for it."""


class GdbTimeout(TimeoutError):
    """No completion within the time allowed; names the command and the last output."""

    def __init__(self, command: str, timeout: float, last_output: list[str], why: str = ""):
        tail = "\n  ".join(last_output) or "(no output)"
        why = f" ({why})" if why else ""
        super().__init__(f"gdb: no completion of {command!r} within {timeout:.3g} s{why}; last output:\n  {tail}")
        self.command = command
        self.timeout = timeout
        self.last_output = last_output


@dataclass
class MiResult:
    """The result record of one command plus every record that arrived before it."""

    result_class: str  # done | running | connected | exit
    payload: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def console(self) -> str:
        """Text GDB printed on its console stream (`~"..."`) while running the command."""
        return "".join(r["payload"] for r in self.records if r.get("type") == "console" and r.get("payload"))


def mi_quote(text: str) -> str:
    """An MI c-string: needed for any argument with spaces, quotes or backslashes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _TeeReader:
    """A non-blocking pipe end for IoManager that also feeds the transcript line by line.

    IoManager only hands back parsed records; the transcript wants the raw lines.
    """

    def __init__(self, pipe: IO[bytes], owner: "Gdb", mark: str):
        self._pipe = pipe
        self._owner = owner
        self._mark = mark
        self._partial = b""
        self.eof = False

    def fileno(self) -> int:
        return self._pipe.fileno()

    def flush(self) -> None:  # IoManager calls it; a read end has nothing to flush
        pass

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                data = os.read(self.fileno(), 65536)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
                break
            chunks.append(data)
        data = b"".join(chunks)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._owner._log(self._mark, line.decode(errors="replace").rstrip("\r"))
        return data


# GDB's own Python library, byte-compiled once into the lab's cache (`invoke clean` empties it)
# rather than compiled at every GDB start where the interpreter writes no bytecode (the
# environment's PYTHONDONTWRITEBYTECODE, or a system folder it may not write to): ~20 ms of
# each GDB's ~60 ms start-up, and every run starts one per boot.
GDB_PYCACHE = Path(__file__).resolve().parent.parent / "runs" / ".cache" / "gdb-python"


def gdb_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(GDB_PYCACHE)
    return env


class Gdb:
    """One GDB process speaking MI3. Use as a context manager."""

    def __init__(
        self,
        transcript: Path | str | None = None,
        *,
        accel: str = "tcg",
        gdb: str = "gdb",
        extra_args: tuple[str, ...] = (),
        timeout: float = 5.0,
        poll: float = 0.05,
        deadline: float | None = None,
    ):
        self.accel = accel
        self.timeout = timeout
        # time.monotonic() by which every command and wait ends (the boot's): a command then gets
        # at most what is left. close() has its own bound.
        self.deadline = deadline
        self.teardown: list[str] = []  # how close() ended GDB, when it had to
        self._close_lock = threading.Lock()
        self.poll = poll
        self._cmd = [gdb, "--nx", "--quiet", "--interpreter=mi3", *extra_args]
        self._transcript_path = Path(transcript) if transcript else None
        self._transcript: IO[str] | None = None
        self._t0 = time.monotonic()
        self._token = 0
        self._pending: collections.deque[dict] = collections.deque()  # records read, not yet consumed
        self._stops: collections.deque[dict] = collections.deque()
        self._tail: collections.deque[str] = collections.deque(maxlen=12)
        self._reg_index: dict[str, int] | None = None
        self._hw_slots: dict[str, str] = {}  # breakpoint number -> location, hardware only
        self.proc: subprocess.Popen | None = None
        self.connected = False
        self.target_closed = False
        self.running = False  # the target runs (between *running and *stopped)
        self._unresponsive = False  # a command timed out: GDB is not listening

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "Gdb":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._transcript_path:
            self._transcript_path.parent.mkdir(parents=True, exist_ok=True)
            self._transcript = open(self._transcript_path, "w", buffering=1)
            self._transcript.write(f"# gdb/mi transcript, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            self._transcript.write(f"# command: {' '.join(self._cmd)}\n")
            self._transcript.write("# columns: seconds since start, > sent / < stdout / ! stderr, line\n")
        self._t0 = time.monotonic()
        # Own session = own process group, so teardown can signal GDB and nothing else.
        self.proc = subprocess.Popen(
            self._cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
            env=gdb_environment(),
        )
        self._out = _TeeReader(self.proc.stdout, self, "<")
        self._err = _TeeReader(self.proc.stderr, self, "!")
        # time_to_check=0: IoManager never lingers for "more output"; we decide when to stop.
        self._io = IoManager(self.proc.stdin, self._out, self._err, time_to_check_for_additional_output_sec=0)
        # GDB in async mode accepts -exec-interrupt while the target runs.
        self.mi("-gdb-set mi-async on")
        self.mi("-gdb-set confirm off")
        self.mi("-gdb-set pagination off")
        # A GDB internal error ends this GDB (the session reports it) without a core file in
        # the user's working directory.
        self.mi('-interpreter-exec console "maint set internal-error corefile no"')
        self.mi('-interpreter-exec console "maint set internal-error quit yes"')
        if self.accel != "kvm":
            self.mi("-gdb-set breakpoint always-inserted on")

    def mark_unresponsive(self) -> None:
        """GDB stopped answering (hung, or stuck behind a stopped target): close() then
        goes straight to signals instead of waiting on polite commands."""
        self._unresponsive = True

    def close(self, timeout: float = 1.0) -> None:
        """Always leaves no GDB process behind, within about `timeout` + 1 s. Never raises.
        Detach and `-gdb-exit` while GDB answers (all within `timeout`); then SIGTERM and
        SIGKILL to its group. A GDB that stopped answering (or is stopped: process state T)
        gets SIGKILL at once."""
        with self._close_lock:  # the session's thread and its owner may both close it
            self._close(timeout)

    def _close(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if processes.is_stopped(proc.pid):
                self._unresponsive = True
                self.teardown.append(processes.describe("GDB", proc.pid))
            if proc.poll() is None and not self._unresponsive:
                end = time.monotonic() + timeout

                def left() -> float:
                    return max(0.05, end - time.monotonic())

                if self.connected and not self.target_closed:
                    # Detach, not kill: QEMU belongs to the caller and may still be needed.
                    # GDB detaches only from a stopped target.
                    try:
                        if self.running:
                            self.interrupt(left(), by_deadline=False)
                        self._mi("-target-detach", left(), by_deadline=False)
                    except (GdbError, GdbTimeout, OSError):
                        pass
                if not self._unresponsive:
                    try:
                        self._mi("-gdb-exit", left(), by_deadline=False)
                    except (GdbError, GdbTimeout, OSError):
                        pass
                try:
                    proc.wait(left())
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                if self._unresponsive:  # a hung or stopped GDB acts on nothing else
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    self.teardown.append("SIGKILL")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(3.0)
                else:
                    self.teardown += processes.kill_group(proc, grace_s=timeout)
        finally:
            # The group may still hold children GDB spawned (e.g. `shell`); end them too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f and f.close()
                except OSError:
                    pass
            self._log("#", f"gdb ended, status {proc.returncode}" +
                      (f" ({', '.join(self.teardown)})" if self.teardown else ""))
            if self._transcript:
                self._transcript.close()
                self._transcript = None
            self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- transport ---------------------------------------------------------------------
    def _log(self, mark: str, line: str) -> None:
        if mark in "<!":
            self._tail.append(f"{mark} {line}")
        if self._transcript:
            self._transcript.write(f"{time.monotonic() - self._t0:9.4f} {mark} {line}\n")

    def _send(self, line: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise GdbClosed(line, "gdb is not running")
        self._log(">", line)
        self._io.write(line, read_response=False, timeout_sec=self.timeout)

    def _read_some(self, deadline: float) -> bool:
        """Wait up to one poll (never past deadline) for output; queue parsed records.
        False when nothing came (or GDB's output has ended)."""
        wait = max(0.0, min(self.poll, deadline - time.monotonic()))
        fds = [f for f in (self._out, self._err) if not f.eof]
        if self._out.eof or not fds:
            return False
        ready, _, _ = select.select(fds, [], [], wait)
        if self._err in ready:
            self._err.read()  # IoManager selects stdout only; stderr goes to the transcript
        if self._out in ready:
            for rec in self._io.get_gdb_response(timeout_sec=0, raise_error_on_timeout=False):
                self._note(rec)
                self._pending.append(rec)
        return bool(ready)

    def _note(self, rec: dict) -> None:
        """Track async state: stops and the remote end going away."""
        kind, msg = rec.get("type"), rec.get("message")
        if kind == "notify" and msg == "running":
            self.running = True
        elif kind == "notify" and msg == "stopped":
            self.running = False
            payload = rec.get("payload") or {}
            if str(payload.get("reason", "")).startswith("exited"):
                # QEMU's gdbstub may report its exit as a process exit (W packet).
                self._target_gone()
            else:
                if payload.get("disp") == "del":  # a temporary breakpoint is gone: its slot is free
                    self._hw_slots.pop(str(payload.get("bkptno")), None)
                self._stops.append(payload)
        elif kind == "notify" and msg == "thread-group-exited" or (
            kind == "log" and "Remote connection closed" in (rec.get("payload") or "")
        ):
            self._target_gone()

    def _target_gone(self) -> None:
        if self.connected and not self.target_closed:
            self.target_closed = True
            self._stops.append({"reason": TARGET_CLOSED})

    def _check_alive(self, command: str) -> None:
        if self._out.eof:
            raise GdbClosed(command, "gdb's output ended; last output:\n  " + "\n  ".join(self._tail))

    # -- commands ----------------------------------------------------------------------
    def _bound(self, timeout: float, by_deadline: bool) -> tuple[float, str]:
        """The time a wait may take: `timeout`, cut to what is left of the deadline."""
        if by_deadline and self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            if left < timeout:
                return left, "the boot's deadline"
        return timeout, ""

    def _why_silent(self, cut: str) -> str:
        """What a timeout's message adds: the deadline, and GDB's state if it is not running."""
        state = processes.state(self.proc.pid) if self.proc else None
        parts = [cut] if cut else []
        if state not in (None, "R", "S"):
            parts.append(processes.describe("GDB", self.proc.pid))
        return "; ".join(parts)

    def mi(self, command: str, timeout: float | None = None) -> MiResult:
        """Send one MI command; return when its own result record arrives (at the latest by
        the deadline)."""
        return self._mi(command, timeout)

    def _mi(self, command: str, timeout: float | None = None, by_deadline: bool = True) -> MiResult:
        timeout, cut = self._bound(self.timeout if timeout is None else timeout, by_deadline)
        self._token += 1
        token = self._token
        self._send(f"{token}{command}")
        deadline = time.monotonic() + timeout
        records: list[dict] = []
        while True:
            while self._pending:
                rec = self._pending.popleft()
                if rec.get("type") == "result" and rec.get("token") == token:
                    payload = rec.get("payload") or {}
                    if rec["message"] == "error":
                        raise GdbError(command, payload.get("msg", "?"))
                    return MiResult(rec["message"], payload, records)
                records.append(rec)
            if time.monotonic() >= deadline:
                self._unresponsive = True  # teardown goes straight to signals
                raise GdbTimeout(command, timeout, list(self._tail), self._why_silent(cut))
            if not self._read_some(deadline):
                self._check_alive(command)

    def console(self, command: str, timeout: float | None = None) -> str:
        """Run a CLI command (e.g. a lab-* command); return what it printed."""
        return self.mi(f"-interpreter-exec console {mi_quote(command)}", timeout).console

    def wait_stopped(self, timeout: float) -> dict[str, Any]:
        """The next `*stopped` payload (reason, frame, bkptno, signal-name, ...).

        When QEMU exits the remote end closes: that is returned as {"reason": "target-closed"}.
        """
        return self._wait_stopped(timeout)

    def _wait_stopped(self, timeout: float, by_deadline: bool = True) -> dict[str, Any]:
        timeout, cut = self._bound(timeout, by_deadline)
        deadline = time.monotonic() + timeout
        while not self._stops:
            if time.monotonic() >= deadline:
                raise GdbTimeout("wait for *stopped", timeout, list(self._tail), self._why_silent(cut))
            if not self._read_some(deadline):
                self._check_alive("wait for *stopped")
        self._pending.clear()  # records before a stop answer no command of ours
        return self._stops.popleft()

    # -- helpers -----------------------------------------------------------------------
    def load_symbols(self, path: str | Path) -> None:
        """The ELF64 symbol file. The architecture is set first: QEMU sends the 64-bit
        register set even while the CPU runs 32-bit code, and GDB rejects that 'g' reply
        for an i386 target."""
        self.mi("-gdb-set architecture i386:x86-64")
        self.mi(f"-file-exec-and-symbols {mi_quote(str(path))}")

    def connect(self, target: str, symbols: str | Path | None = None, timeout: float | None = None) -> None:
        """Attach to a gdbstub: `127.0.0.1:PORT` or a unix socket path."""
        if symbols:
            self.load_symbols(symbols)
        else:
            self.mi("-gdb-set architecture i386:x86-64")
        if self.accel == "kvm":
            # Let GDB refuse a fifth hardware breakpoint at insert time, not at resume.
            self.mi(f"-gdb-set remote hardware-breakpoint-limit {HW_BREAKPOINT_SLOTS}")
        self.mi(f"-target-select remote {target}", timeout)  # GDB takes it verbatim, no quoting
        self.connected = True
        self._stops.clear()  # the stop reported on attach is not one the caller waits for

    def add_symbols(self, path: str | Path, address: int | None = None) -> None:
        """More symbols, e.g. the guest's ELF at its load address."""
        cmd = f"add-symbol-file {path}" + (f" -o {address:#x}" if address else "")
        self.console(cmd)

    def _insert(self, location: str, hardware: bool, condition: str | None, temporary: bool) -> str:
        if hardware and len(self._hw_slots) >= HW_BREAKPOINT_SLOTS:
            raise GdbError(f"hbreak {location}", f"all {HW_BREAKPOINT_SLOTS} hardware breakpoint slots are in use")
        args = "-h " if hardware else ""
        if temporary:
            args += "-t "
        if condition:
            args += f"-c {mi_quote(condition)} "
        res = self.mi(f"-break-insert {args}{mi_quote(location)}")
        number = res.payload["bkpt"]["number"]
        if hardware:
            self._hw_slots[number] = location
        return number

    def hbreak(self, location: str, condition: str | None = None, temporary: bool = False) -> str:
        """Hardware breakpoint; returns its number. `temporary`: GDB deletes it at its first hit."""
        return self._insert(location, True, condition, temporary)

    def break_(self, location: str, condition: str | None = None, temporary: bool = False) -> str:
        """Software breakpoint; returns its number."""
        return self._insert(location, False, condition, temporary)

    def breakpoint(self, location: str, condition: str | None = None, temporary: bool = False) -> str:
        """The kind that works under this accelerator.

        KVM: hardware only (software breakpoints never fire under kvm_pvm, and KVM's int3
        patching would rewrite guest memory). TCG: software; QEMU's TCG gdbstub checks them at
        translation time without touching memory, and there is no slot limit.
        """
        return self._insert(location, self.accel == "kvm", condition, temporary)

    @property
    def hw_slots_free(self) -> int:
        return HW_BREAKPOINT_SLOTS - len(self._hw_slots)

    def delete(self, *numbers: str) -> None:
        if numbers:
            self.mi("-break-delete " + " ".join(numbers))
            for n in numbers:
                self._hw_slots.pop(n, None)

    def cont(self) -> None:
        self._stops.clear()  # stops from before this resume are stale
        self.mi("-exec-continue")

    def interrupt(self, timeout: float | None = None, *, by_deadline: bool = True) -> dict[str, Any]:
        """Stop a running target; returns the stop payload (usually signal-received SIGINT)."""
        timeout = self.timeout if timeout is None else timeout
        self._mi("-exec-interrupt", timeout, by_deadline)
        return self._wait_stopped(timeout, by_deadline)

    def step_instruction(self, timeout: float | None = None) -> dict[str, Any]:
        self._stops.clear()
        self.mi("-exec-step-instruction")
        return self.wait_stopped(self.timeout if timeout is None else timeout)

    def evaluate(self, expr: str) -> str:
        return self.mi(f"-data-evaluate-expression {mi_quote(expr)}").payload["value"]

    def register_names(self) -> dict[str, int]:
        if self._reg_index is None:
            names = self.mi("-data-list-register-names").payload["register-names"]
            self._reg_index = {n: i for i, n in enumerate(names) if n}
        return self._reg_index

    def read_registers(self, *names: str) -> dict[str, int]:
        """Several registers in one round trip, as integers (flag registers too)."""
        index = self.register_names()
        missing = [n for n in names if n not in index]
        if missing:
            raise GdbError("read registers", f"no register {', '.join(missing)} (have: {' '.join(index)})")
        numbers = " ".join(str(index[n]) for n in names)
        values = self.mi(f"-data-list-register-values x {numbers}").payload["register-values"]
        by_number = {int(v["number"]): v["value"] for v in values}
        return {n: _to_int(by_number[index[n]]) for n in names}

    def read_register(self, name: str) -> int:
        return self.read_registers(name)[name]

    def read_memory(self, address: int | str, length: int) -> bytes:
        addr = f"{address:#x}" if isinstance(address, int) else mi_quote(address)
        blocks = self.mi(f"-data-read-memory-bytes {addr} {length}").payload["memory"]
        data = b"".join(bytes.fromhex(b["contents"]) for b in blocks)
        if len(data) != length:
            raise GdbError(f"read memory {addr}", f"read {len(data)} of {length} bytes")
        return data

    def read_u64(self, address: int | str) -> int:
        return int.from_bytes(self.read_memory(address, 8), "little")

    def symbol_address(self, name: str) -> int | None:
        """Address of a symbol, or None when the symbol file has no such name."""
        try:
            return _to_int(self.evaluate(f"(unsigned long)&{name}"))
        except GdbError:
            return None


def _to_int(text: str) -> int:
    """GDB values: '0x1f', '31', or '0x1f <sym+4>' / '(void *) 0x10 <x>'."""
    m = re.search(r"(-?0x[0-9a-fA-F]+|-?\d+)", text)
    if not m:
        raise ValueError(f"not a number: {text!r}")
    return int(m.group(1), 0)
