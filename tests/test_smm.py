"""Ring -2 (the `ring-2` scope): SMIs raised from ring 0 on QEMU's pc/q35 and the lab's own SMI
handler (firmware/smm.c), judged by rules derived from the machine, the accelerator and the CPU
model (lab/expectations.py smm_plan). Negative controls: SMIs reported but never raised
(`smm-fault=no-smi`), a handler that does not restore a register (`smm-fault=no-restore`)."""

from __future__ import annotations

import dataclasses

import pytest

from lab import catalogue, deviations
from lab.config import SMM_SMIS
from lab.expectations import Facts, smm_plan, with_smm
from lab.hostinfo import kvm_has_smm
from lab.judge import judge_one
from lab.runner import make_config, preboot, run_one

pytestmark = pytest.mark.usefixtures("no_leftovers")

QEMU64 = Facts("tcg", None, "AuthenticAMD", False, True, True)  # qemu64,+svm under TCG
NEHALEM = dataclasses.replace(QEMU64, vendor="GenuineIntel", family=6, model=26, svm=False)
CONROE = dataclasses.replace(NEHALEM, model=15)
SMI = (f"smm={SMM_SMIS}",)


def ring2(facts, info=None):
    return {e.id: e for e in smm_plan(facts, info)}


# -- the rules, from the configuration --------------------------------------------------------
def test_every_ring2_row_is_planned_once():
    ids = [r.id for r in catalogue.rows(catalogue.SMM_SCOPE)]
    assert len(ids) == len(set(ids)) and set(ring2(QEMU64)) == set(ids)


@pytest.mark.parametrize("facts,why", [
    (with_smm(QEMU64, "microvm", SMI, False), "microvm has no SMRAM"),
    (with_smm(QEMU64, "pc,smm=off", SMI, False), "without SMM"),
    (with_smm(dataclasses.replace(QEMU64, accel="kvm", kvm_module="kvm_pvm"), "q35", SMI, False),
     "kvm_pvm offers no SMM (KVM_CAP_X86_SMM = 0)"),
    (with_smm(QEMU64, "pc", (), False), "no smm=<n>"),
    (with_smm(dataclasses.replace(QEMU64, accel="bochs"), "", SMI, False), "Bochs"),
])
def test_no_smm_skips_the_whole_scope_with_the_reason(facts, why):
    plan = ring2(facts)
    assert all(e.skip and why in e.skip and e.skip_cause == "cpu-model" for e in plan.values())


@pytest.mark.parametrize("facts", [with_smm(QEMU64, "pc", SMI, False), with_smm(QEMU64, "q35", SMI, False),
                                   with_smm(dataclasses.replace(QEMU64, accel="kvm", kvm_module="kvm_amd"), "pc",
                                            SMI, True)])
def test_smm_machines_run_the_scope(facts):
    assert not [e.id for e in ring2(facts, {"smm.smram": "0xa"}).values() if e.skip]


def test_counts_follow_the_smis_asked_for():
    plan = ring2(with_smm(QEMU64, "pc", ("smm=5",), False))
    assert plan["ring-2.smi-count.firmware.port0xb2"].expected == "5"
    assert plan["ring-2.smi-count.firmware.port0xb3"].expected == "0"  # APM_STS raises none
    assert plan["ring-2.smi-entries.lab"].expected == "5"


@pytest.mark.parametrize("facts,expected", [(QEMU64, "#GP(0)"), (NEHALEM, "ok"), (CONROE, "#GP(0)"),
                                            (dataclasses.replace(NEHALEM, model=0x55), "ok")])
def test_smi_count_msr_by_vendor_family_and_model(facts, expected):
    assert ring2(with_smm(facts, "pc", SMI, False))["ring-2.smi-count-msr"].expected == expected


