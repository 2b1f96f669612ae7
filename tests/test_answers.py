"""The answers block (lab/answers.py): read from the checks, so it changes when they do."""

from __future__ import annotations

import dataclasses

from test_console import KVM, TCG, _checks, _report, _run, render, table_part

from lab import answers as ans
from lab.expectations import Facts, plan
from lab.judge import Check, judge_one


def _text(report: dict, config: str) -> str:
    found = {a.config: a for a in ans.answers(report)}[config]
    return "\n".join(text for _, text in found.lines)


def _pvm(e, v):
    """kvm_pvm's deviation as it shows on this project's machines (lab/deviations.py)."""
    return "ok" if e.id.endswith("rdtsc.tsd1.cpl3") else v


def _full(tmp_path, observe=None) -> dict:
    return _report(_checks("tcg", TCG, observe=observe) + _checks("kvm", KVM, observe=observe or _pvm),
                   [_run(TCG, tmp_path / "t.log"), _run(KVM, tmp_path / "k.log")])


def test_tcg_and_kvm_answers_differ_as_their_checks_do(tmp_path):
    rep = _full(tmp_path)
    tcg, kvm = _text(rep, TCG), _text(rep, KVM)
    # TCG: RDTSC faults at CPL3 in host and SVM guest; its signature names QEMU's TCG.
    assert "faults #GP(0) in host, guest (SVM) [pass]" in tcg
    assert "leaf 0x40000000 TCGTCGTCGTCG (QEMU's TCG) [pass]" in tcg
    assert "through SVM (guest kernel at CPL0)" in tcg and "below it QEMU's TCG" in tcg
    # kvm_pvm: the named deviation, its software host, KVM's signature, the vendor this model shows.
    assert "ok, no fault in host, guest (soft) [xfail: kvm_pvm-rdtsc-tsd-cpl3]" in kvm
    assert "KVMKVMKVM\\0\\0\\0 (KVM)" in kvm and "software host (ring compression; guest kernel at CPL1)" in kvm
    assert "host GenuineIntel KVMKVMKVM\\0\\0\\0; guest (soft) GenuineIntel LabRingMinus" in kvm


def test_a_failing_rdtsc_check_is_a_failing_answer(tmp_path):
    """Negative control: RDTSC at CPL3 with TSD=1 reported as `ok` on TCG (no deviation there)."""
    rep = _full(tmp_path, observe=lambda e, v: "ok" if e.id.endswith("rdtsc.tsd1.cpl3") else v)
    tcg = _text(rep, TCG)
    assert "ok, no fault in host, guest (SVM) [FAIL, the rule says #GP(0)]" in tcg
    assert "faults" not in tcg.splitlines()[0]
    lines = {a.config: a.lines for a in ans.answers(rep)}[TCG]
    assert lines[0][0] == "fail"  # the line's status (its colour) is the worst of its checks


def test_values_come_from_the_report_not_from_the_code(tmp_path):
    """A lie (`--variant lie` reports other values): other vendor and signature, and the answer says so."""
    def lie(e, v):
        return {"cpuid-vendor": "CyrixInstead", "cpuid-hv-signature": "Microsoft Hv", "cpuid-hv-bit": "0"}.get(e.probe, v)

    rep = _full(tmp_path, observe=lie)
    tcg = _text(rep, TCG)
    assert "host CyrixInstead Microsoft Hv" in tcg
    assert "cpuid-vendor.leaf0 FAIL, the rule says AuthenticAMD" in tcg
    assert "no sign of it: hypervisor bit 0 [cpuid-hv-bit FAIL, the rule says 1" in tcg
    assert "QEMU's TCG" not in tcg


def test_kvm_off_no_signature_and_a_host_with_no_hypervisor_bit(tmp_path):
    """A KVM model with `kvm=off`: leaf 0x40000000 out of range (zeros on an AMD vendor)."""
    facts = Facts(accel="kvm", kvm_module="kvm_amd", vendor="AuthenticAMD", rdtscp=True, svm=False,
                  expose_kvm=False, hypervisor=False)
    checks = [judge_one(e, facts, e.expected, None, config=KVM) for e in plan(facts)]
    checks.append(Check("run.integrity", "kvm", "host", "run", {}, "complete", "complete", "pass", config=KVM))
    text = _text(_report(checks, [_run(KVM, tmp_path / "k.log")]), KVM)
    assert "no sign of it: hypervisor bit 0 [pass]" in text
    assert "faults #GP(0) in host, guest (soft) [pass]" in text  # kvm_amd enforces TSD: no deviation
    assert "below it" not in text  # nothing named below the host


def test_a_dead_boot_has_no_answers_in_one_line(tmp_path):
    checks = [dataclasses.replace(c, status="error", observed=None, witnesses={}, reason="no observation")
              for c in _checks("tcg", TCG)]
    text = render(_report(checks, [_run(TCG, tmp_path / "t.log", "timeout", "no end")]), 100)
    assert "tcg: no answers, nothing observed (why: below)" in text
    assert "RDTSC at CPL3" not in text


def test_the_answers_and_legend_fit_the_first_15_lines_at_100_columns(tmp_path):
    text = render(_full(tmp_path), 100)
    head = text.splitlines()[:15]
    flat = " ".join(head)
    for needle in ("RDTSC at CPL3", "vendor, signature", "host itself a guest?", "below the guest", "~ xfail"):
        assert flat.count(needle) == (1 if needle == "~ xfail" else 2), needle
    assert table_part(text)[2:4]  # the table follows the legend


def test_witnesses_that_disagree_are_named_as_such(tmp_path):
    """GDB read another value than the serial record: the answer says the witnesses disagree."""
    checks = _checks("tcg", TCG, gdb=lambda e, v: "ok" if e.id == "host.rdtsc.tsd1.cpl3" else v)
    text = _text(_report(checks, [_run(TCG, tmp_path / "t.log")]), TCG)
    assert "[FAIL: witnesses disagree: serial=#GP(0) gdb=ok]" in text
