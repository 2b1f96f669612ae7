"""Every rule row of the expectations, and that they follow the configuration."""

import dataclasses
import itertools

import pytest

from lab.expectations import AT_LEAST_ONCE, Facts, hv_signature, plan, privileged, tsc_read


def facts(**kw):
    base = dict(accel="tcg", kvm_module=None, vendor="AuthenticAMD", rdtscp=False, svm=True, hypervisor=True)
    base.update(kw)
    return Facts(**base)


@pytest.mark.parametrize("insn,tsd,cpl", list(itertools.product(("rdtsc", "rdtscp"), (0, 1), (0, 1, 2, 3))))
def test_tsc_rule_every_row(insn, tsd, cpl):
    # SDM Vol. 2B RDTSC/RDTSCP: #GP(0) iff CR4.TSD=1 and CPL>0 (protected mode).
    want = "#GP(0)" if tsd == 1 and cpl > 0 else "ok"
    assert tsc_read(insn, tsd, cpl, rdtscp_present=True) == want


@pytest.mark.parametrize("tsd,cpl", list(itertools.product((0, 1), (0, 1, 2, 3))))
def test_rdtscp_absent_is_ud_whatever_tsd_and_cpl(tsd, cpl):
    assert tsc_read("rdtscp", tsd, cpl, rdtscp_present=False) == "#UD"


def test_real_mode_rdtsc_never_faults():
    assert tsc_read("rdtsc", 1, 0, protected=False) == "ok"
    assert tsc_read("rdtsc", 1, 3, protected=False) == "ok"


@pytest.mark.parametrize("insn,cpl", list(itertools.product(("hlt", "cli", "mov-cr4"), (0, 1, 2, 3))))
def test_privileged_instructions(insn, cpl):
    assert privileged(insn, cpl) == ("ok" if cpl == 0 else "#GP(0)")


def test_hv_signature_follows_accelerator_and_cpu_properties():
    assert hv_signature(facts(accel="tcg")) == "TCGTCGTCGTCG"
    assert hv_signature(facts(accel="tcg", tcg_cpuid=False)) == "\0" * 12
    assert hv_signature(facts(accel="kvm", kvm_module="kvm_pvm")) == "KVMKVMKVM\0\0\0"
    assert hv_signature(facts(accel="kvm", kvm_module="kvm_amd", expose_kvm=False)) == "\0" * 12


def by_id(f):
    return {e.id: e for e in plan(f)}


def test_changing_the_cpu_changes_the_expectations():
    amd = by_id(facts(vendor="AuthenticAMD", rdtscp=False))
    intel = by_id(facts(vendor="GenuineIntel", rdtscp=True))
    assert amd["host.cpuid-vendor.leaf0"].expected == "AuthenticAMD"
    assert intel["host.cpuid-vendor.leaf0"].expected == "GenuineIntel"
    assert amd["host.rdtscp.tsd1.cpl3"].expected == "#UD"
    assert intel["host.rdtscp.tsd1.cpl3"].expected == "#GP(0)"
    assert intel["host.rdtscp.tsd0.cpl3"].expected == "ok"


def test_guest_checks_skip_without_svm_and_say_why():
    p = by_id(facts(accel="kvm", kvm_module="kvm_pvm", svm=False))
    guest = [e for e in p.values() if e.scope == "guest-svm"]
    assert guest and all(e.skip and "kvm_pvm" in e.skip for e in guest)
    tcg_intel = by_id(facts(svm=False))
    assert all(e.skip for e in tcg_intel.values() if e.scope == "guest-svm")


def test_guest_signature_is_the_configured_one():
    p = by_id(facts(hv_signature="AbcdEfghIjkl"))
    assert p["guest-svm.cpuid-hv-signature"].expected == "AbcdEfghIjkl"
    assert p["guest-svm.cpuid-hv-signature"].skip is None


def test_plan_ids_are_unique_and_every_row_cites_a_rule():
    p = plan(facts())
    assert len({e.id for e in p}) == len(p)
    assert all(e.rule for e in p)


def test_at_least_once():
    e = by_id(facts())["guest-svm.vmexit.cpuid"]
    assert e.expected == AT_LEAST_ONCE
    assert e.matches("3") and not e.matches("0") and not e.matches("x")


# -- issue: CPUID 0x40000000 when the accelerator hides its leaves, and the `base` model -----
TOP = "@\x02\0\0\x88\n\0\0\0\0\0\0"  # some highest basic leaf's EBX, ECX, EDX


