"""Faults, bad input and interruptions: a clear verdict within the timeout + 2 s, the last
serial lines and the run folder to look at, and nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lab import catalogue
from lab.ids import check_id
from lab.cli import select_accels
from lab.config import ConfigError
from lab.hostinfo import KvmStatus, ToolMissing, kvm_status, qemu_binary
from lab.runner import make_config, run_one
from tests.conftest import lab_processes

pytestmark = pytest.mark.usefixtures("no_leftovers")
TIMEOUT = 3.0


def boot_fault(tmp_path, art, qemu, kvm, accel, fault, timeout=TIMEOUT):
    cfg = make_config(accel, art, qemu=qemu, kvm=kvm, kernel_args=(f"fault={fault}",), timeout_s=timeout)
    t0 = time.monotonic()
    out = run_one(cfg, tmp_path / f"{accel}-{fault}", kvm)
    return out, time.monotonic() - t0


def integrity(out):
    return next(c for c in out.checks if c.id == "run.integrity")


ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)]


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ACCELS)
def test_hang_is_a_timeout_error_within_the_bound(tmp_path, artifacts, qemu, kvm, accel):
    out, took = boot_fault(tmp_path, artifacts, qemu, kvm, accel, "hang")
    assert out.boot.exit == "timeout"
    assert integrity(out).status == "error" and "timeout" in integrity(out).reason
    assert took < TIMEOUT + 2
    # Every planned host check is an error, none a pass: the probes never reported.
    assert not [c for c in out.checks if c.scope == "host" and c.status == "pass"]


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ACCELS)
def test_triple_fault_is_a_crash(tmp_path, artifacts, qemu, kvm, accel):
    out, took = boot_fault(tmp_path, artifacts, qemu, kvm, accel, "triple")
    assert out.boot.exit == "crash" and "triple fault" in out.boot.exit_detail
    assert integrity(out).status == "error"
    assert took < TIMEOUT + 2


@pytest.mark.tcg
@pytest.mark.parametrize("fault", ["garbage", "longline"])
def test_noise_on_the_console_does_not_confuse_the_lab(tmp_path, artifacts, qemu, kvm, fault):
    out, _ = boot_fault(tmp_path, artifacts, qemu, kvm, "tcg", fault, timeout=15)
    assert integrity(out).status == "pass"
    assert not [c for c in out.checks if c.scope == "host" and c.status in ("fail", "error")]


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ACCELS)
def test_output_cut_short_is_an_error(tmp_path, artifacts, qemu, kvm, accel):
    out, took = boot_fault(tmp_path, artifacts, qemu, kvm, accel, "cut")
    assert integrity(out).status == "error" and "cut short" in integrity(out).reason
    assert took < TIMEOUT + 2


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ACCELS)
def test_unexpected_exception_in_a_probe_is_an_error_with_its_cause(tmp_path, artifacts, qemu, kvm, accel):
    out, took = boot_fault(tmp_path, artifacts, qemu, kvm, accel, "exception")
    assert out.boot.exit == "exit-code"
    reason = integrity(out).reason
    assert "unexpected exception" in reason and "PF" in reason
    assert took < TIMEOUT + 2


@pytest.mark.parametrize("accel", ACCELS)
def test_an_exception_inside_the_table_reports_every_row_before_it(tmp_path, artifacts, qemu, kvm, accel):
    """The table's records go out in batches (firmware/probe.c); an unexpected exception
    renders the pending ones before its own record: the ten rows run before it are all
    observed, in order, and the boot ends with the exception as its cause."""
    out, _ = boot_fault(tmp_path, artifacts, qemu, kvm, accel, "table-exception")
    assert out.boot.exit == "exit-code"
    assert "unexpected exception #UD" in integrity(out).reason
    assert out.transcript.info["probe_name"] == "fault-table-exception"
    order = [r.id for r in catalogue.table_rows()]
    seen = [check_id(o.scope, o.probe, o.params) for o in out.transcript.observations]
    in_table = [order.index(cid) for cid in seen if cid in order]
    assert len(in_table) == 10 and in_table == sorted(in_table)  # all ten, in the table's order


@pytest.mark.kvm
def test_kvm_internal_error_is_recognised_at_once(tmp_path, artifacts, qemu, kvm):
    out, took = boot_fault(tmp_path, artifacts, qemu, kvm, "kvm", "kvm-internal", timeout=30)
    if kvm.module != "kvm_pvm":
        pytest.skip(f"int $0x80 at CPL0 is no KVM internal error under {kvm.module}")
    assert out.boot.exit == "internal-error" and "KVM internal error" in out.boot.exit_detail
    assert took < 2.0  # not after the 30 s timeout


@pytest.mark.tcg
def test_kvm_internal_fault_is_harmless_under_tcg(tmp_path, artifacts, qemu, kvm):
    out, _ = boot_fault(tmp_path, artifacts, qemu, kvm, "tcg", "kvm-internal")
    assert out.boot.exit == "ok"
    assert out.transcript.info.get("int80") == "reached"


@pytest.mark.tcg
def test_qemu_killed_mid_run(tmp_path, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, kernel_args=("fault=hang",), timeout_s=20)

    log = tmp_path / "killed" / "serial.log"

    def killer():  # once the firmware is running (its first record is out), SIGKILL QEMU
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = lab_processes()
            if rows and log.exists() and b"@@LAB 0" in log.read_bytes():
                os.kill(int(rows[0].split()[0]), signal.SIGKILL)
                return
            time.sleep(0.02)

    threading.Thread(target=killer, daemon=True).start()
    t0 = time.monotonic()
    out = run_one(cfg, tmp_path / "killed", kvm)
    assert time.monotonic() - t0 < 5
    assert out.boot.exit == "killed" and "signal 9" in out.boot.exit_detail
    assert integrity(out).status == "error"


def test_qemu_missing_names_the_install_command(monkeypatch):
    monkeypatch.delenv("LAB_QEMU", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolMissing, match="apt-get install qemu-system-x86"):
        qemu_binary()
    # A path the user typed is a path: installing a package would not create it.
    with pytest.raises(ToolMissing, match="no such file") as exc:
        qemu_binary("/nonexistent/qemu-system-x86_64")
    assert "apt-get" not in str(exc.value)
    monkeypatch.setenv("LAB_QEMU", "/nonexistent/q")
    with pytest.raises(ToolMissing, match="LAB_QEMU /nonexistent/q: no such file"):
        qemu_binary()


def test_kvm_device_missing_or_not_permitted(tmp_path):
    missing = kvm_status(dev=str(tmp_path / "kvm"))
    assert not missing.usable and "no /dev/kvm" in missing.reason
    dev = tmp_path / "kvm"
    dev.write_text("")
    dev.chmod(0)
    if os.geteuid() != 0:  # root may open anything
        denied = kvm_status(dev=str(dev))
        assert not denied.usable and "kvm group" in denied.reason
    run, skipped = select_accels("all", missing)
    assert run == ["tcg"] and skipped[0][0] == "kvm" and "no /dev/kvm" in skipped[0][1]
    with pytest.raises(ConfigError, match="KVM is not usable"):
        select_accels("kvm", missing)
    assert select_accels("auto", KvmStatus(False, None, "x"))[0] == ["tcg"]


def invoke(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "invoke", *args], capture_output=True, text=True,
                          timeout=60, env=env, **kw)


def test_bad_input_on_the_command_line_is_one_clear_error():
    for args, msg in [
        (("lab.run", "--accel", "xen"), "--accel 'xen'"),
        (("lab.run", "--qemu", "/nonexistent/qemu"), "--qemu /nonexistent/qemu: no such file"),
        (("lab.run", "--hv-signature", "short"), "exactly 12"),
        (("lab.run", "--witness", "psychic"), "--witness"),
        (("lab.run", "--kernel-arg", "fault=nonsense"), "fault='nonsense'"),
    ]:
        proc = invoke(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert msg in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_compiler_missing_is_one_clear_error(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    proc = invoke("build", env=env)
    assert proc.returncode == 2 and "not found. Install it" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.tcg
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly(tmp_path, artifacts, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "lab.run", "--accel", "tcg", "--witness", "serial",
         "--kernel-arg", "fault=hang", "--timeout", "60", "--json", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60  # a firmware rebuild on a loaded machine comes first
        while time.monotonic() < deadline and not _qemu_of(proc.pid):
            time.sleep(0.05)
        assert _qemu_of(proc.pid), "QEMU never started"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:  # the test failed: let the lab stop its QEMU before the last resort
            proc.terminate()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode in (130, 143), (proc.returncode, out, err)
    assert "stopped" in out + err and "Traceback" not in err
    assert not _qemu_of(proc.pid)


def _qemu_of(pid: int) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if f"ringlab-{pid}-" in line]


def _gdb_pids(owner: int) -> list[int]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    out = []
    for row in ps.splitlines()[1:]:
        fields = row.split(None, 2)
        if len(fields) < 3:  # a process with an empty command line (e.g. a zombie just reaped)
            continue
        pid, ppid, args = fields
        if int(ppid) == owner and os.path.basename(args.split()[0]) == "gdb":
            out.append(int(pid))
    return out


def _witnessed_boot_with(tmp_path, art, qemu, kvm, action, timeout=4.0):
    """Boot with the GDB witness while `action(gdb_pid)` runs once GDB is attached."""
    cfg = make_config("tcg", art, qemu=qemu, kvm=kvm, timeout_s=timeout)
    log = tmp_path / "w" / "serial.log"

    def watcher():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = _gdb_pids(os.getpid())
            if pids and log.exists() and b"@@LAB 0" in log.read_bytes():
                action(pids[0])
                return
            time.sleep(0.005)

    threading.Thread(target=watcher, daemon=True).start()
    t0 = time.monotonic()
    out = run_one(cfg, tmp_path / "w", kvm, witness="both")
    return out, time.monotonic() - t0


@pytest.mark.tcg
@pytest.mark.gdb
def test_gdb_killed_mid_run_is_an_error_not_a_hang(tmp_path, artifacts, qemu, kvm):
    out, took = _witnessed_boot_with(tmp_path, artifacts, qemu, kvm, lambda pid: os.kill(pid, signal.SIGKILL))
    assert took < 4.0 + 2
    witnessed = [c for c in out.checks if "gdb" in c.witnesses]
    assert any(c.status == "error" and "GDB" in c.reason for c in witnessed) or out.extras.get("gdb_error")
    assert not [c for c in out.checks if c.status == "pass" and c.witnesses.get("gdb") == "unreached"]


@pytest.mark.tcg
@pytest.mark.gdb
def test_gdb_hung_mid_run_is_an_error_not_a_hang(tmp_path, artifacts, qemu, kvm):
    out, took = _witnessed_boot_with(tmp_path, artifacts, qemu, kvm, lambda pid: os.kill(pid, signal.SIGSTOP))
    assert took < 4.0 + 2
    assert [c for c in out.checks if c.status == "error"]


@pytest.mark.tcg
@pytest.mark.gdb
def test_gdbstub_port_taken_is_a_clear_error(tmp_path, artifacts, qemu, kvm, monkeypatch):
    import socket

    import lab.runner

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(lab.runner, "free_tcp_port", lambda: taken.getsockname()[1])
        cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, timeout_s=5)
        t0 = time.monotonic()
        out = run_one(cfg, tmp_path / "p", kvm, witness="both")
    assert time.monotonic() - t0 < 5
    # QEMU's own stderr says which socket it could not open.
    assert out.boot is None and "-gdb tcp:127.0.0.1" in out.error and "already in use" in out.error
    assert [c.status for c in out.checks] == ["error"]


def test_gdb_missing_names_the_install_command(tmp_path):
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:/nonexistent")
    env["LAB_QEMU"] = qemu_binary()
    proc = invoke("lab.run", "--accel", "tcg", env=env)
    assert proc.returncode == 2 and "apt-get install" in proc.stderr and "Traceback" not in proc.stderr
