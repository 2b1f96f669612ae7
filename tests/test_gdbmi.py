"""The GDB/MI driver (lab/gdbmi.py), the lab-* GDB commands and the debug session.

Driver unit tests need only gdb; the rest boot the lab's firmware paused under QEMU and
drive GDB through the driver, the way `invoke lab.debug` sets it up.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lab import debug
from lab.records import parse_stream
from lab.gdbmi import Gdb, GdbClosed, GdbError, GdbTimeout, TARGET_CLOSED, mi_quote

pytestmark = [
    pytest.mark.gdb,
    pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed"),
]


def alive(pid: int) -> bool:
    """Running (not a zombie) per /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def settles(predicate, timeout: float = 2.0) -> bool:
    """True once `predicate()` holds, polling for at most `timeout` s: a SIGKILLed process
    stays in /proc until the kernel has torn it down and its parent has reaped it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group, from /proc (no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out


# -- the driver on its own ------------------------------------------------------------------
def test_settles_waits_and_gives_up_in_time():
    t0 = time.monotonic()
    assert not settles(lambda: False, timeout=0.1)  # negative control: a process that never goes
    assert 0.1 <= time.monotonic() - t0 < 0.5
    assert settles(lambda: time.monotonic() - t0 > 0.15)


def test_command_returns_at_its_own_completion(tmp_path):
    with Gdb(tmp_path / "t.log") as g:
        t0 = time.monotonic()
        res = g.mi("-gdb-version")
        took = time.monotonic() - t0
        assert res.result_class == "done"
        assert "GNU gdb" in res.console
        assert took < 0.5, f"-gdb-version took {took:.3f} s: the driver must not wait for a quiet period"
        assert g.evaluate("1 + 2") == "3"


def test_error_record_raises_gdberror_with_gdbs_message(tmp_path):
    with Gdb(tmp_path / "t.log") as g:
        with pytest.raises(GdbError) as exc:
            g.mi("-no-such-command")
        assert "Undefined MI command" in exc.value.message
        assert exc.value.command == "-no-such-command"
        assert g.evaluate("2 * 21") == "42"  # the session goes on after an error


def test_timeout_names_the_command_and_gdb_is_gone_after(tmp_path):
    with Gdb(tmp_path / "t.log") as g:
        pid = g.pid
        t0 = time.monotonic()
        with pytest.raises(GdbTimeout) as exc:
            g.console("shell sleep 30", timeout=0.3)  # GDB blocks in its child
        assert time.monotonic() - t0 < 1.0
        assert "shell sleep 30" in str(exc.value) and "0.3" in str(exc.value)
    assert settles(lambda: not alive(pid))
    assert settles(lambda: group_members(pid) == []), "the sleep GDB started must be gone with it"


def test_teardown_on_exception_leaves_no_process(tmp_path):
    with pytest.raises(RuntimeError):
        with Gdb(tmp_path / "t.log") as g:
            pid = g.pid
            raise RuntimeError("boom")
    assert settles(lambda: not alive(pid))


def test_dead_gdb_raises_gdbclosed_not_a_hang(tmp_path):
    with Gdb(tmp_path / "t.log", timeout=5) as g:
        os.kill(g.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(GdbClosed):
            g.mi("-gdb-version")
        assert time.monotonic() - t0 < 1.0


def test_transcript_has_every_line_with_timestamps(tmp_path):
    log = tmp_path / "run" / "gdb.mi.log"
    with Gdb(log) as g:
        g.mi("-gdb-version")
        with pytest.raises(GdbError):
            g.mi("-no-such-command")
    text = log.read_text()
    assert re.search(r"^\s*\d+\.\d{4} > \d+-gdb-version$", text, re.M)
    assert re.search(r"^\s*\d+\.\d{4} < \d+\^error,msg=", text, re.M)
    assert "gdb ended" in text


def test_a_gdb_internal_error_ends_gdb_without_a_core_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where GDB would drop its core file
    with Gdb(tmp_path / "t.log") as g:
        pid = g.pid
        with pytest.raises((GdbClosed, GdbError, GdbTimeout)):
            g.console("maint internal-error the lab's negative control", timeout=5)
        assert settles(lambda: not alive(pid), timeout=5)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("core")]


def test_gdbs_python_library_is_byte_compiled_once_into_the_labs_cache(tmp_path, monkeypatch):
    """GDB's start-up compiles its own Python library unless bytecode is cached; the lab
    points that cache into its own folder, whatever PYTHONDONTWRITEBYTECODE says."""
    import lab.gdbmi

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(lab.gdbmi, "GDB_PYCACHE", tmp_path / "pyc")
    with Gdb(tmp_path / "t.log") as g:
        assert g.evaluate("1 + 1") == "2"
    written = sorted(p.name for p in (tmp_path / "pyc").rglob("*.pyc"))
    assert "__init__.cpython-%d%d.pyc" % _gdb_python_version() in written  # gdb/__init__.py
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "pyc").rglob("*.pyc")}
    with Gdb(tmp_path / "t2.log") as g:
        g.evaluate("1")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pyc").rglob("*.pyc")} == mtimes  # read, not rewritten


def _gdb_python_version() -> tuple[int, int]:
    out = subprocess.run(["gdb", "--nx", "--batch", "-ex", "python import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True).stdout
    major, minor = re.findall(r"\d+", out)[:2]
    return int(major), int(minor)


def test_mi_quote():
    assert mi_quote('a "b" \\c') == '"a \\"b\\" \\\\c"'


def test_register_cache_and_unknown_register(tmp_path, artifacts):
    with Gdb(tmp_path / "t.log") as g:
        g.load_symbols(artifacts.symbols)
        names = g.register_names()  # without a target: no cr4/efer yet (QEMU's target description)
        assert {"cs", "rip", "rbx"} <= set(names)
        assert g.register_names() is names  # cached
        with pytest.raises(GdbError, match="no register"):
            g.read_register("dr7")


# -- against the lab's QEMU ------------------------------------------------------------------
def boot(tmp_path: Path, accel: str, **kw) -> tuple[debug.DebugSession, object]:
    s = debug.plan_session(accel, run_dir=tmp_path / "run", **kw)
    return s, debug.start_qemu(s)


@pytest.mark.parametrize("accel", [pytest.param("tcg", marks=pytest.mark.tcg),
                                   pytest.param("kvm", marks=pytest.mark.kvm)])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_attach_break_run_to_exit(tmp_path, accel, transport, artifacts, no_leftovers):
    s, qemu = boot(tmp_path, accel, unix_socket=transport == "unix")
    try:
        t0 = time.monotonic()
        with Gdb(tmp_path / "gdb.mi.log", accel=accel) as g:
            g.connect(s.gdb_addr, artifacts.symbols)
            g.breakpoint("*probe_done_cpuid_vendor", temporary=True)  # CPUID leaf 0 just ran
            g.cont()
            stop = g.wait_stopped(10)
            assert stop["reason"] == "breakpoint-hit" and stop["frame"]["func"] == "probe_done_cpuid_vendor"
            r = g.read_registers("rbx", "rdx", "rcx", "cs")
            vendor = b"".join((r[n] & 0xFFFFFFFF).to_bytes(4, "little") for n in ("rbx", "rdx", "rcx"))
            assert r["cs"] & 3 == 0
            g.cont()
            assert g.wait_stopped(10)["reason"] == TARGET_CLOSED  # QEMU exited (isa-debug-exit)
        took = time.monotonic() - t0
        assert qemu.wait(5) == 1, (tmp_path / "run" / "qemu.stderr").read_text()
        assert "@@LAB" in (tmp_path / "run" / "serial.log").read_text()
        assert took < 2.0, f"attach + one breakpoint + run to exit took {took:.2f} s"
        # What GDB read in the registers is what the firmware's record says CPUID returned.
        serial = parse_stream((tmp_path / "run" / "serial.log").read_bytes())
        assert serial.info["cpuid.vendor"].encode("latin-1") == vendor
    finally:
        debug.stop_qemu(s, qemu)


@pytest.mark.tcg
def test_hardware_slots_are_planned(tmp_path, artifacts, no_leftovers):
    s, qemu = boot(tmp_path, "tcg")
    try:
        with Gdb(tmp_path / "t.log", accel="kvm") as g:  # the KVM rules, on a TCG target
            g.connect(s.gdb_addr, artifacts.symbols)
            for sym in ("kmain", "exc_dispatch", "probes_run_table", "probe_call"):
                g.breakpoint(f"*{sym}")  # KVM: hardware
            assert g.hw_slots_free == 0
            with pytest.raises(GdbError, match="slots"):
                g.hbreak("*cpu_init")
            g.delete("1")
            assert g.hw_slots_free == 1
            g.hbreak("*cpu_init", temporary=True)
            g.cont()
            assert g.wait_stopped(10)["frame"]["func"] == "cpu_init"
            assert g.hw_slots_free == 1  # a temporary breakpoint frees its slot when it fires
    finally:
        debug.stop_qemu(s, qemu)


def lab_session(tmp_path: Path, accel: str, artifacts):
    """A debug session driven over MI: the same setup lines `invoke lab.debug` runs."""
    s, qemu = boot(tmp_path, accel)
    g = Gdb(tmp_path / "gdb.mi.log", accel=accel)
    g.start()
    for line in s.gdb_setup[:-2]:  # up to the attach; breakpoints are the test's own
        if line.startswith("target remote"):
            g.connect(s.gdb_addr)
        else:
            g.console(line)
    return g, qemu, s


@pytest.mark.tcg
def test_lab_cpl_reads_0_then_3_across_iretq(tmp_path, artifacts, no_leftovers):
    g, qemu, s = lab_session(tmp_path, "tcg", artifacts)
    try:
        assert "lab-cpl" in g.console("help user-defined") or "CPL" in g.console("lab-cpl")
        # The IRETQ into a probe stub at CPL3 (RDI still holds the target CPL there).
        g.breakpoint("*probe_iretq", condition="$rdi == 3", temporary=True)
        g.cont()
        g.wait_stopped(10)
        for _ in range(60):
            if g.read_memory("$pc", 2) == b"\x48\xcf":  # iretq
                break
            g.step_instruction()
        else:
            pytest.fail("no iretq within 60 instructions of probe_iretq")
        before = g.console("lab-cpl")
        g.step_instruction()
        after = g.console("lab-cpl")
        assert before.startswith("CPL 0 (host)"), before
        assert after.startswith("CPL 3 (host)"), after
        assert "TSD=" in g.console("lab-cr4")
        probes = g.console("lab-probes")
        assert "exc_dispatch" in probes and "probed instructions" in probes
    finally:
        g.close()
        debug.stop_qemu(s, qemu)


@pytest.mark.tcg
def test_lab_vmcb_decodes_a_real_exit(tmp_path, artifacts, no_leftovers):
    g, qemu, s = lab_session(tmp_path, "tcg", artifacts)
    try:
        g.breakpoint("*guest_start", temporary=True)  # guest symbols, at the guest's load address
        g.cont()
        g.wait_stopped(10)
        assert g.console("lab-cpl").startswith("CPL 0 (guest)")
        assert "SVME" in g.console("lab-cr4")  # EFER while the SVM guest runs
        g.breakpoint("*svm_vmexit_return", temporary=True)
        g.cont()
        stop = g.wait_stopped(10)
        assert int(stop["frame"]["addr"], 16) == g.symbol_address("svm_vmexit_return"), stop
        out = g.console("lab-vmcb")
        m = re.search(r"exit\s+(0x[0-9a-f]+) (\S+)", out)
        assert m, out
        assert not m.group(2).startswith("UNKNOWN") and m.group(2) != "INVALID", out
        assert re.search(r"intercepts .*VMRUN", out) and "CPUID" in out, out
        assert re.search(r"asid=[1-9]", out), out
        assert "guest       rip=0x10" in out, out  # inside the guest's window at 16 MiB
    finally:
        g.close()
        debug.stop_qemu(s, qemu)


@pytest.mark.kvm
def test_kvm_hardware_breakpoint_and_stepping_on_cpl0(tmp_path, artifacts, no_leftovers):
    g, qemu, s = lab_session(tmp_path, "kvm", artifacts)
    try:
        g.breakpoint("*kmain", temporary=True)  # hardware under KVM
        g.cont()
        assert g.wait_stopped(10)["reason"] == "breakpoint-hit"
        assert g.console("lab-cpl").startswith("CPL 0 (host)")
        pc = g.read_register("rip")
        g.step_instruction()
        assert g.read_register("rip") != pc  # stepping works on CPL0 code under KVM
    finally:
        g.close()
        debug.stop_qemu(s, qemu)


def test_print_only_prints_both_commands(capsys, artifacts):
    assert debug.debug_session("tcg", print_only=True) == 0
    out = capsys.readouterr().out
    assert "-S" in out and "-gdb tcp:127.0.0.1:" in out and " -s " not in out
    assert "set architecture i386:x86-64" in out and "lab_gdb.py" in out and "break *kmain" in out
    assert debug.plan_session("kvm", "guest").gdb_setup[-2] == "thbreak *soft_enter_iretq"  # no SVM guest under KVM


@pytest.mark.tcg
def test_a_unix_socket_session_returns_once_qemu_made_its_socket(tmp_path, artifacts, no_leftovers):
    """GDB does not retry a unix-socket connect: start_qemu returns only when the socket is there."""
    s, qemu = boot(tmp_path, "tcg", unix_socket=True)
    try:
        assert os.path.exists(s.gdb_addr) or qemu.poll() is not None
        assert qemu.poll() is None  # paused at its first instruction, waiting for GDB
    finally:
        debug.stop_qemu(s, qemu)