@pytest.mark.parametrize("vendor,want", [
    ("GenuineIntel", TOP),  # Intel's rule: the highest basic leaf's data
    ("CentaurHauls", TOP),  # any vendor KVM does not treat as AMD gets Intel's rule
    ("", TOP),  # the `base` model's empty vendor too
    ("AuthenticAMD", "\0" * 12),  # AMD's rule: zeros
    ("HygonGenuine", "\0" * 12),
])
def test_kvm_hidden_signature_follows_kvms_vendor_rule(vendor, want):
    f = facts(accel="kvm", kvm_module="kvm_intel", vendor=vendor, expose_kvm=False)
    assert hv_signature(f, {"cpuid.top": TOP}) == want
    # Shown, KVM's own leaf wins whatever the vendor; TCG answers the range itself.
    assert hv_signature(facts(accel="kvm", kvm_module="kvm_amd", vendor=vendor)) == "KVMKVMKVM\0\0\0"
    assert hv_signature(facts(vendor=vendor, tcg_cpuid=False), {"cpuid.top": TOP}) == "\0" * 12


def test_a_missing_top_leaf_report_cannot_pass():
    f = facts(accel="kvm", kvm_module="kvm_intel", vendor="GenuineIntel", expose_kvm=False)
    assert hv_signature(f, {}) not in (TOP, "\0" * 12)


@pytest.mark.parametrize("vendor,want", [("", "\0" * 12), ("AuthenticAMD", "AuthenticAMD"), ("Lab", "Lab" + "\0" * 9)])
def test_the_vendor_rule_compares_twelve_bytes(vendor, want):
    exp = {e.id: e for e in plan(facts(vendor=vendor))}["host.cpuid-vendor.leaf0"]
    assert exp.expected == want and len(exp.expected) == 12


def test_cpuid_faulting_is_kvms_whatever_the_module():
    # KVM emulates MSR_PLATFORM_INFO[31] / MSR_MISC_FEATURES_ENABLES[0] for every guest; QEMU 7.2
    # TCG implements neither, so the software host's guest sees TCG's own CPUID there.
    assert all(facts(accel="kvm", kvm_module=m).cpuid_faulting for m in ("kvm_intel", "kvm_amd", "kvm_pvm"))
    assert not facts().cpuid_faulting
    soft = {e.id: e for e in plan(facts(host_mode="soft"))}
    assert soft["guest-soft.cpuid-hv-signature"].expected == "TCGTCGTCGTCG"
    assert "guest-soft.trap.cpuid" not in soft
    kvm = {e.id: e for e in plan(facts(accel="kvm", kvm_module="kvm_intel", svm=False))}
    assert kvm["guest-soft.cpuid-hv-signature"].expected == "LabRingMinus"
    assert kvm["guest-soft.trap.cpuid"].expected == AT_LEAST_ONCE


BOOTS = [
    pytest.param("kvm", "qemu64,vendor=GenuineIntel,kvm=off", marks=pytest.mark.kvm),
    pytest.param("kvm", "qemu64,vendor=AuthenticAMD,kvm=off", marks=pytest.mark.kvm),
    pytest.param("tcg", "qemu64,tcg-cpuid=off", marks=pytest.mark.tcg),
    # `base` has no vendor and no long mode: with the features the 64-bit host needs it boots.
    pytest.param("tcg", "base,level=13,xlevel=0x80000008,+lm,+syscall,+pae,+pse,+msr,+tsc,+cx8,+pge,+apic,+nx,"
                 "+fpu,+sse,+sse2,+fxsr,+mmx,+cmov,+de", marks=pytest.mark.tcg),
]


@pytest.mark.parametrize("accel,cpu", BOOTS)
def test_the_cpuid_rules_hold_on_real_boots(tmp_path, accel, cpu, qemu, kvm, no_leftovers):
    from lab import build
    from lab.runner import make_config, preboot, run_one

    cfg = preboot(make_config(accel, build.build(), qemu=qemu, kvm=kvm, cpu=cpu)).cfg
    out = run_one(cfg, tmp_path / "run", kvm, "serial")
    checks = {c.id: c for c in out.checks}
    for cid in ("host.cpuid-vendor.leaf0", "host.cpuid-hv-signature", "run.integrity"):
        assert checks[cid].status == "pass", (cid, checks[cid].expected, checks[cid].observed, checks[cid].reason)
    sig = checks["host.cpuid-hv-signature"].observed
    if "kvm=off" in cpu and "GenuineIntel" in cpu:
        assert sig == out.transcript.info["cpuid.top"] and sig != "\0" * 12
    elif "kvm=off" in cpu or "tcg-cpuid=off" in cpu:
        assert sig == "\0" * 12
    if cpu.startswith("base"):
        assert checks["host.cpuid-vendor.leaf0"].observed == "\0" * 12


