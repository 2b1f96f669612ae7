"""`invoke lab.debug`: the lab's QEMU, paused, with an interactive GDB already attached.

QEMU starts paused (-S) with its gdbstub on a free loopback port (or a unix socket); GDB
gets the host ELF64 symbols, the guest's symbols at its load address, the lab-* commands
(lab/gdb/lab_gdb.py) and a first breakpoint. Under KVM, `lab-kvm` makes `break`/`tbreak`
hardware breakpoints (QEMU cannot plant software ones there: kvm_pvm stops the VM) and the
session says first what GDB cannot do on this KVM. `print_only` prints both command lines
instead, e.g. to attach from an IDE. Serial output goes to a file in the run folder.
"""
from __future__ import annotations

import contextlib
import datetime
import difflib
import itertools
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .build import ROOT, artifacts
from .config import ConfigError, RunConfig
from .gdb import lab_gdb, x86
from .hostinfo import kvm_status, qemu_binary
from .processes import kill_group
from .qemu import build_command, free_tcp_port
from .runner import keep_runs, make_config, preboot, prune_runs

_SOCKETS = itertools.count()
LAB_GDB_SCRIPT = Path(__file__).resolve().parent / "gdb" / "lab_gdb.py"
DEFAULT_BREAK = {"host": "kmain", "guest": "guest_start"}
# Under KVM without SVM the software host runs the guest at CPL1: the IRETQ that enters it
# is where GDB can see it (kvm_pvm: no stop in the guest's code nor in the host's trap path).
SOFT_GUEST_BREAK = "soft_enter_iretq"

# What GDB can and cannot do, keyed on the module that serves /dev/kvm (docs/gdb.md).
KVM_GDB_LIMITS = {
    "kvm_pvm": (
        "kvm_pvm stops GDB at breakpoints on CPL0 code only (on CPL1-3 code the CPU takes a #DB "
        "instead), and `stepi` cannot step into CPL3 code (across an IRETQ or SYSRET to CPL3 the CPU "
        "runs on to the next CPL0 stop; measured: into CPL1 it does step, see --scope guest). Read CPL1-3 from the exception frame: "
        "`break exc_dispatch`, then `p/x f->cs` (CPL = f->cs & 3), `p/x f->rip`, `lab-cr4`. Keep a "
        "second hardware breakpoint armed (the first one, at kmain): with `exc_dispatch` the only one "
        "armed, kvm_pvm runs can die at an exception stop (docs/gdb.md)."
    ),
}
KVM_GDB_OTHER = (
    "{module}: stepping into CPL1-3 code and breakpoints there were not measured by the lab on this "
    "module; if they do not stop, read CPL1-3 from the exception frame at exc_dispatch (f->cs & 3)."
)


@dataclass(frozen=True)
class DebugSession:
    qemu_cmd: list[str]
    gdb_cmd: list[str]
    gdb_setup: list[str]  # the CLI commands GDB runs first, in order (also sent by tests over MI)
    gdb_addr: str  # what GDB connects to
    run_dir: Path
    notes: list[str] = field(default_factory=list)  # what works and what cannot, said first


def _qemu_command(cfg: RunConfig, gdbstub: str) -> list[str]:
    """QEMU paused with a gdbstub; serial on stdio, which the session points at a file."""
    return build_command(cfg, serial=None, qmp=None, gdb=gdbstub, paused=True)


def gdb_setup_commands(cfg: RunConfig, gdb_addr: str, *, scope: str = "host",
                       break_symbol: str | None = None, kvm_module: str | None = None) -> list[str]:
    """What GDB runs before the prompt: architecture first (QEMU sends the 64-bit register
    set), symbols, lab commands, attach, then the first breakpoint."""
    cmds = ["set confirm off", "set architecture i386:x86-64", f"file {cfg.symbols}"]
    if cfg.guest_symbols and Path(cfg.guest_symbols).is_file():
        cmds.append(f"add-symbol-file {cfg.guest_symbols}")  # linked at its load address
    cmds.append(f"source {LAB_GDB_SCRIPT}")
    if cfg.accel == "kvm":
        cmds.append(f"lab-kvm {kvm_module or 'kvm'}")  # break/tbreak -> hardware breakpoints
    cmds.append(f"target remote {gdb_addr}")
    symbol = break_symbol or first_break(cfg.accel, scope)
    kind = "hbreak" if cfg.accel == "kvm" else "break"
    if symbol == SOFT_GUEST_BREAK and not break_symbol:
        kind = "thbreak"  # once: the guest's first entry
    cmds.append(f"{kind} *{symbol}")
    cmds.append("set confirm on")
    return cmds


def first_break(accel: str, scope: str) -> str:
    """Where the session stops first: kmain, or for the guest its first instruction; under
    KVM (no SVM guest) the software host's IRETQ into it, the guest's code being at CPL1."""
    if scope == "guest" and accel == "kvm":
        return SOFT_GUEST_BREAK
    return DEFAULT_BREAK[scope]


