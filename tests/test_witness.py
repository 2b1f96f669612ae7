"""The GDB witness (lab/witness.py): a plan derived from the expectations and the accelerator,
a pure reading of CPU stops, and real boots where it agrees with the serial records and
catches the firmware variants that lie in ways the serial records cannot show."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess

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
    assert set(p.checks) == runs  # every host probe the firmware runs from its table, and the real-mode one
    assert runs - table == {"host.rdtsc.tsd1.cpl0.real"} and not p.unwitnessed
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
    # Hardware breakpoints fit DR0-DR3; the probes' entry no-ops (a hardware KVM only) take
    # software ones, so a plan stops at the instruction exactly where the module allows it.
    assert len([w for w in p.watches if w.hw]) <= HW_BREAKPOINT_SLOTS
    assert all(w.kind == "insn" for w in p.watches if not w.hw)
    assert bool(p.chained) is (module in ("kvm_intel", "kvm_amd"))
    host = {cid for cid in p.checks if cid.startswith("host.")}
    assert set(p.missing) == (set() if p.chained else host)  # the report names the links it lacks
    assert all(w.sys for w in p.watches if w.kind == "trap") is not bool(p.chained)
    ran = {e.id for e in exps if not e.skip and deviant(f, [e]).get(e.id, "run") is not None}
    ran -= set(p.unwitnessed)
    assert set(p.checks) == ran and ran
    # The vectors come from the outcomes the rules (and deviations) expect, nothing else.
    assert set(p.vectors) == {6, 13}


def test_a_plan_short_of_hardware_slots_names_what_it_cannot_see(monkeypatch):
    from dataclasses import replace

    real = capabilities
    # Without stops at the instructions, each fault needs the watch of its vector.
    monkeypatch.setattr("lab.witness.capabilities",
                        lambda a, m: replace(real(a, m), hw_slots=2, no_insn_stops="not here"))
    p, exps, f = kvm_plan("kvm_intel")
    assert len(p.watches) == 2 and len(p.vectors) == 1  # one vector and the end of the host phase
    lost = {cid for cid, why in p.unwitnessed.items() if "no hardware breakpoint left" in why}
    # the faults' vector lost: the rule's fault, or the one a named deviation shows (pmu=off)
    shown = {e.id: deviant(f, exps).get(e.id) or e.expected for e in exps}
    assert lost and all(shown[cid].startswith("#") for cid in lost)
    # With them (a hardware KVM), a fault is seen by the single step whatever watch its vector has.
    monkeypatch.setattr("lab.witness.capabilities", lambda a, m: replace(real(a, m), hw_slots=2))
    p, exps, _ = kvm_plan("kvm_intel")
    assert p.vectors == (6,) and not [cid for cid, why in p.unwitnessed.items() if "hardware breakpoint" in why]


def test_capabilities_follow_the_detected_module():
    assert capabilities("tcg", None).stops_above_cpl0 and capabilities("tcg", None).stops_in_guest
    assert capabilities("kvm", "kvm_intel").stops_above_cpl0
    assert not capabilities("kvm", "kvm_pvm").stops_above_cpl0
    assert not capabilities("kvm", "something_new").stops_above_cpl0  # unknown: the narrowest


# -- the reading: synthetic CPU traces, as each accelerator would produce them ---------------
@pytest.fixture(scope="module")
def image(artifacts):
    return Image.load(artifacts.symbols)


RSP0 = 0x20000  # the synthetic CPU's TSS.RSP0 (16-byte aligned)
IDT_BASE, TSS_BASE, TSS_LIMIT, IOMAP_BASE = 0x5000, 0x6000, 0x88, 0x68
CODE_SEL = {0: 0x8, 1: 0x31, 2: 0x42, 3: 0x2b}
DATA_SEL = {0: 0x10, 1: 0x39, 2: 0x4a, 3: 0x23}


def _idt(image):
    """Exception gates 0-31 as the firmware sets them: present 64-bit interrupt gates to isr_stub_<n>."""
    out = b""
    for v in range(32):
        off = image.symbols.get(f"isr_stub_{v}", 0)
        out += (off & 0xFFFF).to_bytes(2, "little") + (0x8).to_bytes(2, "little") + bytes([0, 0x8E]) \
            + (off >> 16 & 0xFFFF).to_bytes(2, "little") + (off >> 32).to_bytes(4, "little") + bytes(4)
    return out.hex()


def _tss():
    return (bytes(4) + RSP0.to_bytes(8, "little") + bytes(0x68 - 12)).hex()


@pytest.fixture(scope="module")
def decoded(image):
    """Each host stub's instructions as binutils' decoder (the one GDB uses) reads the binary:
    what an honest CPU's live bytes decode to. [[address, length, text], ...] per stub."""
    out = {}
    for name, st in stubs_of(image).items():
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={st.insn:#x}",
                               f"--stop-address={st.done + 2:#x}", str(image.path)],
                              capture_output=True, text=True, check=True).stdout
        lines = [ln.split("\t") for ln in text.splitlines() if re.match(r"^\s+[0-9a-f]+:\t", ln)]
        addrs = [int(ln[0].strip().rstrip(":"), 16) for ln in lines]
        out[name] = [[a, nxt - a, ln[1].strip()] for a, nxt, ln in zip(addrs, addrs[1:] + [st.done + 2], lines)]
    return out


