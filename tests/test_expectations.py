"""Every rule row of the expectations, and that they follow the configuration."""

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
