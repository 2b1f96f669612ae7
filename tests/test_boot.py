"""Boot tests: the real kernel under TCG and KVM, judged by the lab. Negative controls boot
a kernel built to lie, and judge a true transcript against wrong expectations."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from lab.judge import judge
from lab.runner import make_config, run_one

pytestmark = pytest.mark.usefixtures("no_leftovers")


def boot(tmp_path, art, qemu, kvm, accel, **kw):
    cfg = make_config(accel, art, qemu=qemu, kvm=kvm, **kw)
    return run_one(cfg, tmp_path / accel, kvm)


def by_id(outcome):
    return {c.id: c for c in outcome.checks}


def bad(outcome):
    return [(c.id, c.status, c.expected, c.observed, c.reason) for c in outcome.checks if c.status in ("fail", "error")]


@pytest.mark.tcg
def test_tcg_every_check_passes(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "tcg")
    assert out.boot.exit == "ok", out.boot.exit_detail
    assert not bad(out)
    checks = by_id(out)
    assert checks["host.rdtsc.tsd1.cpl3"].observed == "#GP(0)"
    assert checks["host.rdtsc.tsd1.cpl0"].observed == "ok"
    assert checks["host.cpl-enter.cpl3.iretq"].observed == "3"
    assert checks["host.cpuid-hv-signature"].observed == "TCGTCGTCGTCG"
    assert b"\n@@LAB 0 hello" in (tmp_path / "tcg" / "serial.log").read_bytes()  # the full console log is kept


@pytest.mark.kvm
def test_kvm_every_check_passes_or_names_its_deviation(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "kvm")
    assert out.boot.exit == "ok", out.boot.exit_detail
    assert not bad(out)
    checks = by_id(out)
    assert checks["host.cpuid-hv-signature"].observed == "KVMKVMKVM\0\0\0"
    assert checks["host.cpuid-vendor.leaf0"].observed == out.boot.cpu_facts["vendor"]
    for c in out.checks:
        if c.status in ("xfail", "skip"):
            assert c.reason, c.id
        if c.status == "xfail":
            assert kvm.module in c.reason  # named after the detected module


@pytest.mark.tcg
@pytest.mark.parametrize("cpu", ["max", "qemu64,vendor=GenuineIntel,+rdtscp,-hypervisor", "Skylake-Client"])
def test_other_cpu_models_change_the_expectations_and_still_pass(tmp_path, artifacts, qemu, kvm, cpu):
    out = boot(tmp_path, artifacts, qemu, kvm, "tcg", cpu=cpu)
    assert not bad(out)
    checks = by_id(out)
    assert checks["host.cpuid-vendor.leaf0"].expected == out.boot.cpu_facts["vendor"]
    want_rdtscp = "#GP(0)" if out.boot.cpu_facts["rdtscp"] else "#UD"
    assert checks["host.rdtscp.tsd1.cpl3"].expected == want_rdtscp


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)])
def test_negative_control_lying_kernel_fails(tmp_path, lie_artifacts, qemu, kvm, accel):
    out = boot(tmp_path, lie_artifacts, qemu, kvm, accel)
    checks = by_id(out)
    assert out.transcript.info.get("variant") == "lie"
    assert checks["host.cpl-enter.cpl3.iretq"].status == "fail"
    assert checks["host.cpuid-vendor.leaf0"].status == "fail"
    if accel == "tcg":
        # The lie turns a real #GP(0) into "ok": the lab must catch it.
        assert checks["host.rdtsc.tsd1.cpl3"].status == "fail"


@pytest.mark.tcg
def test_negative_control_wrong_expectation_fails(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "tcg")
    wrong = dataclasses.replace(out.facts, vendor="GenuineIntel", rdtscp=True)
    checks = {c.id: c for c in judge(wrong, out.transcript)}
    assert checks["host.cpuid-vendor.leaf0"].status == "fail"
    # A wrongly configured feature bit: the comparison with the CPU's CPUID fails (TCG must
    # show what it was told); the RDTSCP rows are judged on the CPU's answer, and say so.
    assert checks["host.cpu-fact.rdtscp"].status == "fail"
    assert checks["host.cpu-fact.rdtscp"].reason == "expected 1, observed 0"
    assert checks["host.rdtscp.tsd1.cpl3"].expected == "#UD"
    assert "rdtscp configured 1, CPU 0" in checks["host.rdtscp.tsd1.cpl3"].details["cpu-facts"]


@pytest.mark.tcg
def test_invoke_lab_run_writes_the_report_contract(tmp_path, artifacts):
    path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.run", "--accel", "all", "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    report = json.loads(path.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert set(report) == {"lab_version", "witness", "host", "runs", "checks", "summary"}
    assert report["witness"] == "both"
    assert report["host"]["qemu"] and "kvm_module" in report["host"]
    for run in report["runs"]:
        assert run["exit"] == "ok" and run["command"][0].endswith("qemu-system-x86_64")
    for c in report["checks"]:
        assert c["status"] in ("pass", "xfail", "skip", "xpass"), c
        assert {"id", "accel", "scope", "probe", "params", "expected", "observed", "witnesses", "status", "reason"} <= set(c)
    assert "reproduce:" in proc.stdout and "log:" in proc.stdout