def _realmode_stop(image):
    """The stop at firmware/realmode.S's entry no-op, CR0.PE=0 and CR4.TSD=1, and its RDTSC's step."""
    insn = image.symbols["realmode_rdtsc_copy"]
    ivt = b"".join((0x7100 + 8 * v).to_bytes(2, "little") + bytes(2) for v in range(32))
    pre = {"at": "realmode_pre_copy", "kind": "insn", "stub": "realmode", "bytes": "0f310f20",
           "asm": [[insn, 2, "rdtsc"], [insn + 2, 3, "mov    %cr4,%rax"]], "idt": ivt.hex(),
           "regs": {"cs": 0, "ss": 0, "rip": insn - 2, "rsp": 0x6800, "eflags": 0x46, "cr0": 0x10, "cr4": 0x4,
                    "efer": 0, "rax": 0, "rbx": 0, "rcx": 0, "rdx": 0}}
    pre["after"] = dict(pre["regs"], rip=insn + 2)
    return pre


def cpu_trace(image, exps, outcome_of, chained=None, sys=False):
    """The stops a CPU produces for these checks, by the architecture: for each row the stub
    runs at its CPL under its gate, and the outcome (from `outcome_of(exp)`) decides the trap:
    a fault at probe_insn_<stub>, or the #UD return trap at probe_done_<stub>. Registers and
    the pushed frame are what the CPU would hold (the handler's RSP below TSS.RSP0 or the
    aligned current stack); memory at RIP is the binary's.

    `chained`: the decoded stubs (fixture `decoded`): a session with insn watches (TCG, a
    hardware KVM), so each row starts with the stop at its entry no-op and the single step;
    else only traps, which read IDTR/TR, the gate and the TSS themselves when `sys` (kvm_pvm)."""
    stubs = stubs_of(image)
    rows = {r.id: r for r in catalogue.table_rows()}
    lstar = image.symbols["syscall_entry"]
    idt, tss = _idt(image), _tss()
    stops = []

    def handler(vector, before):
        """Where and with which RSP the CPU enters the handler of `vector` from `before`."""
        base = RSP0 if before["cs"] & 3 else before["rsp"] & ~0xF
        err = vector in x86.EXC_WITH_ERROR_CODE
        return {"cs": 0x8, "ss": 0, "rip": image.symbols[f"isr_stub_{vector}"], "rsp": base - 8 * (5 + err),
                "eflags": 0x2, "cr4": before["cr4"], "efer": 0x501, "rax": before["rax"], "rbx": before["rbx"],
                "rcx": before["rcx"], "rdx": before["rdx"]}

    def trap(vector, frame_rip, before, err=0, via=None, io=None, msr=None):
        regs = handler(vector, before)
        stack = (err.to_bytes(8, "little") if vector in x86.EXC_WITH_ERROR_CODE else b"")
        stack += b"".join(v.to_bytes(8, "little") for v in (frame_rip, before["cs"], before["eflags"], before["rsp"],
                                                           before["ss"]))
        stop = {"at": f"isr_stub_{vector}", "kind": "trap", "vector": vector, "regs": regs, "stack": stack.hex(),
                "at_rip": image.read(frame_rip, 16).hex()}
        if via:
            stop["via"] = via
        if msr:
            stop["msr"] = msr
        if sys and not via:
            stop.update(sys={"cpl": 0, "idt": [IDT_BASE, 0xFFF], "tr": [0x50, TSS_BASE, TSS_LIMIT]},
                        gate=idt[vector * 32:(vector + 1) * 32], tss=tss)
            if io:
                stop["io"] = io
        stops.append(stop)
        return regs

    for e in exps:
        row = rows.get(e.id)
        if e.id == "host.rdtsc.tsd1.cpl0.real" and chained is not None and outcome_of(e) == "ok":
            stops.append(_realmode_stop(image))
        if row is None:
            continue
        stub = stubs[row.entry.stub.name]
        spec = row.entry.stub
        out = outcome_of(e)
        if out is None:
            continue
        cpl = row.cpl
        cr4, rflags, ports, msr = 0x20, 0x2, {}, {}
        for g in row.entry.gates:  # the controls as the CPU holds them
            value = int(row.params[g.param])
            if g.reg == "cr4":
                cr4 |= value << g.bit
            elif g.reg == "iopl":
                rflags |= value << 12
            elif g.reg == "iomap":
                ports[str(g.bit)] = "0000" if value else "ffff"
            elif g.reg == "msr":  # what the CPU's RDMSR at the stop returns (lab/gdb/collector.py)
                msr[f"{g.msr:#x}"] = value << g.bit
        io = {"base": IOMAP_BASE, "limit": TSS_LIMIT, "ports": ports} if ports else None
        rax = (cr4 | int(spec.rax.partition("|")[2] or "0", 0)) if spec.rax.startswith("cr4") else \
            int(spec.rax or "0", 0)
        before = {"cs": CODE_SEL[cpl], "ss": DATA_SEL[cpl], "rip": stub.insn - 2, "rsp": 0x9000 + 0x1000 * cpl,
                  "eflags": rflags, "cr4": cr4, "efer": 0x501, "rax": rax, "rbx": 0, "rcx": int(spec.rcx or "0", 0),
                  "rdx": 0}
        pre = None
        if chained is not None:
            pre = {"at": f"probe_pre_{stub.name}", "kind": "insn", "stub": stub.name, "regs": before,
                   "bytes": image.read(stub.insn, stub.done - stub.insn + 2).hex(), "asm": chained[stub.name],
                   "sys": {"cpl": cpl, "idt": [IDT_BASE, 0xFFF], "tr": [0x50, TSS_BASE, TSS_LIMIT]},
                   "idt": idt, "tss": tss}
            if io:
                pre["io"] = io
            stops.append(pre)
        fault = out.startswith("#")
        if spec.continue_at or stub.insn == stub.done or fault:  # the step delivers an exception
            vec = next(v for v, m in x86.EXC_MNEMONICS.items() if out[1:].split("(")[0] == m) if fault else 6
            if pre is not None:
                pre["after"] = handler(vec, before)
                pre["after_stack"] = ""
            trap(vec, stub.insn, before, via=pre and pre["at"], io=io, msr=msr)
            if spec.continue_at:  # SYSCALL: from the checkpoint on to the LSTAR entry's trap
                reached = int(out)
                at_syscall = dict(before, rcx=stub.done, cs={0: 0x8, 3: 0x2b}[reached])
                trap(6, lstar, dict(at_syscall, cs=at_syscall["cs"]), io=io, msr=msr)
                stops[-1]["regs"]["rcx"] = stub.done
            continue
        after = dict(before, rip=stub.done)
        if spec.asm.strip() == "sti":
            after["eflags"] |= 1 << 9
        if row.entry.kind == "cpuid":
            after.update(_cpuid_regs(row.entry, out))
        if pre is not None:
            pre["after"] = after
            pre["after_stack"] = ""
        trap(6, stub.done, after, io=io, msr=msr)
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
def test_a_hardware_kvm_trace_is_read_whole(image, decoded, module):
    """kvm_intel/kvm_amd follow the architecture: SYSCALL from CPL3 reaches CPL0, RDTSC at
    CPL3 with TSD=1 faults. Replayed through the reader, every planned check is read once,
    with the value the rule expects."""
    p, exps, _ = kvm_plan(module)
    result = _read_whole(image, decoded, p, exps)
    assert result[check_id("host", "cpl-return", {"from_cpl": 3, "via": "syscall"})].value == "0"