def test_locked_smram_and_a_missing_msr_skip_what_they_prevent():
    facts = with_smm(QEMU64, "pc", SMI, False)
    locked = ring2(facts, {"smm.smram": "0x1a"})  # D_LCK (bit 4) set
    assert all("D_LCK" in (e.skip or "") for i, e in locked.items() if ".lab" in i or "smram-hidden" in i)
    assert not locked["ring-2.smi-time.firmware"].skip
    no_msr = ring2(facts, {"smm.smram": "0xa", "smm.msr_smi_count": "0"})
    assert all("MSR_SMI_COUNT" in (e.skip or "") for i, e in no_msr.items() if ".smi-count." in i)
    assert not no_msr["ring-2.smi-count-msr"].skip  # that the MSR faults is itself judged


def test_the_qemu_deviations_apply_only_where_the_rule_says_otherwise():
    amd = with_smm(QEMU64, "pc", SMI, False)
    msr = ring2(amd)["ring-2.smi-count-msr"]
    assert judge_one(msr, amd, "ok", None).status == "xfail"
    assert judge_one(msr, amd, "#GP(0)", None).status == "xpass"  # QEMU followed the rule
    intel = with_smm(NEHALEM, "pc", SMI, False)
    assert deviations.find(intel, ring2(intel)["ring-2.smi-count-msr"]) is None  # the rule says ok
    aseg = ring2(amd)["ring-2.smram-hidden"]
    assert judge_one(aseg, amd, "visible", None).status == "xfail"
    assert judge_one(aseg, amd, "hidden", None).status == "xpass"  # e.g. with -device VGA
    assert judge_one(aseg, amd, "locked", None).status == "fail"


# -- boots ------------------------------------------------------------------------------------
def boot(tmp_path, art, qemu, kvm, machine, *args, name="b"):
    cfg = make_config("tcg", art, qemu=qemu, kvm=kvm, machine=machine, kernel_args=args, with_guest=False,
                      host_mode="none")
    return run_one(cfg, tmp_path / name, kvm)


def scope(out):
    return {c.id: c for c in out.checks if c.scope == catalogue.SMM_SCOPE}


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_tcg_raises_counts_times_smis_and_runs_the_labs_handler(tmp_path, artifacts, qemu, kvm, machine):
    out = boot(tmp_path, artifacts, qemu, kvm, machine)
    c = scope(out)
    bad = {i: (x.status, x.observed, x.reason) for i, x in c.items()
           if x.status != "pass" and not (x.status == "xfail" and i in ("ring-2.smi-count-msr", "ring-2.smram-hidden"))}
    assert not bad
    assert c["ring-2.smi-count.firmware.port0xb2"].observed == str(SMM_SMIS)
    assert c["ring-2.smi-entries.lab"].observed == str(SMM_SMIS)
    assert c["ring-2.smm-alters.lab"].observed == "rbx"  # ring -2 changed ring 0's RBX
    assert out.transcript.info["smm.smbase"] == "0xa0000"
    assert next(x for x in out.checks if x.id == "run.integrity").status == "pass"


def test_smis_reported_but_never_raised_fail(tmp_path, artifacts, qemu, kvm):
    c = scope(boot(tmp_path, artifacts, qemu, kvm, "q35", "smm-fault=no-smi"))
    failed = {i for i, x in c.items() if x.status == "fail"}
    assert {"ring-2.smi-time.firmware", "ring-2.smi-count.firmware.port0xb2", "ring-2.smi-count.lab.port0xb2",
            "ring-2.smi-entries.lab", "ring-2.smm-cs.lab", "ring-2.smm-cr0.lab", "ring-2.smm-saved-rip.lab",
            "ring-2.smm-saved-state.lab", "ring-2.smm-alters.lab"} <= failed
    assert c["ring-2.smi-count.firmware.port0xb3"].status == "pass"


