"""Bochs as a third x86 engine (docs/bochs.md): the same kernel, guest and command line,
booted by GRUB from an ISO, the serial console as the witness, the same records and judge.

Bochs is an x86 implementation written independently of QEMU, and its Intel models offer
VMX, which neither TCG nor this lab's KVM does. What the configured model is comes from
Bochs itself: at CPU reset it logs the CPUID table of the model (`CPUID[leaf]: eax ebx ecx
edx`), and `describe()` reads it, as QOM does for QEMU.

Debian's Bochs is built with its internal debugger and the `term` display only: it runs
under a pseudo-terminal, starts at the debugger prompt (an `-rc` file with `c` continues)
and ends when the firmware writes `Shutdown` to port 0x8900 (firmware/records.c).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import pty
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from . import catalogue, deviations, processes
from .build import ROOT, BuildError
from .config import BOCHS, ConfigError, RunConfig
from .expectations import Facts
from .hostinfo import ToolMissing
from .processes import kill_group
from .qemu import END_RECORD, BootError, BootResult, Engine

INSTALL_HINT = ("sudo apt-get install bochs bochs-term bochsbios vgabios grub-pc-bin xorriso mtools"
                "   (or: invoke setup)")
DEFAULT_MODEL = "corei7_skylake_x"  # Intel, VMX (IA32_FEATURE_CONTROL reads 5: locked, VMXON allowed)
SVM_MODEL = "trinity_apu"  # AMD, SVM
SHARE = Path("/usr/share/bochs")
BIOS = SHARE / "BIOS-bochs-latest"
VGABIOS = SHARE / "VGABIOS-lgpl-latest"
# Emulated instructions per emulated second. The TSC counts instructions whatever this is;
# it sets how many instructions the BIOS's and GRUB's timed waits cost, so a low value boots
# sooner (docs/bochs.md, "Speed").
IPS = 10_000_000
SHUTDOWN = "Shutdown port: shutdown requested"
_CPUID_LINE = re.compile(r"CPUID\[0x([0-9a-f]{8})\]: ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8})")
_PANIC = re.compile(r">>PANIC<< (.*)")
_VGABIOS_PANIC = re.compile(r"VGABIOS panic at vgabios\.c, line (\d+)")
# GRUB modules the ISO needs: the rest of GRUB stays out (a 0.9 MB ISO instead of 10 MB).
GRUB_MODULES = "multiboot serial terminal"


# -- the binary and its models ----------------------------------------------------------------
def bochs_binary(explicit: str | None = None) -> str:
    """Bochs: --bochs, else $LAB_BOCHS, else `bochs` on PATH; and what it boots from."""
    name = explicit or os.environ.get("LAB_BOCHS") or "bochs"
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"Bochs not found ({name!r}). Install it: {INSTALL_HINT}")
    for need in (BIOS, VGABIOS):
        if not need.is_file():
            raise ToolMissing(f"{need} is missing. Install it: {INSTALL_HINT}")
    for tool in ("grub-mkrescue", "xorriso"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} not found (it builds the boot ISO). Install it: {INSTALL_HINT}")
    return path


@functools.cache
def models(binary: str) -> tuple[str, ...]:
    """The CPU models this Bochs knows (`bochs -help cpu`)."""
    out = subprocess.run([binary, "-help", "cpu"], capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    if "Supported CPU models:" not in text:
        return ()
    body = text.split("Supported CPU models:", 1)[1]
    names = []
    for line in body.splitlines():
        if line.strip():
            names.append(line.strip())
        elif names:  # the blank line after the list
            break
    return tuple(names)


def check_model(binary: str, model: str) -> None:
    known = models(binary)
    if model not in known:
        raise ConfigError(f"--cpu {model!r}: Bochs has no CPU model of that name; its models: {', '.join(known)}")


# -- what Bochs says the model is -------------------------------------------------------------
def parse_cpuid_dump(log: str) -> dict[int, tuple[int, int, int, int]]:
    """`CPUID[0x00000001]: eax ebx ecx edx` lines, logged by Bochs at CPU reset."""
    leaves: dict[int, tuple[int, int, int, int]] = {}
    for m in _CPUID_LINE.finditer(log):
        leaves.setdefault(int(m.group(1), 16), tuple(int(m.group(i), 16) for i in range(2, 6)))
    return leaves


def _bytes12(*regs: int) -> str:
    return b"".join(r.to_bytes(4, "little") for r in regs).decode("latin-1")


def model_facts(leaves: dict[int, tuple[int, int, int, int]]) -> dict[str, object]:
    """The facts the plan needs, from the model's CPUID table (SDM Vol. 2A CPUID; APM Vol. 3
    App. E). The same keys as QEMU's QOM properties where there is one. Leaf 0x40000000 is
    above every Bochs model's highest basic leaf: the plan's out-of-range rule applies
    (lab/expectations.py hv_signature), with no hypervisor leaves of Bochs' own."""
    if 0 not in leaves:
        return {}
    max_basic, b0, c0, d0 = leaves[0]
    l1 = leaves.get(1, (0, 0, 0, 0))
    e1 = leaves.get(0x80000001, (0, 0, 0, 0))
    vendor = _bytes12(b0, d0, c0)
    facts: dict[str, object] = {
        "vendor": vendor,
        "max-basic-leaf": max_basic,
        "hypervisor": bool(l1[2] >> 31 & 1),   # CPUID.1:ECX[31]
        "vmx": bool(l1[2] >> 5 & 1),           # CPUID.1:ECX[5] (SDM Vol. 3C 23.6)
        "svm": bool(e1[2] >> 2 & 1),           # CPUID.80000001H:ECX[2] (APM Vol. 2 15.4)
        "rdtscp": bool(e1[3] >> 27 & 1),       # CPUID.80000001H:EDX[27]
        "lm": bool(e1[3] >> 29 & 1),           # CPUID.80000001H:EDX[29]
        "syscall": bool(e1[3] >> 11 & 1),      # CPUID.80000001H:EDX[11]
        "tsc": bool(l1[3] >> 4 & 1),           # CPUID.1:EDX[4]
        # CPUID.(EAX=7,ECX=0):ECX[2] (UMIP), when the model has leaf 7
        "umip": bool(leaves.get(7, (0, 0, 0, 0))[2] >> 2 & 1) if max_basic >= 7 else False,
        # A performance counter 0 to read: Intel's architectural PMU (CPUID.0AH:EAX[15:8] general-
        # purpose counters, SDM Vol. 3B 20.2), or AMD's legacy PerfCtr0-3 (APM Vol. 2 13.2).
        "pmu": (bool(leaves.get(0xA, (0, 0, 0, 0))[0] >> 8 & 0xFF) if max_basic >= 0xA else False)
               or vendor == "AuthenticAMD",
    }
    if 0x8000000A in leaves:
        facts["npt"] = bool(leaves[0x8000000A][3] & 1)  # CPUID.8000000AH:EDX[0]
    return facts