def _read_whole(image, decoded, p, exps):
    """The architecture's chained trace of every planned check, read: each with the rule's value."""
    stops = cpu_trace(image, [e for e in exps if e.id in p.checks], lambda e: e.expected, chained=decoded)
    found, stray = read_stops(stops, image, chained=p.chained)
    result = verdicts(p, found, None)
    assert not stray
    by_id = {e.id: e for e in exps}
    for cid in p.checks:
        assert result[cid].value == by_id[cid].expected, (cid, result[cid].value)
        assert result[cid].detail["saw"].startswith("the instruction and "), cid
    return result


def _tcg(exps=None):
    f = facts(rdtscp=True, features=(("umip", True),))
    exps = exps or host_exps(f)
    return witness_plan("tcg", None, exps), exps


def test_a_tcg_trace_is_read_whole_through_the_chain(image, decoded):
    """Every host check that runs under TCG is read from its chain: the stop at the entry no-op,
    GDB's decoding there, the single step and the delivery it ended in."""
    p, exps = _tcg()
    assert p.chained == {r.entry.stub.name for r in catalogue.table_rows() if r.id in p.checks} | {"realmode"}
    _read_whole(image, decoded, p, exps)


def _forge(image, decoded, cid, outcome=None, edit=None):
    """The honest chained trace of one check, edited by `edit(stops)`; its reading's value."""
    p, exps = _tcg()
    exp = next(e for e in exps if e.id == cid)
    stops = cpu_trace(image, [exp], lambda e: outcome or e.expected, chained=decoded)
    if edit:
        edit(stops)
    found, stray = read_stops(stops, image, chained=p.chained)
    return verdicts(p, found, None)[cid].value, stray


