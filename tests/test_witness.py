"""The GDB witness (lab/witness.py): a plan derived from the expectations and the accelerator,
a pure reading of CPU stops, and real boots where it agrees with the serial records and
catches the firmware variants that lie in ways the serial records cannot show."""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import pytest

from lab import build, catalogue, deviations
from lab.elf import Image
from lab.expectations import Facts, plan
from lab.gdb import x86
from lab.gdbmi import HW_BREAKPOINT_SLOTS
from lab.ids import check_id
from lab.judge import judge_one
from lab.runner import make_config, preboot, run_one
from lab.witness import NEVER, UNREACHED, capabilities, read_stops, stubs_of, verdicts, witness_plan

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def facts(accel="tcg", module=None, **kw):
    base = dict(vendor="AuthenticAMD", rdtscp=False, svm=accel == "tcg", hypervisor=True)
    base.update(kw)
    return Facts(accel, module, **base)


def host_exps(f):
    return [e for e in plan(f) if e.scope == "host"]


def deviant(f, exps):
    return {e.id: d.observed for e in exps if (d := deviations.find(f, e)) is not None}


def kvm_plan(module, f=None):
    f = f or facts("kvm", module)
    exps = host_exps(f)
    return witness_plan("kvm", module, exps, deviant(f, exps)), exps, f


# -- the plan: derived, never literal ---------------------------------------------------------
def test_every_table_row_that_runs_is_witnessed_under_tcg():
    f = facts(rdtscp=True, features=(("umip", True),))
    exps = host_exps(f)
    p = witness_plan("tcg", None, exps)
    runs = {e.id for e in exps if not e.skip}
    table = {r.id for r in catalogue.table_rows()} & runs
    assert set(p.checks) == table  # every host probe the firmware runs from its table
    assert set(p.unwitnessed) == runs - table  # the real-mode one
    assert set(p.vectors) == {6, 13} and not any(w.hw for w in p.watches)  # from the outcomes
    # TCG offers no CPUID faulting: its rows do not run, so no stop reads its MSR
    assert not any(w.msr for w in p.watches)


def test_an_msr_gate_is_read_at_the_stops_of_its_stubs_only_where_its_checks_run():
    p, exps, _ = kvm_plan("kvm_intel")
    gated = {(g.msr, r.entry.stub.name) for r in catalogue.table_rows() for g in r.entry.gates if g.reg == "msr"}
    assert gated and all(set(w.msr) == gated for w in p.watches if w.kind == "trap")
    assert {r.id for r in catalogue.table_rows() if r.entry.gate and r.entry.gate.reg == "msr"} <= set(p.checks)
    # a plan whose MSR-gated checks are all skips reads no MSR
    f = facts("kvm", "kvm_intel")
    skipped = [dataclasses.replace(e, skip="not here") if e.probe == "cpuid" else e for e in host_exps(f)]
    assert not any(w.msr for w in witness_plan("kvm", "kvm_intel", skipped).watches)


@pytest.mark.parametrize("module", ["kvm_intel", "kvm_amd", "kvm_pvm", None])
def test_kvm_plans_fit_the_hardware_slots_and_cover_every_check_that_runs(module):
    p, exps, f = kvm_plan(module)
    assert all(w.hw for w in p.watches) and len(p.watches) <= HW_BREAKPOINT_SLOTS
    ran = {e.id for e in exps if not e.skip and deviant(f, [e]).get(e.id, "run") is not None}
    ran -= set(p.unwitnessed)
    assert set(p.checks) == ran and ran
    # The vectors come from the outcomes the rules (and deviations) expect, nothing else.
    assert set(p.vectors) == {6, 13}


def test_a_plan_short_of_hardware_slots_names_what_it_cannot_see(monkeypatch):
    from dataclasses import replace

    real = capabilities
    monkeypatch.setattr("lab.witness.capabilities", lambda a, m: replace(real(a, m), hw_slots=2))
    p, exps, _ = kvm_plan("kvm_intel")
    assert len(p.watches) == 2 and len(p.vectors) == 1  # one vector and the end of the host phase
    lost = {cid for cid, why in p.unwitnessed.items() if "no hardware breakpoint left" in why}
    by_id = {e.id: e for e in exps}
    assert lost and all(by_id[cid].expected.startswith("#") for cid in lost)  # the faults' vector lost