def test_a_handler_that_does_not_restore_a_register_fails(tmp_path, artifacts, qemu, kvm):
    c = scope(boot(tmp_path, artifacts, qemu, kvm, "pc", "smm-fault=no-restore"))
    assert c["ring-2.smi-state.lab"].status == "fail" and c["ring-2.smi-state.lab"].observed == "r12"
    assert c["ring-2.smm-alters.lab"].status == "fail"
    assert c["ring-2.smi-state.firmware"].status == "pass"  # SeaBIOS's handler restores everything


def test_microvm_asks_for_no_smi_and_skips_the_scope(tmp_path, artifacts, qemu, kvm):
    cfg = make_config("tcg", artifacts, qemu=qemu, kvm=kvm)
    assert not any(a.startswith("smm=") for a in preboot(cfg).cfg.kernel_args)
    pc = make_config("tcg", artifacts, qemu=qemu, kvm=kvm, machine="pc")
    assert SMI[0] in preboot(pc).cfg.kernel_args


@pytest.mark.kvm
@pytest.mark.skipif(kvm_has_smm(), reason="this KVM runs SMM")
def test_a_kvm_without_smm_asks_for_no_smi(artifacts, qemu, kvm):
    cfg = make_config("kvm", artifacts, qemu=qemu, kvm=kvm, machine="pc")
    assert not any(a.startswith("smm=") for a in preboot(cfg).cfg.kernel_args)


# -- the GDB witness in SMM (TCG): stops at the lab's handler's RSM in SMRAM --------------------
def smm_stop(n, alter=0, cs=0xA000, cr0=0x10):
    regs = {"cs": cs, "rip": 0x80DD, "cr0": cr0, "rbx": alter, "rcx": n, "ss": 0, "rsp": 0, "eflags": 2,
            "cr4": 0, "efer": 0, "rax": 0, "rdx": 0}
    return {"at": "smm_rsm_rip", "kind": "regs", "regs": regs}


def test_the_witness_plans_a_stop_in_smm_under_tcg_only():
    from lab.witness import SMM_RSM, SMM_RSM_RIP, witness_plan

    exps = smm_plan(with_smm(QEMU64, "pc", SMI, False), {"smm.smram": "0xa"})
    plan = witness_plan("tcg", None, exps)
    assert {w.location for w in plan.watches} >= {SMM_RSM, SMM_RSM_RIP}
    assert {"ring-2.smi-entries.lab", "ring-2.smm-cs.lab", "ring-2.smm-cr0.lab"} <= set(plan.checks)
    kvm = witness_plan("kvm", "kvm_amd", exps)
    assert "TCG only" in kvm.unwitnessed["ring-2.smm-cs.lab"] and SMM_RSM not in {w.location for w in kvm.watches}


def test_the_witness_reads_entries_cs_and_cr0_in_smm(artifacts):
    from lab.elf import Image
    from lab.witness import read_stops

    image = Image.load(artifacts.symbols)
    stops = [smm_stop(1), smm_stop(2), smm_stop(3, alter=1)]
    found, _ = read_stops(stops, image)
    got = {k: v[0].value for k, v in found.items()}
    assert got == {"ring-2.smi-entries.lab": "2", "ring-2.smm-cs.lab": "0xa000", "ring-2.smm-cr0.lab": "0x0"}
    # Negative controls: an entry GDB never saw, and a handler outside SMM (protected mode, other CS).
    found, _ = read_stops([smm_stop(1), smm_stop(3, alter=1)], image)
    assert all("[GDB:" in v[0].value for v in found.values())
    found, _ = read_stops([smm_stop(1, cs=0x8, cr0=0x80000011)], image)
    assert found["ring-2.smm-cs.lab"][0].value == "0x8" and found["ring-2.smm-cr0.lab"][0].value == "0x80000001"
    facts = with_smm(QEMU64, "pc", SMI, False)
    entries = ring2(facts)["ring-2.smi-entries.lab"]
    assert judge_one(entries, facts, "8", "7").status == "fail"  # a kernel that over-reports its entries