def describe(binary: str, model: str, timeout_s: float = 20.0) -> dict[str, object]:
    """Bochs' own description of a CPU model, before any boot: Bochs starts with that model,
    logs its CPUID table at reset, and quits at the debugger prompt (about 0.2 s)."""
    with tempfile.TemporaryDirectory(prefix=f"ringlab-{os.getpid()}-bochs-") as d:
        log = Path(d) / "bochs.log"
        rc = Path(d) / "quit.rc"
        rc.write_text("q\n")
        cfg = Path(d) / "bochsrc"
        cfg.write_text(_common_config(model, log))
        proc, master = _spawn([binary, "-q", "-f", str(cfg), "-rc", str(rc)], Path(d))
        silent = ""
        try:
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                _drain(master, None)
                time.sleep(0.01)
            if proc.poll() is None:
                silent = f" within {timeout_s:g} s ({processes.describe('Bochs', proc.pid)})"
        finally:
            kill_group(proc)
            os.close(master)
        text = log.read_text(errors="replace") if log.exists() else ""
    facts = model_facts(parse_cpuid_dump(text))
    if not facts:
        panic = _PANIC.search(text)
        raise BootError(f"Bochs did not describe CPU model {model!r}{silent}: "
                        f"{panic.group(1) if panic else 'no CPUID table in its log'}")
    return facts