def check_break(cfg: RunConfig, symbol: str, kvm_module: str | None, scope: str = "host") -> None:
    """--break must name a symbol of the host or guest ELF (an address `0x...` is taken as
    is), of the guest's with --scope guest; under KVM not one GDB cannot stop at. One clear
    error before anything starts."""
    symbols = dict(x86.elf_symbols(str(cfg.symbols)))
    guest = x86.elf_symbols(str(cfg.guest_symbols)) if cfg.guest_symbols and Path(cfg.guest_symbols).is_file() else {}
    if scope == "guest" and not symbol.startswith("0x") and symbol in symbols and symbol not in guest:
        raise ConfigError(f"--break {symbol}: a host symbol; --scope guest stops first in the guest "
                          "(give a guest symbol, e.g. guest_start, or leave --scope out)")
    symbols.update(guest)
    if symbol.startswith("0x"):
        try:
            addr = int(symbol, 16)
        except ValueError:
            raise ConfigError(f"--break {symbol!r}: not a symbol or a hex address") from None
    else:
        if symbol not in symbols:
            near = difflib.get_close_matches(symbol, list(symbols), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"--break {symbol!r}: no such symbol in {Path(cfg.symbols).name}"
                              f"{' or ' + Path(cfg.guest_symbols).name if cfg.guest_symbols else ''}{hint}")
        addr = symbols[symbol]
    why = lab_gdb.break_refusal(kvm_module if cfg.accel == "kvm" else None, addr, symbols)
    if why:
        raise ConfigError(f"--break {symbol}: {why}")


def session_notes(accel: str, scope: str, kvm_module: str | None, cpu: str) -> list[str]:
    """What the person at the GDB prompt should know first: what works, what cannot."""
    if accel != "kvm":
        notes = ["TCG: software breakpoints and stepi work everywhere (CPL0-3, the SVM guest)."]
        if scope == "guest":
            notes.append("guest: stopped at guest_start, the SVM guest's first instruction; lab-vmcb "
                         "shows its VMCB, lab-cpl says host or guest.")
        return notes
    module = kvm_module or "kvm"
    notes = [f"KVM ({module}): `break`/`tbreak` set hardware breakpoints (4: DR0-DR3); "
             f"{', '.join(lab_gdb.SOFTWARE_STOPPERS)} are refused (they plant software breakpoints).",
             KVM_GDB_LIMITS.get(module, KVM_GDB_OTHER.format(module=module))]
    if scope == "guest":
        why = (f"{module} gives its guests no SVM" if module == "kvm_pvm" else
               f"unless the CPU model ({cpu or 'qemu64'}) offers SVM (QOM `svm`)")
        shown = ("Shown: the guest's entry, once, at soft_enter_iretq (CPL0): its RIP, CS (CPL = CS & 3), "
                 "RFLAGS, RSP, SS in the IRETQ frame (`x/5gx $rsp`), and the host's state around the guest "
                 "run (soft_main); the guest's records on serial.")
        if module == "kvm_pvm":
            hidden = ("Under kvm_pvm `stepi` from there does step the guest's CPL1 instructions (measured), "
                      "but WARNING: stepping an instruction the software host traps and emulates (the "
                      "guest's lgdt, a privileged or IOPL-sensitive instruction, CPUID under faulting) puts "
                      "the CPU in the host's #GP stub under single-step, and the next `continue` ends the "
                      "guest (measured: guest_end=shutdown, then \"Remote connection closed\"): `continue` "
                      "before such an instruction, or debug the guest under --accel tcg. A breakpoint in "
                      "the guest's code or in the host's trap path (exc_dispatch, soft_trap, soft_exit_tramp) "
                      "hands the CPU a #DB and ends the run; no VMCB (SVM is off).")
        else:
            hidden = (f"Not measured on {module}: stops in the guest's code or the host's trap path "
                      "(soft_trap); no VMCB unless SVM runs the guest.")
        notes.append(f"guest under KVM: {why}, so the software host runs the guest at CPL1 (its user code "
                     f"at CPL3). {shown} {hidden}")
    return notes


ACCELS = ("tcg", "kvm")  # the QEMU accelerators a session attaches GDB to (QEMU's gdbstub)


def check_inputs(accel: str = "tcg", scope: str = "host", *, qemu: str | None = None, cpu: str = "",
                 machine: str = "microvm", host_mode: str = "auto", kernel_args: tuple[str, ...] = (),
                 variant: str = "normal") -> None:
    """Every option of `invoke lab.debug` as lab.run checks it (lab.config), before anything is
    built or started: one ConfigError naming the option and what it accepts."""
    from .build import VARIANTS
    from .config import HOST_MODES, MACHINES, check_cpu_model, check_kernel_arg
    from .hostinfo import cpu_models

    if accel not in ACCELS:
        why = " (Bochs has no gdbstub: docs/bochs.md)" if accel in ("bochs", "every") else ""
        raise ConfigError(f"--accel {accel!r}: choose tcg or kvm{why}")
    if scope not in DEFAULT_BREAK:
        raise ConfigError(f"--scope {scope!r}: choose one of {', '.join(DEFAULT_BREAK)}")
    if machine.split(",")[0] not in MACHINES:
        raise ConfigError(f"--machine {machine!r}: choose one of {', '.join(MACHINES)}")
    if host_mode not in HOST_MODES:
        raise ConfigError(f"--host-mode {host_mode!r}: choose one of {', '.join(HOST_MODES)}")
    if variant not in VARIANTS:
        raise ConfigError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    for word in kernel_args:
        check_kernel_arg(word)
    binary = qemu_binary(qemu)
    if accel == "kvm" and not kvm_status().usable:
        raise ConfigError(f"--accel kvm: KVM is not usable: {kvm_status().reason}")
    if cpu:
        check_cpu_model(cpu, cpu_models(binary), binary)


