"""The differential view (lab/differential.py): a verdict that differs between engines is a
disagreement, accounted for only by a named deviation; values and counts are not verdicts."""

from __future__ import annotations

import pytest
from rich.console import Console

from lab import differential

TCG, KVM, BOCHS = "tcg/microvm/qemu64,+svm", "kvm/microvm/qemu64", "bochs/i440fx/corei7_skylake_x"
BOCHS_AMD = "bochs/i440fx/trinity_apu"


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


def every_engine() -> dict:
    """What `--accel every` disagrees on under kvm_pvm and QEMU 7.2's TCG: four engines."""
    dev = {KVM: {"host.cpl-return.from3.syscall": ("3", "0", "kvm_pvm-syscall-cpl3"),
                 "host.rdtsc.tsd1.cpl3": ("ok", "#GP(0)", "kvm_pvm-rdtsc-tsd-cpl3"),
                 "host.cr4-reserved.umip.cpl0": ("ok", "#GP(0)", "kvm_pvm-umip-offered")},
           TCG: {f"host.rdpmc.counter0.pce{p}.cpl{c}": ("#UD", "#GP(0)", "tcg-rdpmc-unimplemented")
                 for p, c in (("0", "0"), ("1", "0"), ("1", "3"))}}
    checks = []
    for cid in [*dev[KVM], *dev[TCG]]:
        for cfg in (TCG, KVM, BOCHS, BOCHS_AMD):
            if cid in dev.get(cfg, {}):
                obs, want, name = dev[cfg][cid]
                checks.append(check(cfg, cid, "xfail", obs, want, f"{name}: what the engine does"))
            elif cfg == TCG and "cr4-reserved" in cid:
                checks.append(check(cfg, cid, "skip", None, "#GP(0)", "not run under TCG"))
            else:
                checks.append(check(cfg, cid, "pass", "ok" if cfg.startswith("bochs") and "rdpmc" in cid else
                                    "#GP(0)" if "rdpmc" in cid or "tsd1" in cid or "cr4" in cid else "0"))
    checks += [check(TCG, "guest-svm.vmexit.cpuid", "pass", "516", ">=1", probe="vmexit"),
               check(BOCHS_AMD, "guest-svm.vmexit.cpuid", "pass", "8196", ">=1", probe="vmexit")]
    rep = {"runs": [{"config": c} for c in (TCG, KVM, BOCHS, BOCHS_AMD)], "checks": checks}
    return differential.build(rep)


@pytest.mark.parametrize("width", (60, 80, 100))
def test_every_engine_view_keeps_every_name_whole(width):
    """--accel every at 100 columns (and 80, 60): check ids, engines, deviation names and values
    each whole on one line, and no line past the width."""
    d = every_engine()
    assert len(d["disagreements"]) == 6 and all(x["accounted"] for x in d["disagreements"])
    console = Console(record=True, width=width)
    differential.render(d, console)
    lines = console.export_text().splitlines()
    names = [x["id"] for x in d["disagreements"]] + list(differential.short_names(d["configs"]).values())
    names += ["kvm_pvm-syscall-cpl3", "kvm_pvm-rdtsc-tsd-cpl3", "kvm_pvm-umip-offered", "tcg-rdpmc-unimplemented",
              "guest-svm.vmexit.cpuid", "8196"]
    assert [n for n in names if not any(n in line for line in lines)] == []
    assert [line for line in lines if len(line) > width] == []


def test_every_engine_view_says_which_engine_deviates_on_the_checks_line():
    """Each engine's verdict is on its own line under the check, the deviation beside the engine."""
    d = every_engine()
    console = Console(record=True, width=100)
    differential.render(d, console)
    lines = [line.strip() for line in console.export_text().splitlines()]
    at = lines.index("host.rdtsc.tsd1.cpl3")
    block = lines[at + 1:at + 5]
    assert [line.split("  ")[0] for line in block] == ["tcg", "kvm", "bochs corei7_skylake_x", "bochs trinity_apu"]
    assert "deviation kvm_pvm-rdtsc-tsd-cpl3: ok (architecture: #GP(0))" in block[1]
    assert block[0].endswith("pass #GP(0)")


def _values(*checks):
    rep = report(*checks)
    for c in rep["checks"]:
        c.setdefault("scope", c["id"].split(".")[0])
    return differential.build(rep)["values"]