def facts_for(cfg: RunConfig, desc: dict[str, object]) -> Facts:
    """The lab's Facts for a Bochs boot: what Bochs said the model is, and the configuration."""
    return Facts(
        features=tuple(sorted((k, v) for k, v in desc.items() if isinstance(v, bool))),
        accel="bochs", kvm_module=None, vendor=str(desc.get("vendor", "")),
        rdtscp=bool(desc.get("rdtscp")), svm=bool(desc.get("svm")), hypervisor=bool(desc.get("hypervisor")),
        vmx=bool(desc.get("vmx")), expose_kvm=False, tcg_cpuid=False,  # Bochs defines no hypervisor leaves of its own
        hv_signature=cfg.hv_signature, host_mode=cfg.host_mode,
        guest_rdtsc_intercept="hv-intercept-rdtsc=0" not in cfg.kernel_args,
    )


# -- the boot ISO (firmware/Makefile builds it) ----------------------------------------------
def _grub_word(word: str) -> str:
    """One command-line word, quoted for grub.cfg: single quotes keep everything literal."""
    return "'" + word.replace("'", "'\\''") + "'"


def grub_cfg(cfg: RunConfig) -> str:
    # GRUB passes only the words after the file name to a multiboot kernel; the lab's
    # command line starts with the image name, as QEMU's -kernel gives it (boot_image_name()).
    args = " ".join(_grub_word(w) for w in ["host.elf32", *cfg.cmdline().split()])
    lines = ["# ring-lab: written by lab/bochs.py (docs/bochs.md)", "set timeout=0",
             "serial --unit=0 --speed=115200", "terminal_input serial", "terminal_output serial",
             f"multiboot /boot/host.elf32 {args}"]
    for m in cfg.modules:
        words = " ".join(_grub_word(w) for w in m.args.split())
        lines.append(f"module /boot/{Path(m.path).name} {words}".rstrip())
    lines.append("boot")
    return "\n".join(lines) + "\n"


