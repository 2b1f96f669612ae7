"""The software (trap-and-emulate) host: the same guest deprivileged at CPL1, under KVM (auto:
no SVM there) and TCG (forced, or a CPU model without SVM). Negative controls: a host that
does not emulate a trapped instruction makes the guest's check fail, and an instruction it
cannot emulate ends the guest with a verdict, never a hang."""

from __future__ import annotations

import pytest

from lab.runner import make_config, run_one

pytestmark = pytest.mark.usefixtures("no_leftovers")


def boot(tmp_path, art, qemu, kvm, accel, **kw):
    cfg = make_config(accel, art, qemu=qemu, kvm=kvm, **kw)
    return run_one(cfg, tmp_path / accel, kvm)


def soft(outcome):
    return {c.id: c for c in outcome.checks if c.scope == "guest-soft"}


def assert_all_judged_ok(checks):
    # A model without UMIP: the guest's UMIP rows are skips that say so (lab/expectations.py).
    # A named deviation that would stop QEMU (kvm_pvm: the pg-* rows it cannot run at CPL1) is a skip too.
    bad = [(c.id, c.status, c.expected, c.observed) for c in checks.values() if c.status not in ("pass", "xfail")
           and not (c.status == "skip" and ("UMIP" in c.reason or c.cause == "deviation"))]
    assert not bad


@pytest.mark.kvm
def test_kvm_runs_the_guest_in_the_software_host(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "kvm")
    c = soft(out)
    assert_all_judged_ok(c)
    assert c["guest-soft.cpl-enter.cpl1.ring-compression"].observed == "1"  # the guest can tell
    assert c["guest-soft.cpuid-hv-signature"].observed == "LabRingMinus"  # CPUID faulting at CPL1
    assert int(c["guest-soft.trap.cpuid"].observed) >= 1
    for x in c.values():
        if x.status == "xfail":
            assert kvm.module in x.reason
    assert all(x.status == "skip" for x in out.checks if x.scope == "guest-svm")


@pytest.mark.tcg
@pytest.mark.parametrize("kw", [dict(host_mode="soft"), dict(cpu="Skylake-Client")], ids=["forced", "no-svm-cpu"])
def test_tcg_software_host(tmp_path, artifacts, qemu, kvm, kw):
    out = boot(tmp_path, artifacts, qemu, kvm, "tcg", **kw)
    c = soft(out)
    assert_all_judged_ok(c)
    assert all(x.status == "pass" for x in c.values() if "UMIP" not in x.reason)
    # No CPUID faulting under TCG: the guest sees the virtual CPU's own signature, and the
    # rule says why.
    sig = c["guest-soft.cpuid-hv-signature"]
    assert sig.observed == "TCGTCGTCGTCG" and "TCG does not" in sig.rule
    assert out.transcript.info.get("soft.cpuid_faulting") == "0"


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)])
def test_negative_control_host_that_does_not_emulate_rdtsc(tmp_path, artifacts, qemu, kvm, accel):
    out = boot(tmp_path, artifacts, qemu, kvm, accel, host_mode="soft",
               kernel_args=("soft-fault=no-emulate-rdtsc",), timeout_s=10)
    assert out.boot.exit == "ok"
    c = soft(out)
    assert c["guest-soft.rdtsc.tsd1.cpl0"].status == "fail"
    assert c["guest-soft.rdtsc.tsd1.cpl0"].observed == "#GP(0)"


@pytest.mark.tcg
@pytest.mark.parametrize("accel", ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)])
def test_unemulated_instruction_ends_the_guest_with_a_verdict(tmp_path, artifacts, qemu, kvm, accel):
    out = boot(tmp_path, artifacts, qemu, kvm, accel, host_mode="soft",
               kernel_args=("soft-fault=unknown-hlt",), timeout_s=10)
    assert out.boot.exit == "ok" and out.boot.wall_s < 5
    end = soft(out)["guest-soft.guest-end"]
    assert end.status == "fail" and end.observed == "unemulated"
