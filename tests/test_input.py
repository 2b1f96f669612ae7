"""Bad input on the command line: one `error:` line, exit 2, no traceback, before any boot,
nothing created. QEMU is reached through a wrapper that logs every start, so a boot (or the
pre-boot CPU query) that should not have happened is seen."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lab.build import ROOT
from lab.hostinfo import qemu_binary

pytestmark = pytest.mark.usefixtures("no_leftovers")


@pytest.fixture
def wrapped_qemu(tmp_path):
    """A QEMU that logs its arguments (one line per start) and then runs the real one."""
    log = tmp_path / "qemu-starts.log"
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {qemu_binary()} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def boots(log: Path) -> list[str]:
    """QEMU starts other than the questions `--version` and `-cpu help`."""
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line not in ("--version", "-cpu help")]


def run_bad(tmp_path, wrapper, *args, env_extra=None):
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = dict(os.environ, LAB_QEMU=str(wrapper), **(env_extra or {}))
    before = sorted(p.name for p in cwd.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "-r", str(ROOT), "lab.run", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout, proc.stderr = proc.communicate(timeout=60)
    assert sorted(p.name for p in cwd.iterdir()) == before, "something was created in the working folder"
    runs = ROOT / "runs"
    if runs.is_dir():
        mine = [p for p in runs.iterdir() if p.name.endswith(f"-{proc.pid}")]
        assert not mine, f"a run folder was created: {mine}"
    return proc


def assert_one_error(proc, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0], lines[0]


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this user cannot create files in (root may write anywhere but sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return d


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--json", "/nonexistent/dir/x.json"), "/nonexistent/dir does not exist"),
        (("--junit", "/nonexistent/dir/x.xml"), "/nonexistent/dir does not exist"),
        (("--json", "/tmp"), "is a folder"),
        (("--junit", "/tmp"), "is a folder"),
        (("--json", "/etc/hostname/x.json"), "is not a folder"),
        (("--timeout", "abc"), "--timeout 'abc'"),
        (("--timeout", "0"), "positive"),
        (("--cpu", "skylake-client"), "did you mean Skylake-Client"),
        (("--cpu", "nosuchmodel"), "no CPU model 'nosuchmodel'"),
        (("--cpu", "qemu64;reboot"), "not a QEMU CPU model"),
        (("--kernel-arg", "nosuchkey=1"), "unknown key 'nosuchkey'"),
        (("--kernel-arg", "skip=everything"), "skip='everything'"),
        (("--kernel-arg", "hv-intercept-cpuid=2"), "choose one of 0, 1"),
        (("--kernel-arg", "host-mode=soft"), "use --host-mode"),
        (("--hv-signature", "ÄbcdefghijK"), "(12 bytes in UTF-8, not all ASCII)"),
        (("--hv-signature", "Äbcdefghijkl"), "(13 bytes"),
        (("--machine", "isapc"), "--machine 'isapc'"),
        (("--host-mode", "ring-1"), "--host-mode 'ring-1'"),
        (("--accel", "xen"), "--accel 'xen'"),
    ],
)
def test_bad_value_is_one_error_line_before_any_boot(tmp_path, wrapped_qemu, args, needle):
    wrapper, log = wrapped_qemu
    proc = run_bad(tmp_path, wrapper, *args)
    assert_one_error(proc, needle)
    assert boots(log) == [], "QEMU was started for a bad input"


def test_unknown_cpu_flag_is_one_error_line_from_the_pre_boot_query(tmp_path, wrapped_qemu):
    """QEMU itself judges the flags: its CPU query (paused, no kernel) fails, nothing boots."""
    wrapper, log = wrapped_qemu
    proc = run_bad(tmp_path, wrapper, "--accel", "tcg", "--witness", "serial", "--cpu", "qemu64,+nosuchflag")
    assert_one_error(proc, "Property 'qemu64-x86_64-cpu.nosuchflag' not found")
    [query] = boots(log)
    assert "-S" in query.split() and "-kernel" not in query


def test_unwritable_report_folder_is_one_error_line(tmp_path, wrapped_qemu):
    wrapper, log = wrapped_qemu
    folder = read_only_folder(tmp_path)
    proc = run_bad(tmp_path, wrapper, "--junit", str(folder / "j.xml"))
    assert_one_error(proc, f"cannot write in {folder}")
    assert boots(log) == []


def test_qemu_path_the_user_typed_is_checked_as_a_path(tmp_path, wrapped_qemu):
    wrapper, _ = wrapped_qemu
    proc = run_bad(tmp_path, wrapper, "--qemu", "/nonexistent/qemu")
    assert_one_error(proc, "--qemu /nonexistent/qemu: no such file")
    assert "apt-get" not in proc.stderr  # installing a package would not create that path
    proc = run_bad(tmp_path, wrapper, "--qemu", str(tmp_path))
    assert_one_error(proc, "not an executable file")


def test_keep_runs_setting_is_checked(tmp_path, wrapped_qemu):
    wrapper, _ = wrapped_qemu
    proc = run_bad(tmp_path, wrapper, env_extra={"LAB_KEEP_RUNS": "none"})
    assert_one_error(proc, "LAB_KEEP_RUNS='none'")


def test_negative_control_the_wrapper_sees_a_boot(tmp_path, wrapped_qemu, artifacts):
    """The `no boot` assertions above can fail: a good command line does start QEMU."""
    wrapper, log = wrapped_qemu
    env = dict(os.environ, LAB_QEMU=str(wrapper))
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.run", "--accel", "tcg", "--witness", "serial",
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(boots(log)) == 2  # the pre-boot CPU query, then the boot
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~_umask()  # 0644 under umask 022


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dash_h_is_help_not_a_signature():
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.run", "-h"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--hv-signature" in proc.stdout and "Usage:" in proc.stdout


def test_dash_h_is_help_for_every_task():
    listing = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60).stdout
    tasks = [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert "lab.run" in tasks and "clean" in tasks
    for name in tasks:
        proc = subprocess.run([sys.executable, "-m", "invoke", name, "-h"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), (name, proc.stderr[-500:])


def test_help_shows_a_placeholder_and_default_for_every_value_option():
    proc = subprocess.run([sys.executable, "-m", "invoke", "--help", "lab.run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    text = " ".join(proc.stdout.split())
    for option in ("accel", "cpu", "machine", "json", "junit", "qemu", "witness", "hv-signature", "host-mode",
                   "kernel-arg", "variant", "timeout"):
        start = text.index(f"--{option}")
        nxt = text.find(" --", start + 2)
        assert "default" in text[start:nxt], f"--{option}: no default in its help"
    assert "S: seconds" in text and "(default: 15)" in text