def test_another_instruction_that_faults_the_same_way_is_no_rdtsc(image, decoded):
    """lie-insn: RDTSC's stub holds CLI; at CPL3 it raises the #GP(0) RDTSC would. GDB's own
    decoding of the live bytes names it, and the reading is no longer the serial's."""
    st = stubs_of(image)["rdtsc"]

    def swap(stops):
        stops[0]["bytes"] = "fa900f0b"
        stops[0]["asm"] = [[st.insn, 1, "cli"], [st.insn + 1, 1, "nop"], [st.done, 2, "ud2"]]
    value, _ = _forge(image, decoded, "host.rdtsc.tsd1.cpl3", edit=swap)
    assert value.startswith("#GP(0) [GDB:") and "`cli; nop; ud2`" in value and "`rdtsc; ud2`" in value
    assert "live bytes fa900f0b" in value  # and it is not what the build has either


def test_a_software_int_through_the_gp_stub_is_no_fault_of_the_instruction(image, decoded):
    """lie-int: `int $0x4d` whose DPL3 gate leads to a handler that pushes a fake error code, moves
    the frame's RIP back and jumps into the #GP stub: the step ends in no exception handler of
    the IDT, and the instruction is an INT."""
    st = stubs_of(image)["rdtsc"]

    def soft_int(stops):
        pre, trap = stops
        pre["asm"] = [[st.insn, 2, "int    $0x4d"], [st.done, 2, "ud2"]]
        pre["after"] = dict(pre["after"], rip=0x123456)  # the forger's handler, not an exception's
        del trap["via"]  # reached by a jump: a stop of the #GP watch of its own
    value, _ = _forge(image, decoded, "host.rdtsc.tsd1.cpl3", edit=soft_int)
    assert "`int $0x4d; ud2`" in value.replace("    ", " ") or "int    $0x4d" in value
    assert "after the instruction the CPU was at 0x123456" in value


def test_a_hand_built_frame_and_a_probe_entered_past_its_instruction_have_no_chain(image, decoded):
    """lie-frame (a #GP frame made at CPL0 on TSS.RSP0) and lie-past (the stub entered at its return
    trap): the traps look right, but no stop at the instruction came before them."""
    for cid in ("host.rdtsc.tsd1.cpl3", "host.rdtsc.tsd0.cpl2"):
        value, _ = _forge(image, decoded, cid, edit=lambda stops: stops.pop(0))
        assert "no stop at probe_pre_rdtsc before this trap" in value, value


def test_the_delivery_must_be_the_cpus(image, decoded):
    """What an honest delivery implies: the IDT gate the CPU had sends it to the stub, the error
    code is pushed exactly for vectors that have one, the frame holds the instruction's RIP
    and the state the CPU had there."""
    cid = "host.priv-insn.hlt.cpl3"

    def gate_elsewhere(stops):  # IDT gate 13 points at another handler than the stub
        idt = bytearray.fromhex(stops[0]["idt"])
        idt[13 * 16] ^= 0x10
        stops[0]["idt"] = idt.hex()
    assert "IDT gate 13 sends the CPU to" in _forge(image, decoded, cid, edit=gate_elsewhere)[0]

    def no_error_code(stops):  # a frame of 5 words where #GP pushes 6
        trap = stops[1]
        trap["regs"]["rsp"] += 8
        stops[0]["after"]["rsp"] += 8
    assert "with an error code for vector 13" in _forge(image, decoded, cid, edit=no_error_code)[0]

    def other_rip(stops):  # a fault reported at the return trap
        raw = bytearray.fromhex(stops[1]["stack"])
        raw[8:16] = stubs_of(image)["hlt"].done.to_bytes(8, "little")
        stops[1]["stack"] = raw.hex()
    value = _forge(image, decoded, cid, edit=other_rip)[0]
    assert "the frame's RIP is" in value or "no stop at probe_pre_hlt" in value

    def other_cs(stops):  # the frame says CPL3, the CPU ran it at CPL1
        stops[0]["regs"] = dict(stops[0]["regs"], cs=0x31, ss=0x39)
        stops[0]["sys"]["cpl"] = 1
    assert "the frame's CS is 0x2b, the CPU ran the instruction with 0x31" in _forge(image, decoded, cid,
                                                                                    edit=other_cs)[0]

    def interruptible(stops):
        stops[0]["regs"]["eflags"] |= 1 << 9
    assert "IF or TF set" in _forge(image, decoded, cid, edit=interruptible)[0]