def test_a_forced_host_the_cpu_lacks_runs_no_guest_and_says_so():
    f = facts(accel="kvm", kvm_module="kvm_intel", svm=False, host_mode="svm")
    assert f.guest_mode == "none"
    skips = {e.id: e.skip for e in plan(f) if e.scope != "host"}
    assert all(skips.values())
    assert "without SVM: no guest runs" in skips["guest-soft.guest-end"]
    assert "SVM host runs the guest" not in " ".join(skips.values())


# -- the CPU's facts (Facts.seen, cpu-fact) and RDPMC by the manuals ------------------------------
def _qom_qemu64(vendor):
    """QOM's qemu64 as the pre-boot query reports it (under KVM QEMU gives it the host's vendor)."""
    return {"vendor": vendor, "family": 15, "model": 107, "stepping": 1, "level": 13, "tsc": True, "mmx": True,
            "vmx": False, "hypervisor": True, "umip": False, "svm": False, "syscall": True, "rdtscp": False,
            "lm": True, "pmu": False}


def _cpu_info(vendor, **over):
    """The firmware's `info cpuid.*` records (firmware/cpuinfo.c) of such a boot."""
    info = {"cpuid.vendor": vendor, "cpuid.family": "15", "cpuid.model": "107", "cpuid.stepping": "1",
            "cpuid.max": "0xd", "cpuid.tsc": "1", "cpuid.mmx": "1", "cpuid.vmx": "0", "cpuid.hv": "1",
            "cpuid.umip": "0", "cpuid.svm": "0", "cpuid.syscall": "1", "cpuid.rdtscp": "0", "cpuid.lm": "1",
            "cpuid.pmu_version": "0", "cpuid.pmu_counters": "0"}
    info.update(over)
    return info


def _transcript(info):
    """A boot that reported only these `info` records (docs/records.md)."""
    from lab.records import checksum, parse_stream
    bodies = ["hello proto=1 kernel=test variant=normal", "info " + " ".join(f"{k}={v}" for k, v in info.items())]
    bodies.append(f"end count={len(bodies)}")
    out = b""
    for i, b in enumerate(bodies):
        text = f"@@LAB {i} {b}".encode()
        out += text + f" ck={checksum(text):02x}\r\n".encode()
    return parse_stream(out)


def _kvm(vendor, module="kvm_pvm"):
    return Facts.from_qemu("kvm", module, _qom_qemu64(vendor), hv_signature="LabRingMinus", host_mode="auto")


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])  # an AMD host and an Intel host
def test_umip_rows_follow_the_cpu_the_guest_sees_on_either_host(vendor):
    f = _kvm(vendor)
    before = {e.id: e for e in plan(f)}
    assert before["host.sgdt.umip1.cpl3"].skip  # before the boot: the model says no UMIP
    seen = {e.id: e for e in plan(f, _cpu_info(vendor, **{"cpuid.umip": "1"}))}
    assert seen["host.sgdt.umip1.cpl3"].skip is None and seen["host.sgdt.umip1.cpl3"].expected == "#GP(0)"
    assert seen["host.cr4-reserved.umip.cpl0"].expected == "ok"
    assert seen["host.cpu-fact.umip"].expected == "0"  # the configuration's value, compared with the CPU's
    # no skip reason contradicts the CPU: where the CPU shows no UMIP, the rows skip saying so
    none = {e.id: e for e in plan(f, _cpu_info(vendor))}
    assert "as the CPU reported it" in none["host.sgdt.umip1.cpl3"].skip
    assert none["host.cr4-reserved.umip.cpl0"].expected == "#GP(0)"


def test_a_fact_the_accelerator_changes_is_found_by_comparison():
    from lab.judge import judge

    info = _cpu_info("AuthenticAMD", **{"cpuid.umip": "1", "cpuid.tsc": "1"})
    t = _transcript(info)
    pvm = {c.id: c for c in judge(_kvm("AuthenticAMD"), t)}
    c = pvm["host.cpu-fact.umip"]
    assert c.status == "xfail" and c.reason.startswith("kvm_pvm-cpuid-differs") and "umip configured 0, CPU 1" in c.reason
    assert pvm["host.cpu-fact.vendor"].status == "pass"
    assert "judged on the CPU's facts (umip configured 0, CPU 1)" in pvm["host.cr4-reserved.umip.cpl0"].details["cpu-facts"]
    # negative control: a hardware KVM must show what QEMU configured
    hw = {c.id: c for c in judge(_kvm("AuthenticAMD", "kvm_amd"), t)}
    assert hw["host.cpu-fact.umip"].status == "fail"
    assert hw["host.cpu-fact.umip"].reason == "expected 0, observed 1"
    # and a missing CPU record is an error, never a pass
    gone = {c.id: c for c in judge(_kvm("AuthenticAMD"), _transcript({k: v for k, v in info.items()
                                                                           if k != "cpuid.umip"}))}
    assert gone["host.cpu-fact.umip"].status == "error"