def build_iso(cfg: RunConfig) -> Path:
    """The GRUB ISO for this kernel, guest and command line, built by `make` (incremental:
    one folder per command line under the kernel's build folder, rebuilt only when the kernel
    or the guest changed)."""
    text = grub_cfg(cfg)
    mods = [str(Path(m.path).resolve()) for m in cfg.modules]
    key = hashlib.sha256("\0".join([text, str(Path(cfg.kernel).resolve()), *mods]).encode()).hexdigest()[:12]
    fw = ROOT / "firmware"
    folder = Path(cfg.kernel).resolve().parent / "bochs" / key
    iso = folder / "lab.iso"
    with open(fw / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder.mkdir(parents=True, exist_ok=True)
        grub = folder / "grub.cfg"
        if not grub.exists() or grub.read_text() != text:
            grub.write_text(text)
        proc = subprocess.run(
            ["make", "-s", "-C", str(fw), f"ISO_KERNEL={Path(cfg.kernel).resolve()}",
             f"ISO_MODULES={' '.join(mods)}", str(iso)],
            capture_output=True, text=True,
        )
    if proc.returncode != 0:
        raise BuildError(f"building {iso} failed:\n{proc.stdout}{proc.stderr}")
    return iso


# -- one boot -------------------------------------------------------------------------------
def _common_config(model: str, log: Path) -> str:
    return "\n".join([
        f"cpu: model={model}, count=1, ips={IPS}, reset_on_triple_fault=0",
        "megs: 128",
        f"romimage: file={BIOS}, options=fastboot",  # fastboot: no boot-menu delay
        f"vgaromimage: file={VGABIOS}",
        "display_library: term",        # Debian's Bochs has no `nogui`; `term` needs a tty
        "sound: driver=dummy",          # the default mixer thread aborts without a sound device
        "speaker: enabled=0",
        "clock: sync=none, time0=946684800",  # emulated time from the instruction count: reproducible
        f"log: {log}",
        "panic: action=fatal",          # a Bochs panic ends it (never the `ask` prompt)
        "error: action=ignore",         # e.g. "RDTSC: not allowed": the probes do that on purpose
        "info: action=ignore, cpu0=report",  # CPU0 logs the model's CPUID table at reset
        "debug: action=ignore",
    ]) + "\n"


def config_text(cfg: RunConfig, iso: Path, log: Path, com1: str) -> str:
    return ("# ring-lab: one boot of the lab kernel under Bochs (docs/bochs.md)\n"
            + _common_config(cfg.cpu, log)
            + f"ata0-master: type=cdrom, path={iso}, status=inserted\nboot: cdrom\n"
            + f"com1: enabled=1, {com1}\n")


def _spawn(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """Bochs on a fresh pseudo-terminal (its `term` display), in its own process group."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                start_new_session=True, env={**os.environ, "TERM": "vt100"})
    except OSError as exc:
        os.close(master)
        raise BootError(f"Bochs could not start: {exc}") from None
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    return proc, master


def _drain(master: int, sink) -> None:
    """Read what Bochs drew on its terminal, so it never blocks on a full pty."""
    with contextlib.suppress(OSError):
        while True:
            data = os.read(master, 65536)
            if not data:
                return
            if sink is not None:
                sink.write(data)


class BochsMachine(Engine):
    """One Bochs process: `with BochsMachine(cfg, run_dir) as m: result = m.run()`.

    The run folder gets `bochsrc` + `bochs.rc` (the exact boot), `bochsrc.repro` (the same
    with COM1 into a file, for a person), `bochs.log`, `bochs.console` (its terminal) and
    `serial.log`. Leaving the `with` block always ends Bochs and its process group."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, cancel: threading.Event | None = None,
                 deadline: float | None = None):
        self.cfg = cfg
        self.deadline = deadline  # time.monotonic() by which every wait ends (default: timeout from start)
        self.teardown: list[str] = []
        self.run_dir = run_dir
        self.cancel = cancel or threading.Event()
        self.proc: subprocess.Popen | None = None
        self.master: int | None = None
        self.listener: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.console: pexpect.fdpexpect.fdspawn | None = None
        self._log = None
        self._term = None
        self.log_path = run_dir / "bochs.log"
        self.command: list[str] = []
        self.t_start = 0.0

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        iso = build_iso(self.cfg)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))  # Bochs connects to the lab (COM1 socket-client)
        self.listener.listen(1)
        port = self.listener.getsockname()[1]
        rc = self.run_dir / "bochs.rc"
        rc.write_text("c\n")  # the debugger's first command: continue
        conf = self.run_dir / "bochsrc"
        conf.write_text(config_text(self.cfg, iso, self.log_path, f"mode=socket-client, dev=127.0.0.1:{port}"))
        (self.run_dir / "bochsrc.repro").write_text(
            config_text(self.cfg, iso, self.run_dir / "bochs.repro.log",
                        f"mode=file, dev={self.run_dir / 'serial.repro.log'}"))
        self.command = [self.cfg.qemu, "-q", "-f", str(conf), "-rc", str(rc)]
        (self.run_dir / "command.txt").write_text(shlex.join(self.command) + "\n")
        self._term = open(self.run_dir / "bochs.console", "wb")
        self.t_start = time.monotonic()
        if self.deadline is None:
            self.deadline = self.t_start + self.cfg.timeout_s
        self.proc, self.master = _spawn(self.command, self.run_dir)
        self.listener.settimeout(0.05)
        deadline = self.deadline
        while self.sock is None:
            try:
                self.sock, _ = self.listener.accept()
            except TimeoutError:
                _drain(self.master, self._term)
                if self.proc.poll() is not None:
                    raise BootError(f"Bochs exited with status {self.proc.returncode} before it connected "
                                    f"COM1: {self._tail()}") from None
                if time.monotonic() > deadline:
                    raise BootError(f"Bochs did not connect COM1 within {self.cfg.timeout_s:g} s "
                                    f"({processes.describe('Bochs', self.proc.pid)}): {self._tail()}") from None
        self._log = open(self.run_dir / "serial.log", "wb")
        self.console = pexpect.fdpexpect.fdspawn(self.sock.fileno(), timeout=1, logfile=self._log)

    # -- run -----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self) -> str:
        text = self.log_text()
        panic = _PANIC.search(text)
        if panic:
            return f"Bochs panic: {panic.group(1).strip()}"
        lines = [ln for ln in text.splitlines() if ln.strip() and "CPUID[" not in ln]
        return " | ".join(lines[-2:]) if lines else "(nothing in bochs.log)"

    def wait_for_end(self, poll_s: float = 0.05) -> tuple[str, str]:
        assert self.console is not None and self.proc is not None and self.master is not None
        deadline = self.deadline or time.monotonic() + self.cfg.timeout_s
        while True:
            _drain(self.master, self._term)
            remaining = deadline - time.monotonic()
            if self.cancel.is_set():
                return "interrupted", "the lab was interrupted (Ctrl-C or SIGTERM)"
            if remaining <= 0:
                return "timeout", f"no `end` record within {self.cfg.timeout_s:.1f} s{self._stall()}"
            idx = self.console.expect([END_RECORD, pexpect.EOF, pexpect.TIMEOUT], timeout=min(poll_s, remaining))
            if idx in (0, 1):
                return self._wait_exit(saw_end=idx == 0)
            if self.proc.poll() is not None:
                return self._classify(saw_end=False)

    def _wait_exit(self, saw_end: bool) -> tuple[str, str]:
        assert self.proc is not None
        wait = max(0.5, min(2.0, (self.deadline or 0) - time.monotonic()))
        deadline = time.monotonic() + wait
        while self.proc.poll() is None and time.monotonic() < deadline:
            _drain(self.master, self._term)
            time.sleep(0.01)
        if self.proc.poll() is None:
            return "timeout", (f"the firmware sent `end` but Bochs did not exit within {wait:.1f} s" if saw_end
                               else f"COM1 closed but Bochs did not exit within {wait:.1f} s") + self._stall()
        return self._classify(saw_end)

    def _stall(self) -> str:
        """A timeout's cause when it is Bochs' own state (stopped, in the kernel), else ""."""
        assert self.proc is not None
        letter = processes.state(self.proc.pid)
        return f": {processes.describe('Bochs', self.proc.pid)}" if letter not in (None, "R", "S") else ""

    def _classify(self, saw_end: bool) -> tuple[str, str]:
        """How Bochs ended, from its log: the shutdown port is the clean end (status 1)."""
        assert self.proc is not None
        rc = self.proc.returncode
        text = self.log_text()
        panic = _PANIC.search(text)
        if panic and SHUTDOWN in panic.group(1):
            if saw_end:
                return "ok", "shutdown port (0x8900)"
            return "exit-code", ("the firmware stopped Bochs through its shutdown port without an `end` "
                                 "record (Bochs has no isa-debug-exit: the exit code is not visible)")
        code = _VGABIOS_PANIC.search(panic.group(1)) if panic else None
        if code:  # firmware/records.c lab_exit: port 0x501 is Bochs' VGA BIOS panic port
            return "exit-code", (f"firmware exited with code {code.group(1)} through port 0x501 (Bochs' VGA "
                                 f"BIOS panic port){'' if saw_end else ', without an `end` record'}")
        if rc is not None and rc < 0:
            return "killed", f"Bochs killed by signal {-rc}"
        if panic:
            what = panic.group(1).strip()
            if "triple fault" in what or "3rd" in what:
                return "crash", f"triple fault (reset_on_triple_fault=0): {what}"
            return "crash", f"Bochs panic: {what}"
        return "crash", f"Bochs exited with status {rc}: {self._tail()}"

    def serial_bytes(self) -> bytes:
        if self._log:
            self._log.flush()
        try:
            return (self.run_dir / "serial.log").read_bytes()
        except OSError:
            return b""

    def run(self, start=None) -> BootResult:  # noqa: ARG002 - the same call as qemu.Machine.run
        kind, detail = self.wait_for_end()
        with contextlib.suppress(Exception):
            self.console.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=0.01)
        wall = time.monotonic() - self.t_start
        desc = model_facts(parse_cpuid_dump(self.log_text()))
        repro = (f"cd {shlex.quote(str(self.run_dir))} && {shlex.quote(self.cfg.qemu)} -q -f bochsrc.repro "
                 f"-rc bochs.rc   # COM1 -> serial.repro.log")
        return BootResult(command=self.command, repro=repro, serial=self.serial_bytes(), exit=kind,
                          exit_detail=detail, returncode=self.proc.poll() if self.proc else None,
                          wall_s=wall, cpu_facts=desc, stderr=self._tail())

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        if self.proc is not None:
            self.teardown = kill_group(self.proc)
            if self.teardown:
                with contextlib.suppress(OSError):
                    (self.run_dir / "teardown.log").write_text(
                        f"Bochs (pid {self.proc.pid}): " + ", ".join(self.teardown) + "\n")
        if self.master is not None:
            _drain(self.master, self._term)
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None
        for closer in (self.sock, self.listener, self._log, self._term):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.sock = self.listener = None


