"""Start QEMU for one boot, read its serial console, watch its run state, and always
tear it down.

Serial and QMP are unix sockets in a private (0700) folder; the gdbstub, when asked for,
listens on 127.0.0.1 only. QEMU starts paused (-S) so nothing the firmware prints is lost
before the console is connected, and so a GDB witness can attach before the first
instruction.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from . import catalogue, processes
from .config import RunConfig
from .processes import kill_group
from .qmp import Qmp, QmpClosed, QmpError, QmpTimeout

# The firmware's last record; anchored to the line end because serial output arrives in chunks.
END_RECORD = re.compile(rb"@@LAB \d+ end [^\n]*\n")
KVM_INTERNAL_ERROR = b"KVM internal error"
# isa-debug-exit: QEMU exits with (value << 1) | 1; the firmware writes 0 when all went well.
EXIT_OK = 1

# CPU properties asked of QEMU itself (QOM), so expectations follow the configured model
# rather than this machine: vendor string, feature flags, hypervisor leaves.
# Plus every CPUID feature a catalogue entry or its gate needs (lab/catalogue.py).
CPU_PROPERTIES = tuple(dict.fromkeys((
    "vendor", "rdtscp", "svm", "vmx", "hypervisor", "kvm", "tcg-cpuid", "npt", "model-id", "lm", "syscall",
    "tsc", "mmx", "family", "model", "stepping", "level",  # what cpu-fact compares (lab/expectations.py)
    *catalogue.features_needed())))
# QEMU's abort when KVM refuses IA32_ARCH_CAPABILITIES (MSR 0x10a) for a model that sets it
# (docs/platform.md); the model boots without that MSR.
ARCH_CAPABILITIES_ABORT = "failed to set MSR 0x10a"


class BootError(RuntimeError):
    """QEMU could not be started or talked to; carries its stderr."""


@dataclass
class BootResult:
    command: list[str]
    repro: str  # the same boot for a person at a terminal (serial on stdio)
    serial: bytes
    exit: str  # ok | timeout | internal-error | crash | exit-code | killed | interrupted
    exit_detail: str
    returncode: int | None
    wall_s: float
    cpu_facts: dict[str, object] = field(default_factory=dict)
    stderr: str = ""


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initrd_arg(cfg: RunConfig) -> list[str]:
    if not cfg.modules:
        return []
    parts = [f"{m.path} {m.args}".strip() for m in cfg.modules]
    # QEMU separates multiboot modules with commas (a literal comma is written ",,").
    return ["-initrd", ",".join(p.replace(",", ",,") for p in parts)]


def machine_arg(cfg: RunConfig) -> str:
    if cfg.machine == "microvm":
        # No PIT/PIC/RTC/option ROMs: the firmware needs only COM1 and isa-debug-exit, and
        # each device left out shortens the boot (docs/platform.md: microvm boots in ~0.03-0.05 s).
        return "microvm,x-option-roms=off,pit=off,pic=off,rtc=off"
    return cfg.machine


def build_command(
    cfg: RunConfig,
    *,
    serial: str | None,
    qmp: str | None,
    gdb: str | None = None,
    paused: bool = True,
) -> list[str]:
    """The exact QEMU command line. `serial`/`qmp` are unix socket paths (None: serial on
    stdio, no QMP, for a person at a terminal); `gdb` is a gdbstub address."""
    cmd = [
        cfg.qemu,
        "-M", machine_arg(cfg),
        "-accel", cfg.accel,
        "-cpu", cfg.cpu,
        "-m", "128",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-nic", "none",
        "-display", "none",
        "-no-reboot",  # a triple fault ends QEMU instead of looping through resets
        "-device", "isa-debug-exit",
    ]
    if serial:
        cmd += ["-chardev", f"socket,id=ser0,path={serial},server=on,wait=off", "-serial", "chardev:ser0"]
    else:
        cmd += ["-serial", "stdio"]
    if qmp:
        cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if gdb:
        cmd += ["-gdb", gdb]
    if paused:
        cmd += ["-S"]
    cmd += ["-kernel", str(cfg.kernel), *initrd_arg(cfg), "-append", cfg.cmdline()]
    return cmd


def repro_command(cfg: RunConfig) -> str:
    return shlex.join(build_command(cfg, serial=None, qmp=None, paused=False))


def explain(stderr: str, cpu: str) -> str:
    """The fix for a QEMU failure the lab recognises, or ""."""
    if ARCH_CAPABILITIES_ABORT in stderr and "arch-capabilities" not in cpu:
        return (f"this KVM refuses MSR 0x10a (IA32_ARCH_CAPABILITIES) that CPU model {cpu.split(',')[0]} sets: "
                f"run it as --cpu {cpu},-arch-capabilities")
    return ""


def _facts_key(cfg: RunConfig) -> str | None:
    """What QEMU's answer depends on: its binary (path, size, mtime), the accelerator, the
    machine and model, the properties asked; under KVM also the module and the host CPU
    (KVM filters a model's features by what the host offers)."""
    binary = shutil.which(cfg.qemu) or cfg.qemu
    try:
        st = os.stat(binary)
    except OSError:
        return None
    host = ""
    if cfg.accel == "kvm":
        from .hostinfo import kvm_status

        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
            host = hashlib.sha256(cpuinfo.encode()).hexdigest()[:16] + str(kvm_status().module)
    return json.dumps([os.path.realpath(binary), st.st_size, st.st_mtime_ns, cfg.accel, machine_arg(cfg), cfg.cpu,
                       CPU_PROPERTIES, host])


def cached_cpu_model_facts(cfg: RunConfig, cache: Path) -> dict[str, object]:
    """cpu_model_facts(), remembered in `cache` (JSON, written atomically): the answer is QEMU's
    for that binary and model, so a second run does not start QEMU to ask again."""
    key = _facts_key(cfg)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key is not None and key in known:
        return known[key]
    facts = cpu_model_facts(cfg)
    if key is not None:
        known[key] = facts
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
    return facts


def cpu_model_facts(cfg: RunConfig, timeout_s: float | None = None) -> dict[str, object]:
    """QEMU's description of the configured CPU (QOM properties), before any boot: QEMU
    starts paused with no kernel, answers over QMP, and quits, all within `timeout_s` (default:
    the run's timeout). Raises BootError with QEMU's own message if it cannot start this
    configuration, or naming the state of a QEMU that does not answer."""
    timeout_s = cfg.timeout_s if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix=f"ringlab-{os.getpid()}-cpu-") as d:
        os.chmod(d, 0o700)
        qmp_path = os.path.join(d, "qmp.sock")
        cmd = [cfg.qemu, "-M", machine_arg(cfg), "-accel", cfg.accel, "-cpu", cfg.cpu, "-m", "128",
               "-nodefaults", "-no-user-config", "-display", "none", "-S",
               "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        with open(os.path.join(d, "stderr"), "w+b") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            qmp = None
            try:
                deadline = time.monotonic() + timeout_s
                qmp = _connect_qmp(qmp_path, proc, deadline)
                return _qom_facts(qmp, proc, deadline)
            except BootError as exc:
                err.seek(0)
                text = err.read().decode(errors="replace")
                lines = [ln for ln in text.splitlines() if ln.strip() and "warning:" not in ln]
                raise BootError(explain(text, cfg.cpu) or "; ".join(lines[-2:]) or str(exc)) from None
            finally:
                # A second Ctrl-C or SIGTERM may land in this clean-up: the kill comes last
                # whatever happens before it, so no QEMU outlives the question.
                try:
                    processes.end_group(proc, qmp.quit if qmp else None)
                finally:
                    kill_group(proc)
                    if qmp is not None:
                        qmp.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it ends (Linux
    PR_SET_PDEATHSIG), so a pre-boot QEMU cannot outlive a lab process killed outright
    (e.g. a pytest-xdist worker) before its own clean-up ran."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _not_answering(exc: QmpTimeout, proc: subprocess.Popen) -> BootError:
    """A QMP timeout as a boot error that names QEMU's process state."""
    return BootError(f"{exc}: {processes.describe('QEMU', proc.pid)}")


def _connect_qmp(path: str, proc: subprocess.Popen, deadline: float) -> Qmp:
    """A QMP connection to a QEMU that is starting, by `deadline`. A QEMU that made its socket
    but does not answer (stopped, swapped out) is named with its process state."""
    _wait_for_path(path, proc, deadline)
    while True:  # the socket file exists from bind(); listen() follows a moment later
        qmp = Qmp(path)
        try:
            qmp.connect(timeout_s=deadline - time.monotonic())
            return qmp
        except QmpTimeout as exc:
            qmp.close(0)
            raise _not_answering(exc, proc) from None
        except (QmpClosed, QmpError) as exc:
            qmp.close(0)
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BootError(f"QMP connection failed: {exc}") from None
            time.sleep(0.005)


def _qom_facts(qmp: Qmp, proc: subprocess.Popen, deadline: float) -> dict[str, object]:
    """The CPU's QOM properties CPU_PROPERTIES names (a model without one: left out)."""
    def ask(name: str, args: dict | None = None):
        try:
            return qmp.cmd(name, args, timeout_s=deadline - time.monotonic())
        except QmpTimeout as exc:
            raise _not_answering(exc, proc) from None
        except QmpClosed as exc:
            raise BootError(str(exc)) from None

    path = ask("query-cpus-fast")[0]["qom-path"]
    facts: dict[str, object] = {}
    for prop in CPU_PROPERTIES:
        try:
            facts[prop] = ask("qom-get", {"path": path, "property": prop})
        except QmpError:  # a property this QEMU or model does not have
            continue
    return facts


def _wait_for_path(path: str, proc: subprocess.Popen, deadline: float) -> None:
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise BootError(f"QEMU exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise BootError(f"QEMU did not create {path} in time: {processes.describe('QEMU', proc.pid)}")
        time.sleep(0.002)


class Engine(contextlib.AbstractContextManager):
    """An emulator process for one boot: entering starts it (`_start`), and leaving, or a
    start that fails part-way, ends it (`close`: no process or socket left behind)."""

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Machine(Engine):
    """One QEMU process: `with Machine(cfg, run_dir) as m: result = m.run()`.

    Every wait is bounded by the boot's `deadline` (time.monotonic(); default: the config's
    timeout from the start). Leaving the `with` block always ends QEMU (SIGCONT if it was
    stopped, QMP quit, then SIGTERM, then SIGKILL to its process group; the steps go to
    `teardown` and the run folder's teardown.log) and closes every socket, also on errors and
    KeyboardInterrupt. `companions`: other processes of the boot (name -> pid, e.g. GDB) whose
    state a timeout's verdict names.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, *, gdb_port: int | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None):
        self.cfg = cfg
        self.deadline = deadline
        self.companions: dict[str, Callable[[], int | None]] = {}
        self.silent: str | None = None  # the QMP command QEMU did not answer, if one
        self.stalled = False  # a timeout's verdict named its cause: QEMU or a companion not answering
        self.teardown: list[str] = []
        self.cancel = cancel or threading.Event()  # set by Ctrl-C / SIGTERM handling
        self.run_dir = run_dir
        # Short path (sun_path is 108 bytes); the pid in the name tells whose QEMU it is.
        self.sock_dir = tempfile.mkdtemp(prefix=f"ringlab-{os.getpid()}-")
        os.chmod(self.sock_dir, 0o700)
        self.serial_path = os.path.join(self.sock_dir, "serial.sock")
        self.qmp_path = os.path.join(self.sock_dir, "qmp.sock")
        self.gdb_addr = f"127.0.0.1:{gdb_port}" if gdb_port else None
        gdb_arg = f"tcp:127.0.0.1:{gdb_port}" if gdb_port else None
        self.command = build_command(cfg, serial=self.serial_path, qmp=self.qmp_path, gdb=gdb_arg)
        self.proc: subprocess.Popen | None = None
        self.qmp: Qmp | None = None
        self.sock: socket.socket | None = None
        self.console: pexpect.fdpexpect.fdspawn | None = None
        self.stderr_path = run_dir / "qemu.stderr"
        self._stderr = None
        self._log = None
        self.t_start = 0.0

    # -- start ---------------------------------------------------------------------------
    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "command.txt").write_text(shlex.join(self.command) + "\n")
        self._stderr = open(self.stderr_path, "wb")
        self.t_start = time.monotonic()
        if self.deadline is None:
            self.deadline = self.t_start + self.cfg.timeout_s
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            start_new_session=True,  # own process group: teardown kills all of it
        )
        deadline = self.deadline
        try:
            self.qmp = _connect_qmp(self.qmp_path, self.proc, deadline)
            _wait_for_path(self.serial_path, self.proc, deadline)
        except BootError as exc:
            raise BootError(self._with_fix(f"{exc}\n{self.stderr_text()}")) from None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.serial_path)
        self._log = open(self.run_dir / "serial.log", "wb")
        self.console = pexpect.fdpexpect.fdspawn(self.sock.fileno(), timeout=1, logfile=self._log)

    def left(self, cap: float | None = None) -> float:
        """Seconds to the deadline (at most `cap`), never below zero."""
        left = max(0.0, (self.deadline or time.monotonic()) - time.monotonic())
        return left if cap is None else min(cap, left)

    def cpu_facts(self) -> dict[str, object]:
        """QEMU's own view of the configured CPU (QOM properties of CPU 0)."""
        assert self.qmp is not None and self.proc is not None
        return _qom_facts(self.qmp, self.proc, self.deadline or time.monotonic() + self.cfg.timeout_s)

    def resume(self) -> None:
        assert self.qmp is not None and self.proc is not None
        try:
            self.qmp.cmd("cont", timeout_s=max(0.2, self.left(2.0)))
        except QmpTimeout as exc:
            self.silent = "cont"
            raise _not_answering(exc, self.proc) from None
        except (QmpClosed, QmpError) as exc:
            # A fast firmware can reach isa-debug-exit before QMP's reply arrives: QEMU then
            # closes the socket. Only a QEMU that is still running has really failed.
            try:
                self.proc.wait(timeout=self.left(1.0))
            except subprocess.TimeoutExpired:
                raise BootError(f"QMP cont failed: {exc}\n{self.stderr_text()}") from None

    # -- run -----------------------------------------------------------------------------
    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def _internal_error(self) -> bool:
        """KVM internal errors stop the VM without ending QEMU: notice them at once."""
        assert self.qmp is not None
        try:
            for event in self.qmp.events():
                if event.get("event") == "STOP":
                    status = self.qmp.cmd("query-status", timeout_s=self.left(1.0))
                    if status.get("status") == "internal-error":
                        return True
        except QmpTimeout:
            self.silent = "query-status"  # the timeout's verdict says so
        except Exception:  # noqa: BLE001 - QMP resets once QEMU exits: not an internal error
            return False
        return False

    def stall_report(self) -> str:
        """Why no `end` came, for a timeout's verdict: the state of QEMU and its companions,
        what QMP did not answer, and the VM's run state (QMP query-status: e.g. `debug`, the CPU
        waits for the gdbstub's client). Called before teardown, so the states are the stall's."""
        assert self.proc is not None
        parts = []
        stopped = processes.is_stopped(self.proc.pid)
        if self.silent:
            parts.append(f"QEMU stopped answering QMP ({self.silent})")
        if stopped or self.silent:
            self.stalled = True
            parts.append(processes.describe("QEMU", self.proc.pid))
        elif self.qmp is not None and self.proc.poll() is None:
            try:
                status = self.qmp.cmd("query-status", timeout_s=0.5).get("status")
                if status != "running":  # running: the firmware's own hang, its last line says where
                    parts.append(f"QEMU's VM is in run state {status!r}" +
                                 (" (stopped for the debugger)" if status == "debug" else ""))
            except QmpTimeout:
                self.stalled = True
                parts.append(f"QEMU stopped answering QMP (query-status): {processes.describe('QEMU', self.proc.pid)}")
            except (QmpClosed, QmpError):
                pass
        for name, pid_of in self.companions.items():
            pid = pid_of()
            if pid is not None and processes.state(pid) not in (None, "R", "S", "I"):
                self.stalled = True
                parts.append(processes.describe(name, pid))
        return "; ".join(parts)

    def wait_for_end(self, timeout_s: float | None = None, poll_s: float = 0.05) -> tuple[str, str]:
        """Read the console until the `end` record, QEMU's exit, a KVM internal error or the
        timeout. Returns (exit kind, detail)."""
        assert self.console is not None and self.proc is not None
        deadline = time.monotonic() + timeout_s if timeout_s else (self.deadline or time.monotonic() + self.cfg.timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if self.cancel.is_set():
                return "interrupted", "the lab was interrupted (Ctrl-C or SIGTERM)"
            if remaining <= 0:
                why = self.stall_report()
                return "timeout", (f"no `end` record within {timeout_s or self.cfg.timeout_s:.1f} s"
                                   + (f": {why}" if why else ""))
            idx = self.console.expect(
                [END_RECORD, pexpect.EOF, pexpect.TIMEOUT], timeout=min(poll_s, remaining)
            )
            if idx == 0:
                return self._wait_exit()
            if idx == 1:
                return self._wait_exit(already_closed=True)
            if self._internal_error() or KVM_INTERNAL_ERROR.decode() in self.stderr_text():
                return "internal-error", self._stderr_tail("KVM internal error")
            if self.proc.poll() is not None:
                return self._classify_exit()

    def _wait_exit(self, already_closed: bool = False) -> tuple[str, str]:
        assert self.proc is not None
        wait = max(self.left(2.0), 0.5)  # an `end` just before the deadline still gets its exit
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            if not already_closed and self._internal_error():
                return "internal-error", self._stderr_tail("KVM internal error")
            why = self.stall_report()
            return "timeout", (f"the firmware sent `end` but QEMU did not exit within {wait:.1f} s"
                               + (f": {why}" if why else ""))
        return self._classify_exit()

    def _classify_exit(self) -> tuple[str, str]:
        assert self.proc is not None
        rc = self.proc.returncode
        if rc == EXIT_OK:
            return "ok", "isa-debug-exit 0"
        fix = explain(self.stderr_text(), self.cfg.cpu)
        if fix:
            return "crash", f"QEMU ended with status {rc}: {fix}"
        if rc is not None and rc < 0:
            return "killed", f"QEMU killed by signal {-rc}"
        if rc is not None and rc & 1 and rc > 1:
            return "exit-code", f"firmware exited with code {rc >> 1} through isa-debug-exit"
        if rc == 0:
            # -no-reboot turns a triple fault (shutdown) into a clean QEMU exit.
            return "crash", "QEMU exited with status 0: triple fault or reset (-no-reboot)"
        return "crash", f"QEMU exited with status {rc}: {self._stderr_tail()}"

    def _with_fix(self, message: str) -> str:
        fix = explain(self.stderr_text(), self.cfg.cpu)
        return f"{fix}\n{message}" if fix else message

    def _stderr_tail(self, needle: str | None = None) -> str:
        lines = [line for line in self.stderr_text().splitlines() if line.strip()]
        if needle:
            hits = [line for line in lines if needle in line]
            if hits:
                return hits[0]
        return " | ".join(lines[-3:]) if lines else "(no stderr)"

    def serial_bytes(self) -> bytes:
        if self._log:
            self._log.flush()
        try:
            return (self.run_dir / "serial.log").read_bytes()
        except OSError:
            return b""

    def run(self, start: Callable[[dict], None] | None = None, facts: dict | None = None) -> BootResult:
        """Boot to the end and collect everything. `start(cpu_facts)` lets the CPU go
        (default: QMP `cont`; a GDB witness sets its breakpoints and continues itself).
        `facts`: QEMU's QOM answer for this configuration already in hand (the pre-boot's,
        lab/runner.py), else QEMU is asked now (15 QMP round trips, ~40-60 ms here)."""
        facts = self.cpu_facts() if facts is None else facts
        if start is None:
            self.resume()
        else:
            start(facts)
        kind, detail = self.wait_for_end()
        # Drain what the console still holds so the log and the parser see all of it.
        with contextlib.suppress(Exception):
            self.console.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=0.01)
        wall = time.monotonic() - self.t_start
        return BootResult(
            command=self.command,
            repro=repro_command(self.cfg),
            serial=self.serial_bytes(),
            exit=kind,
            exit_detail=detail,
            returncode=self.proc.poll() if self.proc else None,
            wall_s=wall,
            cpu_facts=facts,
            stderr=self.stderr_text(),
        )

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        if self.proc is not None:
            qmp = self.qmp
            self.teardown = processes.end_group(self.proc, qmp.quit if qmp else None)
            if self.teardown:
                with contextlib.suppress(OSError):
                    (self.run_dir / "teardown.log").write_text(
                        f"QEMU (pid {self.proc.pid}): " + ", ".join(self.teardown) + "\n")
        if self.qmp is not None:
            self.qmp.close()
        for closer in (self.sock, self._log, self._stderr):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.qmp = self.sock = None
        for name in ("serial.sock", "qmp.sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.sock_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.sock_dir)