def test_the_instructions_inputs_are_the_catalogues(image, decoded):
    """CPUID of another leaf than the catalogue's is another probe, even with its register values."""
    def leaf1(stops):
        stops[0]["regs"]["rax"] = 1
    value, _ = _forge(image, decoded, "host.cpuid-vendor.leaf0", edit=leaf1)
    assert "RAX is 0x1 before the instruction, the catalogue gives 0x0" in value


def test_the_io_gate_is_the_bitmap_the_cpu_reads_through_tr(image, decoded):
    """lie-iomap: the bitmap read through TR.base + the TSS's I/O map base names the row, so a row
    run with another bitmap than the one the firmware set reads as that other row."""
    p, exps = _tcg()
    allowed = next(e for e in exps if e.id == "host.io.in.iopl3.allow1.cpl1")
    stops = cpu_trace(image, [allowed], lambda e: e.expected, chained=decoded)
    stops[0]["io"]["ports"] = {str(catalogue.IO_PORT): "ffff"}  # the CPU's bitmap denies the port
    found, _ = read_stops(stops, image, chained=p.chained)
    assert set(found) == {"host.io.in.iopl3.allow0.cpl1"}
    stops[0]["io"]["ports"] = {str(catalogue.IO_PORT): None}  # past TR.limit: denied (SDM Vol. 1 18.5.2)
    assert set(read_stops(stops, image, chained=p.chained)[0]) == {"host.io.in.iopl3.allow0.cpl1"}


def test_an_instruction_whose_delivery_was_not_seen_still_reads_as_a_disagreement(image, decoded):
    value, _ = _forge(image, decoded, "host.rdtsc.tsd1.cpl3", edit=lambda stops: stops.pop(1))
    assert value.startswith("#GP(0) [GDB:") and "which no watch stops at" in value


def test_the_real_mode_rdtsc_is_read_from_its_step(image):
    """firmware/realmode.S: no IDT, no trap. The stop at its entry no-op must show CR0.PE=0 and
    RDTSC there; the step ends after it (ok) or in the handler its IVT names (the exception)."""
    p, exps = _tcg()
    insn = image.symbols["realmode_rdtsc_copy"]
    pre = _realmode_stop(image)

    def read(stop):
        found, _ = read_stops([stop], image, chained=p.chained)
        return verdicts(p, found, None)["host.rdtsc.tsd1.cpl0.real"].value
    assert read(pre) == "ok"
    assert read({**pre, "after": dict(pre["after"], rip=0x7100 + 8 * 13)}) == "#GP(0)"
    assert "protected mode, not real-address mode" in read({**pre, "regs": dict(pre["regs"], cr0=0x11)})
    assert "the catalogue declares `rdtsc`" in read({**pre, "asm": [[insn, 1, "cli"]]})
    assert read({**pre, "regs": dict(pre["regs"], cr4=0)}) == NEVER  # run with TSD clear: another row


