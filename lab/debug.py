"""`invoke lab.debug`: the lab's QEMU, paused, with an interactive GDB already attached.

QEMU starts paused (-S) with its gdbstub on a free loopback port (or a unix socket); GDB
gets the host ELF64 symbols, the guest's symbols at its load address, the lab-* commands
(lab/gdb/lab_gdb.py) and a first breakpoint, hardware under KVM (software breakpoints
never fire under kvm_pvm) and software under TCG. `print_only` prints both command lines
instead, e.g. to attach from an IDE. Serial output goes to a file in the run folder.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shlex
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .build import ROOT, artifacts
from .config import RunConfig
from .hostinfo import kvm_status, qemu_binary
from .qemu import build_command, free_tcp_port, kill_group
from .runner import make_config

_SOCKETS = itertools.count()
LAB_GDB_SCRIPT = Path(__file__).resolve().parent / "gdb" / "lab_gdb.py"
DEFAULT_BREAK = {"host": "kmain", "guest": "guest_start"}


@dataclass(frozen=True)
class DebugSession:
    qemu_cmd: list[str]
    gdb_cmd: list[str]
    gdb_setup: list[str]  # the CLI commands GDB runs first, in order (also sent by tests over MI)
    gdb_addr: str  # what GDB connects to
    run_dir: Path


def _qemu_command(cfg: RunConfig, gdbstub: str) -> list[str]:
    """QEMU paused with a gdbstub; serial on stdio, which the session points at a file."""
    return build_command(cfg, serial=None, qmp=None, gdb=gdbstub, paused=True)


def gdb_setup_commands(cfg: RunConfig, gdb_addr: str, *, scope: str = "host",
                       break_symbol: str | None = None) -> list[str]:
    """What GDB runs before the prompt: architecture first (QEMU sends the 64-bit register
    set), symbols, lab commands, attach, then the first breakpoint."""
    cmds = ["set confirm off", "set architecture i386:x86-64", f"file {cfg.symbols}"]
    if cfg.guest_symbols and Path(cfg.guest_symbols).is_file():
        cmds.append(f"add-symbol-file {cfg.guest_symbols}")  # linked at its load address
    cmds += [f"source {LAB_GDB_SCRIPT}", f"target remote {gdb_addr}"]
    symbol = break_symbol or DEFAULT_BREAK.get(scope, "kmain")
    cmds.append(f"{'hbreak' if cfg.accel == 'kvm' else 'break'} *{symbol}")
    cmds.append("set confirm on")
    return cmds


def plan_session(accel: str = "tcg", scope: str = "host", break_symbol: str | None = None, *,
                 qemu: str | None = None, cpu: str = "", machine: str = "microvm", gdb: str = "gdb",
                 unix_socket: bool = False, run_dir: Path | None = None, variant: str = "normal",
                 kernel_args: tuple[str, ...] = ()) -> DebugSession:
    """Everything a debug session runs, without running it."""
    if scope not in DEFAULT_BREAK:
        raise ValueError(f"scope {scope!r}: choose one of {', '.join(DEFAULT_BREAK)}")
    cfg = make_config(accel, artifacts(variant), qemu=qemu_binary(qemu), kvm=kvm_status(), machine=machine,
                      cpu=cpu, kernel_args=kernel_args)
    if run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = ROOT / "runs" / f"debug-{stamp}-{os.getpid()}"
    if unix_socket:
        # sun_path holds 108 bytes: a short private folder (made by start_qemu), not the run folder.
        folder = os.path.join(tempfile.gettempdir(), f"ringlab-gdb-{os.getpid()}-{next(_SOCKETS)}")
        path = os.path.join(folder, "gdb.sock")
        stub, addr = f"unix:{path},server=on,wait=off", path
    else:
        port = free_tcp_port()
        stub, addr = f"tcp:127.0.0.1:{port}", f"127.0.0.1:{port}"  # loopback only, never -s
    setup = gdb_setup_commands(cfg, addr, scope=scope, break_symbol=break_symbol)
    gdb_cmd = [gdb, "-q"] + [arg for cmd in setup for arg in ("-ex", cmd)]
    return DebugSession(_qemu_command(cfg, stub), gdb_cmd, setup, addr, run_dir)


def start_qemu(s: DebugSession) -> subprocess.Popen:
    """QEMU of a planned session, paused, in its own process group; serial to
    run_dir/serial.log. End it with stop_qemu()."""
    s.run_dir.mkdir(parents=True, exist_ok=True)
    if not s.gdb_addr.startswith("127.0.0.1:"):
        os.mkdir(os.path.dirname(s.gdb_addr), 0o700)  # private; fails if someone made it first
    (s.run_dir / "command.txt").write_text(shlex.join(s.qemu_cmd) + "\n" + shlex.join(s.gdb_cmd) + "\n")
    with open(s.run_dir / "serial.log", "wb") as out, open(s.run_dir / "qemu.stderr", "wb") as err:
        # Own session: Ctrl-C at the GDB prompt must not reach QEMU.
        return subprocess.Popen(s.qemu_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)


def stop_qemu(s: DebugSession, proc: subprocess.Popen) -> None:
    """End a session's QEMU (its whole process group) and remove its gdbstub socket."""
    kill_group(proc)
    if not s.gdb_addr.startswith("127.0.0.1:"):
        with contextlib.suppress(OSError):
            os.unlink(s.gdb_addr)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(s.gdb_addr))


def _exit_on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


def debug_session(accel: str = "tcg", scope: str = "host", break_symbol: str | None = None,
                  print_only: bool = False, qemu: str | None = None, cpu: str = "",
                  machine: str = "microvm", gdb: str = "gdb", unix_socket: bool = False) -> int:
    """Run QEMU paused and an interactive GDB on it; returns GDB's exit status."""
    s = plan_session(accel, scope, break_symbol, qemu=qemu, cpu=cpu, machine=machine, gdb=gdb,
                     unix_socket=unix_socket)
    if print_only:
        if unix_socket:
            print(f"mkdir -m 700 {shlex.quote(os.path.dirname(s.gdb_addr))}")
        print("# QEMU (paused; serial on stdout):")
        print(shlex.join(s.qemu_cmd))
        print("# GDB:")
        print(shlex.join(s.gdb_cmd))
        return 0
    qemu_proc = start_qemu(s)
    print(f"serial: {s.run_dir / 'serial.log'}   (tail -f it in another terminal)")
    if accel == "kvm":
        print("KVM: hardware breakpoints (4) on CPL0 code only; under kvm_pvm see docs/gdb.md")
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to GDB now
    # A closed terminal (SIGHUP) or SIGTERM must still end QEMU: turn them into an exit.
    old_term = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return subprocess.call(s.gdb_cmd)
    finally:
        signal.signal(signal.SIGINT, old)
        for sig, handler in old_term.items():
            signal.signal(sig, handler)
        stop_qemu(s, qemu_proc)  # GDB's quit only detaches: QEMU must not outlive the session