def test_capabilities_follow_the_detected_module():
    assert capabilities("tcg", None).stops_above_cpl0 and capabilities("tcg", None).stops_in_guest
    assert capabilities("kvm", "kvm_intel").stops_above_cpl0
    assert not capabilities("kvm", "kvm_pvm").stops_above_cpl0
    assert not capabilities("kvm", "something_new").stops_above_cpl0  # unknown: the narrowest


# -- the reading: synthetic CPU traces, as each accelerator would produce them ---------------
@pytest.fixture(scope="module")
def image(artifacts):
    return Image.load(artifacts.symbols)


def cpu_trace(image, exps, outcome_of):
    """The stops a CPU produces for these checks, by the architecture: for each row the stub
    runs at its CPL under its gate, and the outcome (from `outcome_of(exp)`) decides the trap:
    a fault at probe_insn_<stub>, or the #UD return trap at probe_done_<stub>. Registers and
    the pushed frame are what the CPU would hold; memory at RIP is the binary's."""
    stubs = stubs_of(image)
    rows = {r.id: r for r in catalogue.table_rows()}
    lstar = image.symbols["syscall_entry"]
    stops = []

    iomap = image.symbols["tss_iomap"]

    def trap(vector, rip, cs, rsp=0x9000, err=0, rflags=0x2, mem=None, msr=None, **regs):
        stack = (err.to_bytes(8, "little") if vector in x86.EXC_WITH_ERROR_CODE else b"")
        stack += b"".join(v.to_bytes(8, "little") for v in (rip, cs, rflags, rsp, cs + 8))
        base = {"cs": 0x8, "rip": 0, "rsp": 0, "cr4": 0x20, "efer": 0x501, "rax": 0, "rbx": 0, "rcx": 0, "rdx": 0}
        base.update(regs)
        stops.append({"at": f"isr_stub_{vector}", "kind": "trap", "vector": vector, "regs": base,
                      "stack": stack.hex(), "at_rip": image.read(rip, 16).hex(), "mem": mem or {}})
        if msr:
            stops[-1]["msr"] = msr

    for e in exps:
        row = rows.get(e.id)
        if row is None:
            continue
        stub = stubs[row.entry.stub.name]
        out = outcome_of(e)
        if out is None:
            continue
        cpl = row.cpl
        cs = {0: 0x8, 1: 0x31, 2: 0x42, 3: 0x2b}[cpl]
        cr4, rflags, mem, msr = 0x20, 0x2, {}, {}
        for g in row.entry.gates:  # the controls as the CPU holds them
            value = int(row.params[g.param])
            if g.reg == "cr4":
                cr4 |= value << g.bit
            elif g.reg == "iopl":
                rflags |= value << 12
            elif g.reg == "iomap":
                mem[str(iomap + g.bit // 8)] = f"{0 if value else 0xff:02x}"
            elif g.reg == "msr":  # what the CPU's RDMSR at the stop returns (lab/gdb/collector.py)
                msr[f"{g.msr:#x}"] = value << g.bit
        emit = functools.partial(trap, rflags=rflags, mem=mem, msr=msr)
        if row.entry.stub.continue_at:  # SYSCALL: the checkpoint, then the LSTAR entry's trap
            emit(6, stub.insn, cs, cr4=cr4)
            reached = int(out)
            emit(6, lstar, {0: 0x8, 3: 0x2b}[reached], cr4=cr4, rcx=stub.done)
        elif out.startswith("#"):
            vec = next(v for v, m in x86.EXC_MNEMONICS.items() if out[1:].split("(")[0] == m)
            emit(vec, stub.insn, cs, cr4=cr4)
        elif row.entry.kind == "return":
            emit(6, stub.done, cs, cr4=cr4)  # the handler runs at CPL0: $cs = 0x8 in `regs`
        elif row.entry.kind == "cpuid":
            regs = _cpuid_regs(row.entry, out)
            emit(6, stub.done, cs, cr4=cr4, **regs)
        else:
            emit(6, stub.done, cs, cr4=cr4)
    return stops


def _cpuid_regs(entry, value):
    leaf, sub, how = entry.cpuid
    kind, spec = how.split(":")
    regs = {}
    if kind == "bytes":
        raw = value.encode("latin-1")
        for i, r in enumerate(spec):
            regs["r" + r + "x"] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
    else:
        regs["r" + spec[0] + "x"] = int(value) << int(spec[1:])
    return regs


@pytest.mark.parametrize("module", ["kvm_intel", "kvm_amd"])
def test_a_hardware_kvm_trace_is_read_whole(image, module):
    """kvm_intel/kvm_amd follow the architecture: SYSCALL from CPL3 reaches CPL0, RDTSC at
    CPL3 with TSD=1 faults. Replayed through the reader, every planned check is read once,
    with the value the rule expects."""
    p, exps, _ = kvm_plan(module)
    stops = cpu_trace(image, [e for e in exps if e.id in p.checks], lambda e: e.expected)
    found, stray = read_stops(stops, image)
    result = verdicts(p, found, None)
    assert not stray
    by_id = {e.id: e for e in exps}
    for cid in p.checks:
        assert result[cid].value == by_id[cid].expected, cid
    assert result[check_id("host", "cpl-return", {"from_cpl": 3, "via": "syscall"})].value == "0"


def test_a_kvm_pvm_trace_reads_its_deviations(image):
    p, exps, f = kvm_plan("kvm_pvm")
    dev = deviant(f, exps)
    stops = cpu_trace(image, [e for e in exps if e.id in p.checks], lambda e: dev.get(e.id) or e.expected)
    result = verdicts(p, read_stops(stops, image)[0], None)
    assert result["host.cpl-return.from3.syscall"].value == "3"
    assert result["host.rdtsc.tsd1.cpl3"].value == "ok"
    assert all(r.value not in (NEVER, UNREACHED) for r in result.values())


def test_a_probe_run_at_another_cpl_is_read_at_that_cpl(image):
    """The CPU's CS names the CPL, not the row: the CPL3 row run at CPL1 reads as a second
    CPL1 execution, and the CPL3 check as never executed."""
    f = facts(rdtscp=True)
    exps = host_exps(f)
    p = witness_plan("tcg", None, exps)
    rdtsc3 = next(e for e in exps if e.id == "host.rdtsc.tsd1.cpl3")
    rdtsc1 = next(e for e in exps if e.id == "host.rdtsc.tsd1.cpl1")
    stops = cpu_trace(image, [rdtsc1, rdtsc1], lambda e: e.expected)
    result = verdicts(p, read_stops(stops, image)[0], None)
    assert result[rdtsc3.id].value == NEVER
    assert "executed 2 times" in result[rdtsc1.id].value
    # The gate is read from CR4 at the stop: the TSD=1 row run with TSD clear reads as tsd0.
    stops = cpu_trace(image, [next(e for e in exps if e.id == "host.rdtsc.tsd0.cpl0")], lambda e: "ok")
    assert "host.rdtsc.tsd0.cpl0" in read_stops(stops, image)[0]


def test_the_io_bitmap_is_read_only_at_the_stops_of_the_stubs_that_consult_it():
    p = witness_plan("tcg", None, host_exps(facts()))
    consult = {r.entry.stub.name for r in catalogue.table_rows() for g in r.entry.gates if g.reg == "iomap"}
    assert consult and all({name for _, _, name in w.mem} == consult for w in p.watches if w.kind == "trap")
    without_io = [dataclasses.replace(e, skip="not here") if e.probe == "io" else e for e in host_exps(facts())]
    assert not any(w.mem for w in witness_plan("tcg", None, without_io).watches)


def test_the_msr_the_cpu_read_names_the_row(image):
    """CPUID faulting's gate is MSR 0x140[0] as the CPU's RDMSR returned it at the stop: the
    row run with faulting off reads as faulting0 whatever the records say, and a stop whose
    RDMSR did not complete names no row."""
    p, exps, _ = kvm_plan("kvm_intel")
    on = next(e for e in exps if e.id == "host.cpuid.faulting1.cpl0")
    stops = cpu_trace(image, [on], lambda e: "ok")
    assert set(read_stops(stops, image)[0]) == {"host.cpuid.faulting1.cpl0"}
    stops[0]["msr"] = {"0x140": 0xFFFFFFFE}  # bit 0 clear: not enabled, whatever else is set
    assert set(read_stops(stops, image)[0]) == {"host.cpuid.faulting0.cpl0"}
    stops[0]["msr"] = {"0x140": None}
    found, stray = read_stops(stops, image)
    assert not found and "no reading of faulting" in stray[0]["why"]
    assert verdicts(p, found, "the CPU did not complete RDMSR")["host.cpuid.faulting1.cpl0"].value == UNREACHED


def test_a_fault_at_other_bytes_than_the_binary_does_not_read_as_the_probe(image):
    exps = [e for e in host_exps(facts()) if e.id == "host.priv-insn.hlt.cpl3"]
    stops = cpu_trace(image, exps, lambda e: e.expected)
    stops[0]["at_rip"] = "0f0b" + stops[0]["at_rip"][4:]  # memory says ud2, the binary hlt
    reading = read_stops(stops, image)[0]["host.priv-insn.hlt.cpl3"][0]
    assert reading.value == "#GP(0)@0f" and reading.detail["binary"] == "f4"


def test_a_syscall_entry_without_its_checkpoint_is_not_a_reading(image):
    exps = [e for e in host_exps(facts()) if e.id == "host.cpl-return.from3.syscall"]
    stops = cpu_trace(image, exps, lambda e: e.expected)[1:]  # the LSTAR trap alone
    found, stray = read_stops(stops, image)
    assert not found and stray


def test_a_broken_session_is_unreached_and_a_whole_one_never():
    p = witness_plan("tcg", None, host_exps(facts()))
    assert {r.value for r in verdicts(p, {}, "GDB died").values()} == {UNREACHED}
    assert {r.value for r in verdicts(p, {}, None).values()} == {NEVER}


def test_judge_calls_a_never_executed_probe_a_disagreement():
    exp = next(e for e in host_exps(facts()) if e.id == "host.rdtsc.tsd0.cpl3")
    both = judge_one(exp, facts(), "ok", NEVER, witness="both")
    assert both.status == "fail" and "witnesses disagree" in both.reason
    gdb = judge_one(exp, facts(), "ok", NEVER, witness="gdb")
    assert gdb.status == "fail" and "GDB's reading" in gdb.reason
    assert judge_one(exp, facts(), "ok", NEVER, witness="serial").status == "pass"
    assert judge_one(exp, facts(), "ok", UNREACHED).status == "error"
    assert judge_one(exp, facts(), "ok", "ok").witnesses == {"serial": "ok", "gdb": "ok"}


def test_gdb_mode_judges_from_gdb_where_it_read():
    exp = next(e for e in host_exps(facts()) if e.id == "host.rdtsc.tsd1.cpl3")
    # A serial record that lies (`ok`) but GDB read the #GP: gdb mode passes, both fails.
    assert judge_one(exp, facts(), "ok", "#GP(0)", witness="gdb").status == "pass"
    assert judge_one(exp, facts(), "ok", "#GP(0)", witness="both").status == "fail"


# -- real boots --------------------------------------------------------------------------------
ACCELS = [pytest.param("tcg", marks=pytest.mark.tcg), pytest.param("kvm", marks=pytest.mark.kvm)]


def boot(tmp_path, accel, variant, qemu, kvm, witness="both"):
    cfg = make_config(accel, build.build(variant), qemu=qemu, kvm=kvm)
    return run_one(cfg, tmp_path / f"{accel}-{variant}-{witness}", kvm, witness)


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel", ACCELS)
def test_gdb_agrees_on_every_witnessed_check(tmp_path, accel, qemu, kvm, no_leftovers):
    out = boot(tmp_path, accel, "normal", qemu, kvm)
    bad = [(c.id, c.status, c.reason) for c in out.checks if c.status in ("fail", "error")]
    assert not bad
    witnessed = {c.id for c in out.checks if "gdb" in c.witnesses}
    # every host probe that ran was read by GDB (CPUID faulting's MSR gate too, under KVM)
    table = {r.id for r in catalogue.table_rows()}
    ran = {c.id for c in out.checks if c.id in table and c.status != "skip"}
    assert ran and witnessed >= ran
    if accel == "tcg":  # and the SVM guest's own traps, read at the guest's IDT
        assert {"guest-svm.cpl-enter.cpl0.vmrun", "guest-svm.rdtsc.tsd1.cpl3", "guest-svm.rdtsc.tsd0.cpl3",
                "guest-svm.cpl-enter.cpl3.iretq", "guest-svm.cpl-return.from3.ud2"} <= witnessed
    assert all(c.witnesses["gdb"] == c.witnesses["serial"] for c in out.checks if "gdb" in c.witnesses)


EFER = 0xC0000080  # an MSR QEMU's gdbstub also shows as a register: the RDMSR's control
# The fault path: no such MSR, so RDMSR raises #GP(0) (SDM Vol. 2B RDMSR) under KVM. QEMU 7.2's
# TCG has no #GP in its RDMSR (it reads an MSR it does not know as 0): there the reading is 0.
NO_MSR = 0x4C414221


def _read_efer_at_every_trap(real):
    def plan(*args, **kw):
        p = real(*args, **kw)
        stubs = [s.name for s in catalogue.stubs()]
        watches = tuple(dataclasses.replace(w, msr=w.msr + tuple((m, n) for n in stubs for m in (EFER, NO_MSR)))
                        if w.kind == "trap"
                        and w.location.startswith("isr_stub") else w for w in p.watches)
        return dataclasses.replace(p, watches=watches)
    return plan


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel", ACCELS)
def test_the_cpus_rdmsr_at_a_stop_reads_the_msr_and_leaves_the_cpu_as_it_was(tmp_path, accel, qemu, kvm,
                                                                              monkeypatch, no_leftovers):
    """The witness reads an MSR gate by having the CPU run `witness_rdmsr` at the stop. Asked
    to read EFER at every probe's trap, it must return what the gdbstub shows as $efer; asked
    for an MSR that does not exist, the RDMSR faults and the reading is None; and the boot must
    go on exactly as without either (every check passes, GDB agrees): the CPU was put back."""
    import lab.witness

    monkeypatch.setattr(lab.witness, "witness_plan", _read_efer_at_every_trap(lab.witness.witness_plan))
    out = boot(tmp_path, accel, "normal", qemu, kvm)
    assert not [(c.id, c.status, c.reason) for c in out.checks if c.status in ("fail", "error")]
    stops = [json.loads(line) for line in (out.run_dir / "gdb.stops.jsonl").read_text().splitlines()]
    read = [s for s in stops if "msr" in s]
    assert len(read) > 20
    assert all(s["msr"][f"{EFER:#x}"] == s["regs"]["efer"] for s in read)
    assert all(s["msr"][f"{NO_MSR:#x}"] == (0 if accel == "tcg" else None) for s in read)


@needs_gdb
@pytest.mark.gdb
@pytest.mark.kvm
def test_an_rdmsr_that_does_not_complete_leaves_its_checks_unread(tmp_path, qemu, kvm, monkeypatch, no_leftovers):
    """Pointed at bytes that are no RDMSR, the collector runs nothing: the MSR-gated checks are
    errors (unreached), never a reading of a gate the CPU did not give."""
    import lab.witness

    monkeypatch.setattr(lab.witness, "WITNESS_RDMSR", "probe_done_cpuid_fault")  # a ud2
    out = boot(tmp_path, "kvm", "normal", qemu, kvm)
    gated = {c.id: c for c in out.checks if c.probe == "cpuid" and c.scope == "host"}
    if all(c.status == "skip" for c in gated.values()):
        pytest.skip("this KVM offers no CPUID faulting")
    assert all(c.status == "error" and "RDMSR" in c.reason for c in gated.values() if c.status != "skip")
    assert not [c.id for c in out.checks if c.status == "fail"]


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("variant", ["lie-context", "lie-skip"])
def test_only_gdb_catches_a_firmware_that_lies_about_what_ran(tmp_path, accel, variant, qemu, kvm, no_leftovers):
    serial = boot(tmp_path, accel, variant, qemu, kvm, witness="serial")
    assert not [c.id for c in serial.checks if c.status in ("fail", "error")]  # the records look right
    both = boot(tmp_path, accel, variant, qemu, kvm, witness="both")
    failed = {c.id: c.reason for c in both.checks if c.status == "fail"}
    assert failed and all("witnesses disagree" in why for why in failed.values())
    assert not [c.id for c in both.checks if c.status == "error"]
    if variant == "lie-context":
        assert {"host.rdtsc.tsd1.cpl3", "host.rdtsc.tsd1.cpl0"} <= set(failed)
        if any(c.id == "host.cpuid.faulting1.cpl0" and c.status != "skip" for c in serial.checks):
            assert "host.cpuid.faulting1.cpl0" in failed  # run with MSR 0x140[0] clear: the CPU's RDMSR says so
    else:
        assert {f"host.rdtsc.tsd0.cpl{c}" for c in range(4)} <= set(failed)


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel,cpu", [pytest.param("tcg", "", marks=pytest.mark.tcg),
                                       pytest.param("tcg", "max", marks=pytest.mark.tcg),  # UMIP runs there
                                       pytest.param("kvm", "", marks=pytest.mark.kvm)])