def test_a_kvm_pvm_trace_reads_its_deviations(image):
    p, exps, f = kvm_plan("kvm_pvm")
    dev = deviant(f, exps)
    stops = cpu_trace(image, [e for e in exps if e.id in p.checks], lambda e: dev.get(e.id) or e.expected, sys=True)
    result = verdicts(p, read_stops(stops, image, chained=p.chained)[0], None)
    assert result["host.cpl-return.from3.syscall"].value == "3"
    assert result["host.rdtsc.tsd1.cpl3"].value == "ok"
    assert all(r.value not in (NEVER, UNREACHED) for r in result.values())
    assert not any("[GDB:" in r.value for r in result.values())  # the trap's own evidence holds
    assert all(r.detail["missing"].startswith("kvm_pvm: no stop at the instruction") for cid, r in result.items()
               if cid.startswith("host."))


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
    consult = {r.entry.stub.name for r in catalogue.table_rows() for g in r.entry.gates if g.reg == "iomap"}
    # TCG: at the stop before the instruction, of those stubs only
    p = witness_plan("tcg", None, host_exps(facts()))
    assert consult and {w.stub for w in p.watches if w.io} == consult and not any(w.io for w in p.watches
                                                                                  if w.kind == "trap")
    # kvm_pvm (no stop before the instruction): at the trap, within those stubs
    pvm, _, _ = kvm_plan("kvm_pvm")
    assert all({name for _, name in w.io} == consult for w in pvm.watches if w.kind == "trap")
    without_io = [dataclasses.replace(e, skip="not here") if e.probe == "io" else e for e in host_exps(facts())]
    assert not any(w.io for w in witness_plan("tcg", None, without_io).watches)


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
    assert "[GDB: the CPU executed 0f at" in reading.value and reading.detail["binary"] == "f4"


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


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel", ACCELS)
def test_the_bench_baseline_stops_as_the_plan_says_and_reads_nothing(tmp_path, accel, qemu, kvm, no_leftovers):
    """`invoke bench` splits a stop's cost by a session that stops where the plan says and
    reads nothing (gdb_record=False): the boot runs to its end, every record is a bare stop,
    at least as many as the recording session's, and no check is confirmed by GDB from it."""
    cfg = make_config(accel, build.build("normal"), qemu=qemu, kvm=kvm)
    full = run_one(cfg, tmp_path / "recorded", kvm, "both")
    bare = run_one(cfg, tmp_path / "bare", kvm, "both", gdb_record=False)
    assert bare.boot is not None and bare.boot.exit == "ok"
    stops = [json.loads(line) for line in (bare.run_dir / "gdb.stops.jsonl").read_text().splitlines()]
    assert stops and all(set(s) == {"at", "kind"} and s["kind"] == "stop" for s in stops)
    recorded = json.loads((full.run_dir / "gdb.readings.json").read_text())["stops"]
    assert len(stops) >= recorded > 0
    confirmed = [c.id for c in full.checks if "gdb" in c.witnesses and c.status == "pass"]
    assert confirmed  # control: the recording session confirms checks; the bare one none of them
    assert not [c.id for c in bare.checks if c.id in confirmed and c.status == "pass" and "gdb" in c.witnesses]


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel", ACCELS)
def test_a_recorded_session_reads_the_same_replayed_and_not_once_forged(tmp_path, accel, qemu, kvm, no_leftovers):
    """The reading is a pure function of the recorded stops: a real session's record, replayed,
    gives the session's readings; edited as a forger would need to, it does not."""
    out = boot(tmp_path, accel, "normal", qemu, kvm)
    stops = [json.loads(line) for line in (out.run_dir / "gdb.stops.jsonl").read_text().splitlines()]
    saved = json.loads((out.run_dir / "gdb.readings.json").read_text())
    chained = frozenset(w["stub"] for w in saved["watches"] if w["kind"] == "insn")
    assert bool(chained) is capabilities(accel, kvm.module).insn_stops
    scope = next((c.split(".")[0] for c in saved["checks"] if c.startswith("guest-")), None)
    image, guest = Image.load(out.cfg.symbols), Image.load(out.cfg.guest_symbols)

    def replay(edited):
        found, _ = read_stops(edited, image, guest, scope, chained)
        return {cid: rs[0].value for cid, rs in found.items()}

    expected = {r["check_id"]: r["value"] for r in saved["readings"]}
    assert replay(stops) == expected
    cid = "host.rdtsc.tsd1.cpl2"
    at = next(i for i, s in enumerate(stops) if s.get("kind") == "trap" and s["vector"] == 13
              and int.from_bytes(bytes.fromhex(s["stack"])[16:24], "little") & 3 == 2
              and s.get("at_rip", "").startswith("0f31"))
    forged = [dict(s) for s in stops]
    if chained:  # the trap without the stop before the instruction (a hand-built frame)
        del forged[at - 1]
        assert "no stop at probe_pre_rdtsc" in replay(forged)[cid]
    else:  # kvm_pvm: the trap's own evidence, an IDT gate that sends the CPU elsewhere
        gate = bytearray.fromhex(forged[at]["gate"])
        gate[0] ^= 0x10
        forged[at]["gate"] = gate.hex()
        assert "IDT gate 13 sends the CPU to" in replay(forged)[cid]


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


# What each lie of the CPU's execution forges (firmware/Makefile): the checks only a witness that
# sees the instruction catches, and what GDB then names.
INSN_LIES = {
    "lie-insn": ({f"host.rdtsc.tsd1.cpl{c}" for c in (1, 2, 3)}, "the catalogue declares `rdtsc; ud2`"),
    "lie-int": ({f"host.rdtsc.tsd1.cpl{c}" for c in (1, 2, 3)}, "the catalogue declares `rdtsc; ud2`"),
    "lie-frame": ({"host.rdtsc.tsd1.cpl3"}, "no stop at probe_pre_rdtsc before this trap"),
    "lie-past": ({f"host.rdtsc.tsd0.cpl{c}" for c in range(4)}, "no stop at probe_pre_rdtsc before this trap"),
    "lie-iomap": ({f"host.io.{i}.iopl3.allow1.cpl{c}" for i in ("in", "out") for c in (1, 2, 3)}, "never executed"),
    "lie-guest-cpuid": ({"guest-svm.cpuid-vendor.leaf0", "guest-svm.cpuid-hv-bit", "guest-svm.cpuid-hv-signature"},
                        "0 CPUID #VMEXITs among 0"),
}