def plan_session(accel: str = "tcg", scope: str = "host", break_symbol: str | None = None, *,
                 qemu: str | None = None, cpu: str = "", machine: str = "microvm", gdb: str = "gdb",
                 unix_socket: bool = False, run_dir: Path | None = None, variant: str = "normal",
                 kernel_args: tuple[str, ...] = (), host_mode: str = "auto") -> DebugSession:
    """Everything a debug session runs, without running it."""
    if scope not in DEFAULT_BREAK:
        raise ValueError(f"scope {scope!r}: choose one of {', '.join(DEFAULT_BREAK)}")
    kvm = kvm_status()
    cfg = make_config(accel, artifacts(variant), qemu=qemu_binary(qemu), kvm=kvm, machine=machine,
                      cpu=cpu, kernel_args=kernel_args, host_mode=host_mode)
    if break_symbol:
        check_break(cfg, break_symbol, kvm.module, scope)
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
    setup = gdb_setup_commands(cfg, addr, scope=scope, break_symbol=break_symbol,
                               kvm_module=kvm.module if accel == "kvm" else None)
    gdb_cmd = [gdb, "-q"] + [arg for cmd in setup for arg in ("-ex", cmd)]
    notes = session_notes(accel, scope, kvm.module, cfg.cpu)
    return DebugSession(_qemu_command(cfg, stub), gdb_cmd, setup, addr, run_dir, notes)


def start_qemu(s: DebugSession) -> subprocess.Popen:
    """QEMU of a planned session, paused, in its own process group; serial to
    run_dir/serial.log. End it with stop_qemu()."""
    s.run_dir.mkdir(parents=True, exist_ok=True)
    if s.run_dir.parent == ROOT / "runs":  # the default place: kept as lab.run's folders are
        prune_runs(s.run_dir.parent, keep_runs())
    if not s.gdb_addr.startswith("127.0.0.1:"):
        os.mkdir(os.path.dirname(s.gdb_addr), 0o700)  # private; fails if someone made it first
    (s.run_dir / "command.txt").write_text(shlex.join(s.qemu_cmd) + "\n" + shlex.join(s.gdb_cmd) + "\n")
    with open(s.run_dir / "serial.log", "wb") as out, open(s.run_dir / "qemu.stderr", "wb") as err:
        # Own session: Ctrl-C at the GDB prompt must not reach QEMU.
        proc = subprocess.Popen(s.qemu_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    if not s.gdb_addr.startswith("127.0.0.1:"):
        # GDB retries a TCP connect, not a unix socket's: return once QEMU has made it (under
        # load QEMU takes tens of milliseconds to; a GDB started first failed "No such file").
        deadline = time.monotonic() + 10
        while not os.path.exists(s.gdb_addr) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    return proc


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
                  machine: str = "microvm", gdb: str = "gdb", unix_socket: bool = False,
                  kernel_args: tuple[str, ...] = (), host_mode: str = "auto", variant: str = "normal") -> int:
    """Run QEMU paused and an interactive GDB on it; returns GDB's exit status."""
    s = plan_session(accel, scope, break_symbol, qemu=qemu, cpu=cpu, machine=machine, gdb=gdb,
                     unix_socket=unix_socket, kernel_args=kernel_args, host_mode=host_mode, variant=variant)
    # The CPU model and its flags as QEMU takes them (lab.run's pre-boot query), before QEMU starts:
    # a flag QEMU refuses is one error line here, not a GDB that times out on a QEMU that never ran.
    preboot(make_config(accel, artifacts(variant), qemu=qemu_binary(qemu), kvm=kvm_status(), machine=machine,
                        cpu=cpu, kernel_args=kernel_args, host_mode=host_mode))
    if print_only:
        for note in s.notes:
            print(f"# {note}")
        if unix_socket:
            print(f"mkdir -m 700 {shlex.quote(os.path.dirname(s.gdb_addr))}")
        print("# QEMU (paused; serial on stdout):")
        print(shlex.join(s.qemu_cmd))
        print("# GDB:")
        print(shlex.join(s.gdb_cmd))
        return 0
    qemu_proc = start_qemu(s)
    print(f"serial: {s.run_dir / 'serial.log'}   (tail -f it in another terminal)")
    for note in s.notes:
        print(note)
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
