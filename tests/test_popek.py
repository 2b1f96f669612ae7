"""The Popek-Goldberg table of x86 (lab/catalogue.py PG_INSNS, lab/popek.py): the rules per host,
the family run by the guest under the software host and the SVM host, the view, and its
negative controls (a host that forgets to emulate an instruction UMIP makes trap, a guest report
of a leak that did not happen)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab import catalogue, deviations
from lab.expectations import Facts, plan
from lab.popek import conclusion
from lab.runner import make_config, run_one

pytestmark = pytest.mark.usefixtures("no_leftovers")
NAMES = [n for n, *_ in catalogue.PG_INSNS]
UMIP5 = {"sgdt", "sidt", "sldt", "smsw", "str"}
FAULTS_AT_CPL1 = {"pop", "call", "jmp", "int", "ret"}  # on the software host's tables (the rules' docs)


def facts(umip: bool, **kw) -> Facts:
    return Facts(accel="tcg", kvm_module=None, vendor="AuthenticAMD", rdtscp=True, svm=True, hypervisor=False,
                 features=(("umip", umip),), **kw)


def pg_plan(f: Facts) -> dict[str, object]:
    return {e.id: e for e in plan(f) if e.probe.startswith("pg-")}


def test_the_catalogue_holds_the_papers_instructions_once_each():
    # Robin & Irvine's two groups, as the issue and the paper list them (18 mnemonics).
    assert NAMES == ["sgdt", "sidt", "sldt", "smsw", "pushf", "popf", "lar", "lsl", "verr", "verw", "pop",
                     "push", "call", "jmp", "int", "ret", "str", "mov"]
    entries = [p for p in catalogue.CATALOGUE if p.family == catalogue.PG_FAMILY]
    assert [p.probe for p in entries] == [f"pg-{n}" for n in NAMES]
    assert all(p.ref.startswith("SDM") and p.scopes == catalogue.GUEST_SCOPES for p in entries)


def test_rules_soft_host_leaks_or_traps_hardware_hosts_same():
    for host in ("soft", "svm"):
        e = pg_plan(facts(True, host_mode=host))
        for n in NAMES:
            for umip in ("0", "1"):
                soft = e[f"guest-soft.pg-{n}.umip{umip}"].expected
                faults = n in FAULTS_AT_CPL1 or (n in UMIP5 and umip == "1")
                assert soft == ("traps" if faults else "leaks"), (n, umip)
                assert e[f"guest-svm.pg-{n}.umip{umip}"].expected == "same"
                assert e[f"guest-vmx.pg-{n}.umip{umip}"].expected == "same"


def test_rules_without_umip_the_umip1_pass_is_a_skip_that_says_why():
    e = pg_plan(facts(False, host_mode="soft"))
    assert all("UMIP is reserved" in (e[f"guest-soft.pg-{n}.umip1"].skip or "") for n in NAMES)
    assert all(e[f"guest-soft.pg-{n}.umip0"].skip is None for n in NAMES)


def test_kvm_pvm_internal_errors_are_named_and_skipped_not_tuned():
    words = deviations.skipped_probes("kvm", "kvm_pvm")
    assert {f"pg-{n}" for n in ("lar", "lsl", "verr", "verw", "call", "jmp", "int")} <= set(words)
    assert not [w for w in deviations.skipped_probes("kvm", "kvm_intel") if w.startswith("pg-")]
    assert not [w for w in deviations.skipped_probes("tcg", None) if w.startswith("pg-")]


def boot(tmp_path, art, qemu, kvm, accel="tcg", **kw):
    return run_one(make_config(accel, art, qemu=qemu, kvm=kvm, **kw), tmp_path / accel, kvm)


def pg(out, scope):
    return {c.id.split(".", 1)[1]: c for c in out.checks if c.scope == scope and c.probe.startswith("pg-")}


@pytest.mark.tcg
def test_software_host_under_tcg_with_umip(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, cpu="max", host_mode="soft")
    c = pg(out, "guest-soft")
    assert len(c) == 2 * len(NAMES)
    assert [(k, x.status, x.expected, x.observed) for k, x in c.items() if x.status != "pass"] == []
    # Item 4: with UMIP the five trap and the guest sees its own tables; 13 leak without it, 8 with.
    assert {k for k, x in c.items() if x.observed == "leaks" and k.endswith("umip0")} == \
        {f"pg-{n}.umip0" for n in NAMES if n not in FAULTS_AT_CPL1}
    assert {k for k, x in c.items() if x.observed == "leaks" and k.endswith("umip1")} == \
        {f"pg-{n}.umip1" for n in NAMES if n not in FAULTS_AT_CPL1 | UMIP5}
    sgdt = c["pg-sgdt.umip1"].details
    assert "seen" not in sgdt and sgdt["own"] and sgdt["events"] == "1"  # seen only where it differs
    assert c["pg-sgdt.umip0"].details["seen"] != c["pg-sgdt.umip0"].details["own"]


@pytest.mark.tcg
def test_svm_guest_sees_its_own_state_for_every_instruction(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, cpu="max", host_mode="svm")
    c = pg(out, "guest-svm")
    assert len(c) == 2 * len(NAMES)
    assert all(x.status == "pass" and x.observed == "same" and "events" not in x.details for x in c.values())


@pytest.mark.tcg
def test_negative_control_host_that_forgets_to_emulate_sgdt_under_umip(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, cpu="max", host_mode="soft",
               kernel_args=("soft-fault=no-emulate-umip",))
    c = pg(out, "guest-soft")
    assert {k for k, x in c.items() if x.status != "pass"} == {"pg-sgdt.umip1"}
    bad = c["pg-sgdt.umip1"]
    assert bad.status == "fail" and bad.expected == "traps" and bad.observed == "wrong"
    assert bad.details["exc"] == "#GP(0)"


@pytest.mark.tcg
@pytest.mark.parametrize("host", ["svm", "soft"])
def test_negative_control_reported_leak_that_did_not_happen(tmp_path, lie_artifacts, qemu, kvm, host):
    out = boot(tmp_path, lie_artifacts, qemu, kvm, host_mode=host)
    c = pg(out, f"guest-{host}")
    lie = c["pg-ret.umip0"]
    assert lie.status == "fail" and lie.observed == "leaks"
    assert all(x.status in ("pass", "skip") for k, x in c.items() if not k.startswith("pg-ret."))


def test_conclusion_reads_the_observed_verdicts():
    def chk(obs, status="pass"):
        return {"observed": obs, "status": status}
    soft = {(n, "0"): chk("traps" if n in FAULTS_AT_CPL1 else "leaks") for n in NAMES}
    soft |= {(n, "1"): chk("traps" if n in FAULTS_AT_CPL1 | UMIP5 else "leaks") for n in NAMES}
    text = conclusion("guest-soft", soft)
    assert "UMIP off: no, 13 leak" in text and "with UMIP: no, 8 leak (PUSHF, POPF, LAR" in text
    same = {(n, u): chk("same") for n in NAMES for u in "01"}
    assert "UMIP off: yes" in conclusion("guest-svm", same) and "with UMIP: yes" in conclusion("guest-svm", same)
    same[("mov", "1")] = {"observed": None, "status": "skip"}
    assert "not run: MOV" in conclusion("guest-svm", same)


@pytest.mark.tcg
def test_invoke_view_prints_the_table(tmp_path, artifacts):
    path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.run", "--accel", "tcg", "--cpu", "max",
                           "--host-mode", "soft", "--view", "popek-goldberg", "--json", str(path)],
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                            "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for n in NAMES:
        row = next(line for line in lines if line.startswith(n.upper() + " "))
        assert ("traps✓" if n in FAULTS_AT_CPL1 else "leaks✓") in row
    assert any("software host (CPL1): virtualizable by trap-and-emulate? UMIP off: no, 13 leak" in line
               for line in lines)
    assert json.loads(path.read_text())["summary"]["fail"] == 0


@pytest.mark.bochs
@pytest.mark.parametrize("host", ["vmx", "soft"])
def test_bochs_vmx_guest_and_software_host_with_umip(tmp_path, artifacts, kvm, host):
    from lab import bochs
    if bochs.missing_reason():
        pytest.skip(f"Bochs missing: {bochs.missing_reason()}")
    # An Intel model with UMIP (CPUID.(07H,0):ECX[2]), so both passes run.
    cfg = make_config("bochs", artifacts, qemu=bochs.bochs_binary(), kvm=kvm, cpu="corei7_icelake_u",
                      host_mode=host)
    out = run_one(cfg, tmp_path / "run", kvm)
    c = pg(out, f"guest-{host}")
    assert len(c) == 2 * len(NAMES)
    assert [(k, x.status, x.expected, x.observed) for k, x in c.items() if x.status != "pass"] == []
    if host == "vmx":
        assert all(x.observed == "same" for x in c.values())
