"""The differential view (lab/differential.py): a verdict that differs between engines is a
disagreement, accounted for only by a named deviation; values and counts are not verdicts."""

from __future__ import annotations

from rich.console import Console

from lab import differential

TCG, KVM, BOCHS = "tcg/microvm/qemu64,+svm", "kvm/microvm/qemu64", "bochs/i440fx/corei7_skylake_x"


def check(config, cid, status, observed, expected=None, reason="", probe=None):
    return {"id": cid, "config": config, "status": status, "observed": observed,
            "expected": expected if expected is not None else observed, "reason": reason,
            "probe": probe or cid.split(".")[1]}


def report(*checks):
    return {"runs": [{"config": c} for c in (TCG, KVM, BOCHS)], "checks": list(checks)}


def test_agreeing_engines_have_no_disagreement_even_with_other_values():
    d = differential.build(report(check(TCG, "host.cpuid-vendor.leaf0", "pass", "AuthenticAMD"),
                                  check(BOCHS, "host.cpuid-vendor.leaf0", "pass", "GenuineIntel")))
    assert d["disagreements"] == []


def test_a_named_deviation_accounts_for_a_disagreement():
    d = differential.build(report(
        check(TCG, "host.rdtsc.tsd1.cpl3", "pass", "#GP(0)"),
        check(KVM, "host.rdtsc.tsd1.cpl3", "xfail", "ok", "#GP(0)", "kvm_pvm-rdtsc-tsd-cpl3: ..."),
        check(BOCHS, "host.rdtsc.tsd1.cpl3", "pass", "#GP(0)")))
    (one,) = d["disagreements"]
    assert one["accounted"] and one["sides"][KVM]["kind"] == "named deviation"


def test_negative_control_a_failure_is_not_accounted_for():
    d = differential.build(report(check(TCG, "host.rdtsc.tsd1.cpl3", "pass", "#GP(0)"),
                                  check(BOCHS, "host.rdtsc.tsd1.cpl3", "fail", "ok", "#GP(0)", "expected ...")))
    (one,) = d["disagreements"]
    assert not one["accounted"] and one["sides"][BOCHS]["kind"] == "failure"


def test_skips_are_left_out_and_counts_listed():
    d = differential.build(report(
        check(TCG, "guest-svm.vmexit.cpuid", "pass", "258", ">=1"),
        check(KVM, "guest-svm.vmexit.cpuid", "skip", None, ">=1"),
        check(BOCHS, "guest-svm.vmexit.cpuid", "pass", "131074", ">=1")))
    assert d["disagreements"] == []
    assert d["counts"] == [{"id": "guest-svm.vmexit.cpuid", "observed": {TCG: "258", BOCHS: "131074"}}]


def test_render_names_the_deviation():
    d = differential.build(report(
        check(TCG, "host.rdtsc.tsd1.cpl3", "pass", "#GP(0)"),
        check(KVM, "host.rdtsc.tsd1.cpl3", "xfail", "ok", "#GP(0)", "kvm_pvm-rdtsc-tsd-cpl3: ...")))
    console = Console(record=True, width=200)
    differential.render(d, console)
    text = console.export_text()
    assert "1 check(s) where the verdicts differ" in text and "deviation kvm_pvm-rdtsc-tsd-cpl3" in text


def test_no_line_ends_in_spaces():
    d = differential.build(report(
        check(TCG, "host.rdtsc.tsd1.cpl3", "pass", "#GP(0)"),
        check(KVM, "host.rdtsc.tsd1.cpl3", "xfail", "ok", "#GP(0)", "kvm_pvm-rdtsc-tsd-cpl3: ..."),
        check(TCG, "guest-svm.vmexit.cpuid", "pass", "258", ">=1", probe="vmexit"),
        check(BOCHS, "guest-svm.vmexit.cpuid", "pass", "131074", ">=1", probe="vmexit")))
    for width in (80, 100, 200):
        console = Console(record=True, width=width)
        differential.render(d, console)
        text = console.export_text()
        assert "kvm_pvm-rdtsc-tsd-cpl3" in text and "131074" in text
        assert [line for line in text.splitlines() if line != line.rstrip()] == []
