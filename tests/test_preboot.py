"""Decisions taken from QEMU's description of the CPU model (QOM) before any boot: a model
the 64-bit host kernel cannot run on is one skip row, SYSCALL/SYSRET follow QOM `syscall`,
`--host-mode svm` needs SVM, and QEMU's MSR 0x10a abort names its fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rich.console import Console

from lab import runner
from lab.cli import RunOptions, run_lab
from lab.config import ConfigError
from lab.qemu import explain
from lab.runner import NO_LONG_MODE, make_config, preboot, run_one, with_skips

pytestmark = pytest.mark.usefixtures("no_leftovers")


def quiet_run(tmp_path, **kw):
    opts = RunOptions(accel="tcg", witness="serial", quiet=True, runs_dir=str(tmp_path / "runs"), **kw)
    return run_lab(opts, Console(file=open(tmp_path / "console.log", "w")))


def fake_facts(monkeypatch, **facts):
    monkeypatch.setattr(runner, "cpu_model_facts", lambda cfg: dict(facts))


# -- the decision, from given facts ----------------------------------------------------------
def test_no_long_mode_skips_the_configuration(monkeypatch, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm)
    fake_facts(monkeypatch, lm=False, syscall=False, svm=False)
    assert preboot(cfg).skip == NO_LONG_MODE
    fake_facts(monkeypatch, lm=True, syscall=True, svm=True)  # negative control
    assert preboot(cfg).skip == ""


def test_no_syscall_tells_the_firmware_to_skip_those_probes(monkeypatch, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, kernel_args=("skip=rdtscp", "fault=garbage"))
    fake_facts(monkeypatch, lm=True, syscall=False, svm=False)
    assert preboot(cfg).cfg.kernel_args == ("skip=rdtscp,syscall", "fault=garbage")
    fake_facts(monkeypatch, lm=True, syscall=True, svm=False)  # negative control
    assert preboot(cfg).cfg.kernel_args == cfg.kernel_args


def test_svm_host_mode_needs_svm(monkeypatch, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, host_mode="svm")
    fake_facts(monkeypatch, lm=True, syscall=True, svm=False)
    with pytest.raises(ConfigError, match="has no SVM"):
        preboot(cfg)
    fake_facts(monkeypatch, lm=True, syscall=True, svm=True)  # negative control
    assert preboot(cfg).skip == ""


def test_vmx_host_mode_needs_vmx(monkeypatch, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, host_mode="vmx")
    fake_facts(monkeypatch, lm=True, syscall=True, svm=True, vmx=False)
    with pytest.raises(ConfigError, match="has no VMX"):
        preboot(cfg)
    fake_facts(monkeypatch, lm=True, syscall=True, svm=False, vmx=True)  # negative control
    assert preboot(cfg).skip == ""


def test_skip_words_merge_into_one_argument():
    assert with_skips(("fault=hang",), ["rdtscp"]) == ("skip=rdtscp", "fault=hang")
    assert with_skips(("skip=syscall", "a=1"), ["rdtscp"]) == ("skip=rdtscp,syscall", "a=1")
    assert with_skips(("a=1",), []) == ("a=1",)


def test_arch_capabilities_abort_names_the_fix():
    err = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x2000000ef\nqemu: kvm.c:2990: Assertion failed"
    assert "--cpu Icelake-Server,-arch-capabilities" in explain(err, "Icelake-Server")
    assert explain(err, "Icelake-Server,-arch-capabilities") == ""  # already applied: no advice to repeat
    assert explain("qemu-system-x86_64: something else", "max") == ""


# -- against QEMU ----------------------------------------------------------------------------
@pytest.mark.tcg
@pytest.mark.parametrize("cpu", ["qemu32", "486", "base"])
def test_model_without_long_mode_is_one_skip_row_and_exit_0(tmp_path, artifacts, cpu):
    status, rep = quiet_run(tmp_path, cpu=cpu)
    assert status == 0
    assert [(c["id"], c["status"], c["reason"]) for c in rep["checks"]] == [("run.integrity", "skip", NO_LONG_MODE)]
    assert rep["runs"] == []  # nothing booted


@pytest.mark.tcg
def test_model_without_syscall_skips_those_checks_with_the_reason(tmp_path, artifacts):
    status, rep = quiet_run(tmp_path, cpu="qemu32,+lm")
    by_id = {c["id"]: c for c in rep["checks"]}
    assert status == 0, [c for c in rep["checks"] if c["status"] in ("fail", "error")]
    assert "skip=syscall" in " ".join(rep["runs"][0]["command"])
    for cid in ("host.cpl-enter.cpl3.sysret", "host.cpl-return.from1.syscall", "host.cpl-return.from3.syscall"):
        assert by_id[cid]["status"] == "skip" and "SYSCALL" in by_id[cid]["reason"], by_id[cid]
    assert by_id["run.integrity"]["status"] == "pass"


@pytest.mark.tcg
def test_negative_control_with_syscall_the_checks_run(tmp_path, artifacts):
    status, rep = quiet_run(tmp_path, cpu="qemu32,+lm,+syscall")
    assert status == 0
    assert "skip=syscall" not in " ".join(rep["runs"][0]["command"])
    assert {c["id"]: c["status"] for c in rep["checks"]}["host.cpl-return.from1.syscall"] == "pass"


@pytest.mark.tcg
def test_svm_host_mode_on_a_cpu_without_svm_is_exit_2_before_boot(tmp_path, artifacts):
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.run", "--accel", "tcg", "--cpu", "Skylake-Client",
                           "--host-mode", "svm", "--witness", "serial"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --host-mode svm: tcg/microvm/Skylake-Client has no SVM"), proc.stderr
    with pytest.raises(ConfigError):  # the same decision through the library
        quiet_run(tmp_path, cpu="Skylake-Client", host_mode="svm")
    status, _ = quiet_run(tmp_path, cpu="qemu64,+svm", host_mode="svm")  # negative control: SVM present
    assert status == 0


@pytest.mark.tcg
def test_msr_0x10a_abort_at_boot_names_the_fix(tmp_path, artifacts, qemu, kvm):
    """QEMU's own words (a wrapper prints them before the real QEMU runs a triple fault)."""
    wrapper = tmp_path / "qemu"
    wrapper.write_text("#!/bin/sh\necho 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x2000000ef' >&2\n"
                       f'exec {qemu} "$@"\n')
    wrapper.chmod(0o755)
    cfg = make_config("tcg", artifacts, qemu=str(wrapper), kvm=kvm, cpu="Icelake-Server",
                      kernel_args=("fault=triple",), timeout_s=5)
    out = run_one(cfg, tmp_path / "run", kvm)
    assert out.boot.exit == "crash"
    assert "--cpu Icelake-Server,-arch-capabilities" in out.boot.exit_detail
    env = dict(os.environ, LAB_QEMU=str(wrapper))  # before the boot (the CPU query) too: exit 2
    wrapper.write_text("#!/bin/sh\ncase \"$*\" in *-S*) echo 'qemu-system-x86_64: error: failed to set MSR 0x10a "
                       f"to 0x1' >&2; exit 1;; esac\nexec {qemu} \"$@\"\n")
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.run", "--accel", "tcg", "--cpu", "Icelake-Server",
                           "--witness", "serial"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "-arch-capabilities" in proc.stderr and "Traceback" not in proc.stderr
