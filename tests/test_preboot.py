"""Decisions taken from QEMU's description of the CPU model (QOM) before any boot: a model
without long mode boots the 32-bit host kernel, SYSCALL/SYSRET follow QOM `syscall`,
`--host-mode svm` needs SVM, and QEMU's MSR 0x10a abort names its fix."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from rich.console import Console

from lab import runner
from lab.cli import RunOptions, run_lab
from lab.config import ConfigError
from lab.qemu import explain
from lab.build import host32_of
from lab.runner import make_config, preboot, run_one, with_skips

pytestmark = pytest.mark.usefixtures("no_leftovers")


def quiet_run(tmp_path, **kw):
    opts = RunOptions(accel="tcg", witness="serial", quiet=True, runs_dir=str(tmp_path / "runs"), **kw)
    return run_lab(opts, Console(file=open(tmp_path / "console.log", "w")))


def fake_facts(monkeypatch, **facts):
    monkeypatch.setattr(runner, "cached_cpu_model_facts", lambda cfg, cache: dict(facts))


# -- the decision, from given facts ----------------------------------------------------------
def test_no_long_mode_boots_the_32_bit_host(monkeypatch, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm)
    fake_facts(monkeypatch, lm=False, syscall=False, svm=False)
    pre = preboot(cfg)
    assert pre.skip == "" and (pre.cfg.kernel, pre.cfg.symbols) == host32_of(artifacts.kernel)
    fake_facts(monkeypatch, lm=True, syscall=True, svm=True)  # negative control
    assert preboot(cfg).cfg.kernel == artifacts.kernel


def test_no_syscall_tells_the_firmware_to_skip_those_probes(monkeypatch, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, kernel_args=("skip=rdtscp", "fault=garbage"))
    fake_facts(monkeypatch, lm=True, syscall=False, svm=False)
    args = preboot(cfg).cfg.kernel_args
    assert {"rdtscp", "syscall"} <= skip_words(args) and "fault=garbage" in args
    fake_facts(monkeypatch, lm=True, syscall=True, svm=False)  # negative control
    assert "syscall" not in skip_words(preboot(cfg).cfg.kernel_args)


def skip_words(args) -> set[str]:
    return {w for a in args if a.startswith("skip=") for w in a[5:].split(",")}


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
def test_model_without_long_mode_runs_on_the_32_bit_host_and_exits_0(tmp_path, artifacts, cpu):
    status, rep = quiet_run(tmp_path, cpu=cpu)
    assert status == 0
    assert [r["firmware"].get("host.bits") for r in rep["runs"]] == ["32"]  # it booted, 32-bit
    statuses = {c["id"]: c["status"] for c in rep["checks"]}
    assert statuses["run.integrity"] == "pass" and "fail" not in statuses.values() and "error" not in statuses.values()


@pytest.mark.tcg
def test_model_without_syscall_skips_those_checks_with_the_reason(tmp_path, artifacts):
    status, rep = quiet_run(tmp_path, cpu="qemu32,+lm")
    by_id = {c["id"]: c for c in rep["checks"]}
    assert status == 0, [c for c in rep["checks"] if c["status"] in ("fail", "error")]
    assert "syscall" in skip_words(rep["runs"][0]["command"][-1].split())
    for cid in ("host.cpl-enter.cpl3.sysret", "host.cpl-return.from1.syscall", "host.cpl-return.from3.syscall"):
        assert by_id[cid]["status"] == "skip" and "SYSCALL" in by_id[cid]["reason"], by_id[cid]
    assert by_id["run.integrity"]["status"] == "pass"


@pytest.mark.tcg
def test_negative_control_with_syscall_the_checks_run(tmp_path, artifacts):
    status, rep = quiet_run(tmp_path, cpu="qemu32,+lm,+syscall")
    assert status == 0
    assert "syscall" not in skip_words(rep["runs"][0]["command"][-1].split())
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


def test_the_models_facts_are_asked_of_qemu_once(monkeypatch, tmp_path, artifacts, qemu, kvm):
    from lab import qemu as qemu_mod

    asked = []
    monkeypatch.setattr(qemu_mod, "cpu_model_facts", lambda cfg: asked.append(cfg.cpu) or {"lm": True, "cpu": cfg.cpu})
    cache = tmp_path / "cache" / "cpu-facts.json"
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, cpu="qemu64")
    assert qemu_mod.cached_cpu_model_facts(cfg, cache) == {"lm": True, "cpu": "qemu64"}
    assert qemu_mod.cached_cpu_model_facts(cfg, cache) == {"lm": True, "cpu": "qemu64"}
    assert asked == ["qemu64"]  # the second answer came from the cache
    other = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, cpu="max")
    assert qemu_mod.cached_cpu_model_facts(other, cache)["cpu"] == "max" and asked == ["qemu64", "max"]
    cache.write_text("{not json")  # a damaged cache is asked again, not trusted
    assert qemu_mod.cached_cpu_model_facts(cfg, cache)["cpu"] == "qemu64" and asked[-1] == "qemu64"


# -- the pre-boot's facts are the boot's --------------------------------------------------------
@pytest.mark.parametrize("accel", [pytest.param("tcg", marks=pytest.mark.tcg), pytest.param("kvm", marks=pytest.mark.kvm)])
def test_a_prebooted_boot_uses_the_facts_qemu_gave_before_it(monkeypatch, tmp_path, artifacts, qemu, kvm, accel):
    """QEMU's QOM answer is asked once, before the boot (and cached for that binary and
    model); the boot reuses it instead of 15 more QMP round trips. The control: what this
    very QEMU answers live at boot is the same."""
    from lab.qemu import Machine

    if accel == "kvm" and not kvm.usable:
        pytest.skip(kvm.reason)
    pre = runner.preboot(runner.make_config(accel, artifacts, qemu=qemu, kvm=kvm))
    live = []
    real = Machine.cpu_facts
    monkeypatch.setattr(Machine, "cpu_facts", lambda self: live.append(real(self)) or live[-1])
    out = runner.run_one(pre.cfg, tmp_path / "pre", kvm, "serial")
    assert not live and out.boot.exit == "ok" and out.boot.cpu_facts == pre.facts
    again = runner.run_one(dataclasses.replace(pre.cfg, cpu_facts=""), tmp_path / "live", kvm, "serial")
    assert len(live) == 1 and live[0] == pre.facts and again.boot.cpu_facts == pre.facts


FAKE_QEMU = """#!/usr/bin/env python3
# A QEMU that opens its QMP socket and dies before it answers (as one refusing -cpu does).
import socket, sys, time
arg = sys.argv[sys.argv.index("-qmp") + 1]
s = socket.socket(socket.AF_UNIX)
s.bind(arg.split("unix:", 1)[1].split(",", 1)[0])
s.listen(1)
time.sleep(0.05)
print("qemu-system-x86_64: Property 'qemu64-x86_64-cpu.nosuchflag' not found", file=sys.stderr)
sys.exit(1)
"""


def test_a_failed_qmp_query_leaves_no_event_loop_open(tmp_path, artifacts, kvm):
    """qemu.qmp's client runs on an event loop; one left open is closed at interpreter exit,
    after its sockets are gone, and prints a traceback after the lab's one-line error (seen
    in CI). Every client the lab makes (lab/qemu.py qmp_client) closes its own."""
    import gc
    import threading
    import warnings

    from lab.qemu import BootError, cpu_model_facts

    fake = tmp_path / "qemu"
    fake.write_text(FAKE_QEMU)
    fake.chmod(0o755)
    cfg = runner.make_config("tcg", artifacts, qemu=str(fake), kvm=kvm)

    errors: list[str] = []

    def query() -> None:  # in a thread of its own, as the pre-boot runs it
        try:
            cpu_model_facts(cfg)
        except BootError as exc:
            errors.append(str(exc))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        thread = threading.Thread(target=query)
        thread.start()
        thread.join()
        gc.collect()  # an event loop left open warns as it goes
    assert errors and "nosuchflag" in errors[0]
    assert not [w for w in caught if "unclosed event loop" in str(w.message)]