def test_cpuid_faulting_is_the_msr_the_cpu_reports():
    """An MSR-enumerated fact: MSR_PLATFORM_INFO 0xCE[31] (Intel SDM Vol. 4 2.17) as the firmware
    read it. The accelerator's offer is the configured value; the rules judge the CPU's."""
    from lab.judge import judge

    f = _kvm("GenuineIntel", "kvm_intel")
    row = "host.cpuid.faulting1.cpl2"
    assert {e.id: e for e in plan(f)}[row].skip is None  # KVM offers it: before the boot the rows run
    off = _cpu_info("GenuineIntel", **{"msr.cpuid_faulting": "0"})
    seen = {e.id: e for e in plan(f, off)}
    assert "the CPU does not offer CPUID faulting" in seen[row].skip  # no skip contradicts the CPU
    assert seen["host.cpu-fact.cpuid_faulting"].expected == "1"
    checks = {c.id: c for c in judge(f, _transcript(off))}
    assert checks["host.cpu-fact.cpuid_faulting"].status == "fail"  # a hardware KVM that hides it: found
    on = {c.id: c for c in judge(f, _transcript(_cpu_info("GenuineIntel", **{"msr.cpuid_faulting": "1"})))}
    assert on["host.cpu-fact.cpuid_faulting"].status == "pass"
    tcg = Facts.from_qemu("tcg", None, _qom_qemu64("AuthenticAMD"), hv_signature="LabRingMinus", host_mode="auto")
    assert {e.id: e for e in plan(tcg, _cpu_info("AuthenticAMD", **{"msr.cpuid_faulting": "0"}))}[
        "host.cpu-fact.cpuid_faulting"].expected == "0"


def _rdpmc(f, cpl=0, pce=1):
    return {e.id: e for e in plan(f)}[f"host.rdpmc.counter0.pce{pce}.cpl{cpl}"].expected


def test_rdpmc_by_the_manuals():
    amd = facts(vendor="AuthenticAMD", family=15)
    assert _rdpmc(amd) == "ok" and _rdpmc(amd, 3, 0) == "#GP(0)"  # PerfCtr0-3 always; CR4.PCE
    i486 = facts(vendor="GenuineIntel", family=4, mmx=False)
    assert _rdpmc(i486) == "#UD" and _rdpmc(i486, 3, 0) == "#UD"  # no RDPMC before P6 / Pentium MMX
    assert _rdpmc(facts(vendor="GenuineIntel", family=5, mmx=True, max_leaf=1)) == "ok"
    assert _rdpmc(facts(vendor="GenuineIntel", family=5, mmx=False, max_leaf=1)) == "#UD"
    assert _rdpmc(facts(vendor="GenuineIntel", family=6, max_leaf=3)) == "ok"  # P6: PMC0-1 (no leaf 0AH)
    arch = dict(vendor="GenuineIntel", family=6, max_leaf=0xd)
    assert _rdpmc(facts(**arch, pmu_version=0, pmu_counters=0)) == "#GP(0)"  # leaf 0AH enumerates none
    assert _rdpmc(facts(**arch, pmu_version=2, pmu_counters=4)) == "ok"
    # the CPU's 0AH, not QEMU's switch: pmu=on under a KVM showing no counter is the rule's #GP(0)
    f = _kvm("GenuineIntel")
    assert _rdpmc(f.seen(_cpu_info("GenuineIntel", **{"cpuid.pmu_version": "0"}))) == "#GP(0)"


def test_hiding_the_counters_is_the_configurations_deviation():
    from lab import deviations
    f = _kvm("AuthenticAMD", "kvm_amd")  # pmu=off
    exp = {e.id: e for e in plan(f)}["host.rdpmc.counter0.pce1.cpl0"]
    assert exp.expected == "ok" and deviations.find(f, exp).name == "qemu-pmu-off-hides-counters"
    on = dataclasses.replace(f, features=tuple(sorted({**dict(f.features), "pmu": True}.items())))
    assert deviations.find(on, {e.id: e for e in plan(on)}["host.rdpmc.counter0.pce1.cpl0"]) is None