@needs_gdb
@pytest.mark.gdb
@pytest.mark.tcg
@pytest.mark.parametrize("variant", sorted(INSN_LIES))
def test_gdb_sees_the_cpu_execute_the_instruction(tmp_path, variant, qemu, kvm, no_leftovers):
    """Each lie passes the serial witness (its records say what the rules expect) and fails both
    witnesses under TCG, where GDB stops the CPU at the instruction, with the broken link named."""
    serial = boot(tmp_path, "tcg", variant, qemu, kvm, witness="serial")
    assert not [(c.id, c.reason) for c in serial.checks if c.status in ("fail", "error")]
    both = boot(tmp_path, "tcg", variant, qemu, kvm, witness="both")
    failed = {c.id: c.reason for c in both.checks if c.status == "fail"}
    targets, why = INSN_LIES[variant]
    assert targets <= set(failed), sorted(targets - set(failed))
    assert all("witnesses disagree" in failed[cid] and why in failed[cid] for cid in targets), \
        [failed[cid] for cid in targets]
    assert not [c.id for c in both.checks if c.status == "error"]
    # the normal build's same checks: GDB saw the instruction and its delivery
    normal = {c.id: c for c in boot(tmp_path, "tcg", "normal", qemu, kvm).checks}
    assert all(normal[cid].status == "pass" and normal[cid].witnesses["gdb"] == normal[cid].witnesses["serial"]
               for cid in targets)
    assert all(normal[cid].details["gdb.saw"] == "the instruction and its delivery" for cid in targets
               if cid.startswith("host."))


@needs_gdb
@pytest.mark.gdb
@pytest.mark.kvm
@pytest.mark.parametrize("variant", sorted(set(INSN_LIES) - {"lie-int"}))  # INT n: kvm_pvm's emulation failure
def test_under_kvm_each_lie_is_caught_or_its_missing_link_named(tmp_path, variant, qemu, kvm, no_leftovers):
    """Under a KVM that stops GDB at the instruction (kvm_intel, kvm_amd) the lies are caught as
    under TCG; under one that does not (kvm_pvm) each targeted check is caught from what the trap
    shows, or its report names the links GDB could not see."""
    both = boot(tmp_path, "kvm", variant, qemu, kvm, witness="both")
    targets, _why = INSN_LIES[variant]
    by_id = {c.id: c for c in both.checks}
    chained = capabilities("kvm", kvm.module).insn_stops
    for cid in targets:
        c = by_id[cid]
        if c.status == "skip":
            continue
        caught = c.status == "fail" and "witnesses disagree" in c.reason
        assert caught or (not chained and c.details.get("gdb.missing", "").startswith(f"{kvm.module}: no stop")), \
            (cid, c.status, c.reason, c.details)


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


def _guest_cpuid_trace(guest_image, leaf, regs_back, exit_code=0x72, exit_rip=None):
    insn, done = guest_image.symbols["guest_cpuid_insn"], guest_image.symbols["guest_cpuid_done"]
    base = {"cs": 0x8, "rip": insn, "rsp": 0x8000, "cr4": 0x20, "efer": 0x1d01, "rax": leaf, "rbx": 0, "rcx": 0,
            "rdx": 0}
    pre = {"at": "guest_cpuid_insn", "kind": "regs", "regs": base}
    exit_ = {"at": "svm_vmexit_return", "kind": "vmexit", "regs": dict(base, rip=0),
             "vmcb": {"exit_code": exit_code, "exit_info1": 0, "cpl": 0, "rip": exit_rip or insn, "rax": leaf}}
    back = {"at": "guest_cpuid_done", "kind": "regs", "regs": dict(base, rip=done, **regs_back)}
    return [pre, exit_, back]