def test_every_family_has_a_lie_both_witnesses_catch(tmp_path, accel, cpu, qemu, kvm, no_leftovers):
    cfg = preboot(make_config(accel, build.build("lie"), qemu=qemu, kvm=kvm, cpu=cpu)).cfg
    out = run_one(cfg, tmp_path / "lie", kvm, "both")
    failed = {c.id: c.reason for c in out.checks if c.status == "fail"}
    by_id = {c.id: c for c in out.checks}
    caught = 0
    for cid, value in catalogue.LIES.items():
        c = by_id[cid]
        if c.status == "skip" or c.witnesses.get("gdb", c.expected) == value:
            continue  # not run here, or the lie is what this CPU does (kvm_pvm's RDTSC at CPL3)
        assert cid in failed, (cid, c.status, c.reason)
        assert "witnesses disagree" in failed[cid] and f"serial={value}" in failed[cid], (cid, failed[cid])
        caught += 1
    assert caught >= 4


# -- guests: which IDT the CPU used decides whose evidence a stop is ---------------------------
@pytest.fixture(scope="module")
def guest_image(artifacts):
    return Image.load(artifacts.guest_symbols)


def guest_trap(image, at, vector, stub, cs, cr4=0x20, done=False):
    sym = image.symbols[f"probe_{'done' if done else 'insn'}_{stub}"]
    stack = (b"\0" * 8 if vector in x86.EXC_WITH_ERROR_CODE else b"")
    stack += b"".join(v.to_bytes(8, "little") for v in (sym, cs, 0x2, 0x8000, cs + 8))
    regs = {"cs": 0x8, "rip": 0, "rsp": 0, "cr4": cr4, "efer": 0x1d01, "rax": 0, "rbx": 0, "rcx": 0, "rdx": 0}
    return {"at": at, "kind": "trap", "vector": vector, "regs": regs, "stack": stack.hex(),
            "at_rip": image.read(sym, 16).hex()}