# -- the runner's two entry points (lab/runner.py dispatches here for accel=bochs) -----------
def preboot(cfg: RunConfig):
    """Bochs' description of the model decides before the boot, as QOM does for QEMU."""
    from .runner import NO_LONG_MODE, PreBoot

    try:
        desc = describe(cfg.qemu, cfg.cpu, timeout_s=min(20.0, cfg.timeout_s))
    except BootError as exc:
        raise ConfigError(f"Bochs cannot start {cfg.label}: {exc}") from None
    if not desc.get("lm", True):
        return PreBoot(cfg, desc, skip=NO_LONG_MODE)
    for mode, key, where in (("vmx", "vmx", "CPUID.1:ECX[5]; SDM Vol. 3C 23.6"),
                             ("svm", "svm", "CPUID 0x80000001 ECX[2]; APM Vol. 2 15.4")):
        if cfg.host_mode == mode and not desc.get(key):
            raise ConfigError(f"--host-mode {mode}: Bochs model {cfg.cpu} has no {mode.upper()} ({where}); "
                              f"use --host-mode auto or soft, or a model with {mode.upper()} "
                              f"({DEFAULT_MODEL if mode == 'vmx' else SVM_MODEL})")
    # The same decisions the QEMU configurations get (lab/runner.py preboot): families whose
    # control the model reserves are not run, the ones that run only when told are named.
    from .runner import with_skips

    model = facts_for(cfg, desc)
    gated = catalogue.gate_skips(model.has) + deviations.skipped_probes(BOCHS, None, model.has)
    args = with_skips(cfg.kernel_args, gated) if gated else cfg.kernel_args
    run = catalogue.run_words(model.has, gated)
    if run:
        args = (*args, f"run={','.join(run)}")
    return PreBoot(dataclasses.replace(cfg, kernel_args=args, prebooted=True), desc)


