"""The minimal SVM host (TCG): what the guest sees, the configurable signature, and negative
controls (no CPUID intercept, a wrong expected signature, an exit the host cannot handle)."""

from __future__ import annotations

import dataclasses

import pytest

from lab.judge import judge
from lab.runner import make_config, run_one

pytestmark = [pytest.mark.tcg, pytest.mark.usefixtures("no_leftovers")]


def boot(tmp_path, art, qemu, kvm, **kw):
    cfg = make_config("tcg", art, qemu=qemu, kvm=kvm, **kw)
    return run_one(cfg, tmp_path / "run", kvm)


def checks(outcome):
    return {c.id: c for c in outcome.checks}


def test_guest_sees_cpl0_the_lab_signature_and_its_own_tsd(tmp_path, artifacts, qemu, kvm):
    c = checks(boot(tmp_path, artifacts, qemu, kvm))
    guest = {k: v for k, v in c.items() if v.scope == "guest-svm"}
    # qemu64,+svm has no UMIP: the guest's UMIP rows are skips that say so; the rest pass.
    assert guest and all(v.status == "pass" or (v.status == "skip" and "UMIP" in v.reason)
                         for v in guest.values()), [
        (v.id, v.status, v.reason) for v in guest.values() if v.status != "pass"]
    assert c["guest-svm.cpl-enter.cpl0.vmrun"].observed == "0"
    assert c["guest-svm.cpuid-hv-signature"].observed == "LabRingMinus"
    assert c["host.cpuid-hv-signature"].observed == "TCGTCGTCGTCG"  # same CPU, other view
    assert c["guest-svm.rdtsc.tsd1.cpl3"].observed == "#GP(0)"
    assert int(c["guest-svm.vmexit.cpuid"].observed) >= 1


@pytest.mark.parametrize("sig", ["AbcdEfghIjkl", "KVMKVMKVMxyz"])
def test_signature_is_what_was_asked(tmp_path, artifacts, qemu, kvm, sig):
    c = checks(boot(tmp_path, artifacts, qemu, kvm, hv_signature=sig))
    assert c["guest-svm.cpuid-hv-signature"].observed == sig
    assert c["guest-svm.cpuid-hv-signature"].status == "pass"


def test_negative_control_host_without_cpuid_intercept_fails(tmp_path, artifacts, qemu, kvm):
    c = checks(boot(tmp_path, artifacts, qemu, kvm, kernel_args=("hv-intercept-cpuid=0",)))
    sig = c["guest-svm.cpuid-hv-signature"]
    assert sig.status == "fail" and sig.observed == "TCGTCGTCGTCG"


def test_negative_control_wrong_expected_signature_fails(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm)
    wrong = dataclasses.replace(out.facts, hv_signature="SomethingElse"[:12])
    c = {x.id: x for x in judge(wrong, out.transcript)}
    assert c["guest-svm.cpuid-hv-signature"].status == "fail"


def test_unknown_exit_is_reported_not_hung(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, kernel_args=("hv-fault=unknown-exit",), timeout_s=10)
    assert out.boot.exit == "ok" and out.boot.wall_s < 5
    end = checks(out)["guest-svm.guest-end"]
    assert end.status == "fail" and end.observed == "unknown-exit"
    assert end.details["guest.exit_code"] == "0x46"


def test_rdtsc_intercept_switch_changes_what_the_guest_sees(tmp_path, artifacts, qemu, kvm):
    c = checks(boot(tmp_path, artifacts, qemu, kvm, kernel_args=("hv-intercept-rdtsc=0",)))
    assert c["guest-svm.rdtsc-intercepted.cpl0.intercept0"].observed == "native"
    assert c["guest-svm.rdtsc-intercepted.cpl0.intercept0"].status == "pass"


def test_no_svm_cpu_model_skips_guest_checks_with_reason(tmp_path, artifacts, qemu, kvm):
    # host-mode auto: the software host runs the guest, and the SVM scope says why it does not.
    c = checks(boot(tmp_path, artifacts, qemu, kvm, cpu="qemu64,-svm"))
    guest = [v for v in c.values() if v.scope == "guest-svm"]
    assert guest and all(v.status == "skip" and "SVM" in v.reason for v in guest)
    # Forced onto a CPU without SVM, the SVM host is refused before the boot, with the reason.
    c = checks(boot(tmp_path / "forced", artifacts, qemu, kvm, cpu="qemu64,-svm", host_mode="svm"))
    assert list(c) == ["run.integrity"] and c["run.integrity"].status == "error"
    assert "--host-mode svm" in c["run.integrity"].reason and "no SVM" in c["run.integrity"].reason