def test_the_guests_cpuid_is_read_from_its_exit_and_the_registers_it_got_back(image, guest_image):
    sig = {"rbx": int.from_bytes(b"LabR", "little"), "rcx": int.from_bytes(b"ingM", "little"),
           "rdx": int.from_bytes(b"inus", "little")}
    found, _ = read_stops(_guest_cpuid_trace(guest_image, 0x40000000, sig), image, guest_image, "guest-svm")
    assert [r.value for r in found["guest-svm.cpuid-hv-signature"]] == ["LabRingMinus"]
    # no #VMEXIT on it (a guest the host never answered), or one elsewhere: a broken chain
    trace = _guest_cpuid_trace(guest_image, 0x40000000, sig)
    del trace[1]
    value = read_stops(trace, image, guest_image, "guest-svm")[0]["guest-svm.cpuid-hv-signature"][0].value
    assert "0 CPUID #VMEXITs among 0" in value
    trace = _guest_cpuid_trace(guest_image, 0x40000000, sig, exit_rip=0x1234)
    value = read_stops(trace, image, guest_image, "guest-svm")[0]["guest-svm.cpuid-hv-signature"][0].value
    assert "the CPUID #VMEXIT was at guest RIP 0x1234" in value
    # under the software host the CPU answers the guest's CPL1 CPUID itself: no exit to see
    trace = _guest_cpuid_trace(guest_image, 0, {"rbx": int.from_bytes(b"Auth", "little"),
                                                "rdx": int.from_bytes(b"enti", "little"),
                                                "rcx": int.from_bytes(b"cAMD", "little")})
    del trace[1]
    found, _ = read_stops(trace, image, guest_image, "guest-soft")
    assert [r.value for r in found["guest-soft.cpuid-vendor.leaf0"]] == ["AuthenticAMD"]
    # registers back with no stop at the CPUID: nothing to read
    assert read_stops(trace[1:], image, guest_image, "guest-soft")[0] == {}


def test_the_guests_cpuid_is_planned_where_gdb_can_stop_in_that_guest():
    tcg = witness_plan("tcg", None, plan(facts(svm=True)))
    assert {"guest-svm.cpuid-vendor.leaf0", "guest-svm.cpuid-hv-bit", "guest-svm.cpuid-hv-signature"} <= set(tcg.checks)
    vmexit = next(w for w in tcg.watches if w.kind == "vmexit")
    assert {w.arm for w in tcg.watches if w.arm} == {vmexit.location, f"-{vmexit.location}"}
    f = facts("kvm", "kvm_pvm")
    pvm = witness_plan("kvm", "kvm_pvm", plan(f), deviant(f, plan(f)))
    assert "guest-soft.cpuid-hv-signature" in pvm.unwitnessed and not any(w.kind == "vmexit" for w in pvm.watches)


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


def test_a_32bit_trap_without_a_privilege_change_has_no_stack_to_compare():
    """SDM Vol. 3A 6.12.1: in 32-bit mode the CPU pushes ESP only on a privilege change. Without
    a stop before the instruction (kvm_pvm) a CPL0 trap leaves nothing to check RSP against; the
    gate is still the CPU's."""
    from lab.witness import _delivery_problems

    gate = (0x1234).to_bytes(2, "little") + (0x8).to_bytes(2, "little") + bytes([0, 0x8E]) + bytes(2)
    frame = {"rip": 0x5000, "cs": 0x8, "rflags": 0x2, "rsp": None, "ss": None, "error_code": 0}
    handler = {"rip": 0x1234, "cs": 0x8, "rsp": 0x9000}
    assert _delivery_problems(6, None, handler, frame, gate.hex(), None, 4, 0x5000) == []
    moved = {**handler, "rip": 0x1240}
    assert "IDT gate 6 sends the CPU to 0x1234" in " ".join(_delivery_problems(6, None, moved, frame, gate.hex(),
                                                                                None, 4, 0x5000))


def test_idtr_or_tr_that_moved_during_the_host_probes_breaks_the_traps_that_relied_on_them(image):
    """Where no stop comes before the instruction (kvm_pvm) the traps take IDTR/TR from the first
    trap's reading; the end of the host's probes reads them again. A change in between (an LIDT
    or LTR while the probes ran) is named in every reading that used them."""
    p, exps, f = kvm_plan("kvm_pvm")
    stops = cpu_trace(image, [e for e in exps if e.id in p.checks], lambda e: e.expected, sys=True)
    stops.append({"at": "hv_main", "kind": "sys-end", "sys": {"cpl": 0, "idt": [IDT_BASE, 0xFFF],
                                                             "tr": [0x50, TSS_BASE, TSS_LIMIT]}})
    same = verdicts(p, read_stops(stops, image, chained=p.chained)[0], None)
    assert not any("[GDB:" in r.value for r in same.values())
    stops[-1]["sys"] = {"cpl": 0, "idt": [IDT_BASE + 0x1000, 0xFFF], "tr": [0x50, TSS_BASE, TSS_LIMIT]}
    moved = verdicts(p, read_stops(stops, image, chained=p.chained)[0], None)
    assert "IDTR/TR changed during the host's probes" in moved["host.rdtsc.tsd1.cpl1"].value