def run_one(cfg: RunConfig, run_dir: Path, cancel: threading.Event | None = None):
    """One Bochs boot, judged like a QEMU one. The serial console is the only witness
    (docs/bochs.md says why Bochs' debugger is not driven as a second one)."""
    from .judge import Check, judge
    from .records import parse_stream
    from .runner import RunOutcome

    if not cfg.prebooted:  # the model's facts decide what the firmware must not run
        from .runner import not_run_check

        try:
            pre = preboot(cfg)
        except ConfigError as exc:
            return RunOutcome(cfg, run_dir, [Check("run.integrity", cfg.accel, "host", "run", {}, "complete", "no boot",
                                                   "error", str(exc), config=cfg.label)])
        if pre.skip:
            return RunOutcome(pre.cfg, run_dir, [not_run_check(pre)])
        cfg = pre.cfg
    outcome = RunOutcome(cfg, run_dir, [])
    machine = None
    try:
        # Every wait of the boot ends by its deadline (the ISO build, if one is due, counts too).
        machine = BochsMachine(cfg, run_dir, cancel=cancel, deadline=time.monotonic() + cfg.timeout_s)
        with machine:
            boot = machine.run()
    except (BootError, BuildError) as exc:
        outcome.error = str(exc)
        outcome.checks = [Check("run.integrity", cfg.accel, "host", "run", {}, "complete", "no boot", "error",
                                f"Bochs did not boot: {exc}", config=cfg.label)]
        return outcome
    finally:
        if machine is not None and machine.teardown:
            outcome.extras["teardown"] = {"Bochs": machine.teardown}
    outcome.boot = boot
    outcome.transcript = parse_stream(boot.serial)
    outcome.facts = facts_for(cfg, boot.cpu_facts)
    outcome.checks = judge(outcome.facts, outcome.transcript, config=cfg.label, boot_exit=boot.exit,
                           boot_detail=boot.exit_detail)
    return outcome