def test_value_differences_are_listed_and_explained_although_every_engine_passes():
    (vendor, bit, sig) = _values(
        check(TCG, "host.cpuid-vendor.leaf0", "pass", "AuthenticAMD"),
        check(BOCHS, "host.cpuid-vendor.leaf0", "pass", "GenuineIntel"),
        check(TCG, "host.cpuid-hv-bit", "pass", "1"), check(BOCHS, "host.cpuid-hv-bit", "pass", "0"),
        check(TCG, "host.cpuid-hv-signature", "pass", "TCGTCGTCGTCG"),
        check(BOCHS, "host.cpuid-hv-signature", "pass", "\\xa0\\x0f\\0\\0d\\0\\0\\0\\0\\0\\0\\0"))
    assert vendor["id"] == "host.cpuid-vendor.leaf0" and "vendor" in vendor["sides"][BOCHS]["why"]
    assert "can tell it is virtual" in bit["sides"][TCG]["why"] and "clear" in bit["sides"][BOCHS]["why"]
    assert "QEMU's TCG names itself" in sig["sides"][TCG]["why"]
    # Bochs' Intel model: no hypervisor bit, so the leaf is out of range (SDM Vol. 2A CPUID)
    assert "highest basic leaf's data, as on Intel" in sig["sides"][BOCHS]["why"]


def test_out_of_range_zeros_follow_the_vendor():
    rep = {"runs": [{"config": c} for c in (TCG, BOCHS_AMD)], "checks": [
        check(TCG, "host.cpuid-vendor.leaf0", "pass", "AuthenticAMD"),
        check(BOCHS_AMD, "host.cpuid-vendor.leaf0", "pass", "AuthenticAMD"),
        check(TCG, "host.cpuid-hv-bit", "pass", "1"), check(BOCHS_AMD, "host.cpuid-hv-bit", "pass", "0"),
        check(TCG, "host.cpuid-hv-signature", "pass", "TCGTCGTCGTCG"),
        check(BOCHS_AMD, "host.cpuid-hv-signature", "pass", "\\0" * 12)]}
    for c in rep["checks"]:
        c["scope"] = "host"
    sig = differential.build(rep)["values"][-1]
    assert "zeros, as AMD answers a leaf out of range" in sig["sides"][BOCHS_AMD]["why"]


def test_negative_control_a_value_the_rule_did_not_expect_says_so():
    (bit,) = _values(check(TCG, "host.cpuid-hv-bit", "pass", "1"),
                     check(BOCHS, "host.cpuid-hv-bit", "fail", "1", "0", "expected 0, observed 1"),
                     check(KVM, "host.cpuid-hv-bit", "pass", "0"))
    assert bit["sides"][BOCHS]["why"].startswith("fail: the rule expects 0")


def test_equal_values_are_not_listed():
    assert _values(check(TCG, "host.cpuid-hv-bit", "pass", "1"), check(KVM, "host.cpuid-hv-bit", "pass", "1")) == []


def test_render_shows_the_values_and_why():
    rep = report(check(TCG, "host.cpuid-hv-bit", "pass", "1"), check(BOCHS, "host.cpuid-hv-bit", "pass", "0"))
    for c in rep["checks"]:
        c["scope"] = "host"
    console = Console(record=True, width=100)
    differential.render(differential.build(rep), console)
    text = " ".join(console.export_text().split())
    assert "1 value(s) that differ between engines" in text and "0: the engine leaves CPUID.1:ECX[31] clear" in text


def test_bochs_speaks_its_own_vocabulary_and_qemu_keeps_qom():
    from lab.expectations import Facts, plan

    bochs = Facts(accel="bochs", kvm_module=None, vendor="GenuineIntel", rdtscp=True, svm=False, vmx=True,
                  hypervisor=False)
    tcg = Facts(accel="tcg", kvm_module=None, vendor="GenuineIntel", rdtscp=True, svm=False, hypervisor=True)
    why = {e.skip for e in plan(bochs) if e.scope == "guest-svm"}
    assert why == {"no SVM: this CPU model has none (CPUID 0x80000001 ECX[2]; Bochs' CPUID dump of the model)"}
    assert {e.skip for e in plan(tcg) if e.scope == "guest-svm"} == {
        "no SVM: this CPU model has none (CPUID 0x80000001 ECX[2]; QOM `svm`)"}


def test_a_bochs_run_names_bochs_and_its_version_in_the_header(tmp_path):
    import io

    from lab import bochs, console
    from lab.report import build

    (tmp_path / "bochs.console").write_bytes(b"\x1b[0m   Bochs x86 Emulator 2.7\r\n  Built from SVN\r\n")
    assert bochs.version(tmp_path) == "2.7" and bochs.version(tmp_path / "none") is None
    host = {"qemu": "7.2.0", "kvm_module": "kvm_pvm", "kvm_usable": True, "kvm_reason": "", "bochs": "2.7"}
    rep = build("0.1.0", host, [{"accel": "bochs", "config": BOCHS, "exit": "ok", "exit_detail": "", "wall_s": 1,
                                 "log": "x", "repro": "", "costs": {}}], [], witness="serial")
    buf = io.StringIO()
    console.render(rep, Console(file=buf, width=100))
    first = buf.getvalue().splitlines()[0]
    assert "Bochs 2.7" in first and "QEMU" not in first and "kvm_pvm" not in first