def test_a_guest_trap_counts_only_from_the_idt_the_cpu_used(image, guest_image):
    gp = guest_trap(guest_image, "guest_isr_stub_13", 13, "guest_rdtsc", 0x2b, cr4=0x24)
    # Under SVM the CPU delivers the guest's #GP to the guest's own IDT.
    found, _ = read_stops([gp], image, guest_image, "guest-svm")
    assert [r.value for r in found["guest-svm.rdtsc.tsd1.cpl3"]] == ["#GP(0)"]
    # Under the software host the guest's stub is entered by the host's reflection: not evidence.
    assert read_stops([gp], image, guest_image, "guest-soft")[0] == {}
    # ... there the CPU delivers to the host's IDT: the guest's lgdt traps at CPL1.
    lgdt = guest_trap(guest_image, "isr_stub_13", 13, "guest_kernel", 0x31)
    found, _ = read_stops([lgdt], image, guest_image, "guest-soft")
    assert [r.value for r in found["guest-soft.cpl-enter.cpl1.ring-compression"]] == ["1"]
    # The software host's virtual CR4.TSD is not CPU state: its RDTSC rows have no reading.
    ud = guest_trap(guest_image, "isr_stub_6", 6, "guest_rdtsc", 0x2b, done=True)
    assert not any(k.startswith("guest-soft.rdtsc") for k in read_stops([ud], image, guest_image, "guest-soft")[0])


@pytest.mark.parametrize("module,witnessed", [("kvm_intel", True), ("kvm_pvm", False)])
def test_the_software_host_guest_is_planned_where_the_accelerator_allows(module, witnessed):
    f = facts("kvm", module)
    exps = plan(f)
    p = witness_plan("kvm", module, exps, deviant(f, exps))
    cid = "guest-soft.cpl-enter.cpl3.iretq"
    assert (cid in p.checks) is witnessed
    assert (cid in p.unwitnessed) is not witnessed
    # The host's stubs end at hv_main only when no software-host guest needs them.
    assert any(w.kind == "end" for w in p.watches) is not witnessed
    tcg = witness_plan("tcg", None, plan(facts(svm=True)))
    assert "guest-svm.rdtsc.tsd1.cpl3" in tcg.checks and "guest-svm.cpl-enter.cpl0.vmrun" in tcg.checks