# -- choosing Bochs from the command line (lab/cli.py) ----------------------------------------
EVERY = "every"  # --accel every: QEMU's accelerators and Bochs, for the differential view


def version(run_dir) -> str | None:
    """The Bochs version its banner printed on the boot's terminal (`Bochs x86 Emulator 2.7`)."""
    import re

    try:
        text = (Path(run_dir) / "bochs.console").read_bytes()[:8192].decode("latin-1")
    except OSError:
        return None
    found = re.search(r"Bochs x86 Emulator (\S+)", text)
    return found.group(1) if found else None


def missing_reason() -> str:
    """Why Bochs cannot run here ("" when it can)."""
    try:
        bochs_binary()
    except ToolMissing as exc:
        return str(exc)
    return ""


def check_choice(accel: str, cpu: str) -> None:
    """--accel bochs needs Bochs (and --cpu, if given, is one of its models); --accel every
    runs several engines, so a --cpu could not name all of their models."""
    if accel == EVERY:
        if cpu:
            raise ConfigError("--accel every runs QEMU and Bochs models: --cpu cannot name both; leave it out")
        return
    binary = bochs_binary()
    if cpu:
        check_model(binary, cpu)


def engine_cpus(accels: list[str], cpu: str, *, every: bool) -> list[tuple[str, str]]:
    """(accelerator, CPU model) per boot. `every` boots two Bochs models: Intel with VMX and
    AMD with SVM, so both hardware hosts run next to TCG's SVM."""
    out = [(a, cpu) for a in accels]
    if every and "bochs" in accels:
        out.append(("bochs", SVM_MODEL))
    return out


def default_iso(art) -> Path:
    """`invoke build`: the ISO of the default command line (what `--accel bochs` boots)."""
    from .config import BOCHS, Module

    cfg = RunConfig(accel=BOCHS, qemu=bochs_binary(), kernel=art.kernel, symbols=art.symbols,
                    modules=(Module(art.guest),))
    return build_iso(cfg)
