"""The GDB witness (lab/witness.py): its plan, its decoders, and real boots where its
readings must agree with the serial records, disagree with a lying firmware, and say
`unreached` for a breakpoint that never fires."""
from __future__ import annotations

import json
import shutil
import struct
import time
from dataclasses import dataclass

import pytest

from lab import debug
from lab.expectations import Expectation
from lab.gdb import x86
from lab.gdb.lab_gdb import context_of
from lab.gdbmi import HW_BREAKPOINT_SLOTS, TARGET_CLOSED
from lab.ids import check_id
from lab.judge import judge_one
from lab.records import parse_stream
from lab.witness import (
    KVM_UNSAFE_EXC_STOPS,
    UNREACHED,
    BreakpointSchedule,
    GdbWitness,
    Watch,
    WitnessPlan,
    probe_check_id,
    witness_plan,
)

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


# -- ids, plan, decoders ---------------------------------------------------------------------
def test_check_ids_follow_the_record_params():
    assert check_id("host", "cpl-enter", {"cpl": 3, "via": "iretq"}) == "host.cpl-enter.cpl3.iretq"
    assert check_id("host", "cpl-return", {"from_cpl": 3, "via": "ud2"}) == "host.cpl-return.from3.ud2"
    assert check_id("host", "rdtsc", {"tsd": 1, "cpl": 3}) == "host.rdtsc.tsd1.cpl3"
    assert check_id("host", "cpuid-vendor", {"leaf": 0}) == "host.cpuid-vendor.leaf0"
    assert check_id("host", "cpuid-hv-signature", {}) == "host.cpuid-hv-signature"
    assert check_id("guest-svm", "cpl-enter", {"cpl": 0, "via": "vmrun"}) == "guest-svm.cpl-enter.cpl0.vmrun"


def cp(name, param="", cpl=0, tsd=0):
    return {"valid": True, "id": 1, "name": name, "param": param, "cpl": cpl, "tsd": tsd}


def test_current_probe_maps_to_the_records_check_id():
    assert probe_check_id(cp("rdtsc", cpl=3, tsd=1)) == "host.rdtsc.tsd1.cpl3"
    assert probe_check_id(cp("rdtscp", cpl=2)) == "host.rdtscp.tsd0.cpl2"
    assert probe_check_id(cp("priv-insn", "mov-cr4", cpl=1)) == "host.priv-insn.mov-cr4.cpl1"
    assert probe_check_id(cp("cpl-enter", "sysret", cpl=3)) == "host.cpl-enter.cpl3.sysret"
    assert probe_check_id(cp("cpl-return", "syscall", cpl=2)) == "host.cpl-return.from2.syscall"
    assert probe_check_id(cp("cpuid-hv-sig")) == "host.cpuid-hv-signature"
    assert probe_check_id(cp("hv_main")) is None


# -- the KVM plan without QEMU: the firmware's CPL0 points in order, under kvm_pvm -----------
@dataclass(frozen=True)
class Step:
    location: str  # a witness point the firmware passes
    probe: tuple  # current probe (for a guard: the probe about to start)
    reads: tuple = ()  # check ids a stop here reads
    cpl: int = 0  # the CPL this code runs at (kvm_pvm: a hardware breakpoint at CPL>0 = #DB in the guest)
    unsafe: bool = False  # a stop here kills the run (measured)


def kvm_pvm_trace() -> list[Step]:
    """What a KVM boot passes (firmware/kmain.c order, kvm_pvm behaviour, host-mode auto)."""
    t = []
    for c in (3, 1, 2):  # ring trips: #UD at ring_return_ud2
        t.append(Step("exc_dispatch", ("cpl-enter", "iretq", c),
                      (f"host.cpl-enter.cpl{c}.iretq", f"host.cpl-return.from{c}.ud2")))
    t.append(Step("exc_dispatch", ("cpl-enter", "sysret", 3), ("host.cpl-enter.cpl3.sysret",)))
    for c in (1, 2):  # SYSCALL reaches CPL0
        t.append(Step("syscall_entry", ("cpl-return", "syscall", c), (f"host.cpl-return.from{c}.syscall",)))
    # kvm_pvm: SYSCALL from CPL3 runs the LSTAR code at CPL3, which leaves by ud2.
    t.append(Step("syscall_entry", ("cpl-return", "syscall", 3), cpl=3, unsafe=True))
    t.append(Step("exc_dispatch", ("cpl-return", "syscall", 3), ("host.cpl-return.from3.syscall",)))
    for c in (3, 1, 2):
        for insn in ("hlt", "cli", "mov-cr4"):
            key = ("priv-insn", insn, c)
            bad = key in KVM_UNSAFE_EXC_STOPS
            t.append(Step("probe_priv", key))
            t.append(Step("exc_dispatch", key, () if bad else (f"host.priv-insn.{insn}.cpl{c}",), unsafe=bad))
            t.append(Step("exc_dispatch", key, unsafe=bad))  # the ud2 return
    for tsd in (0, 1):
        for c in (1, 2, 3):  # CPL0 has no ring trip and no exception
            cid = f"host.rdtsc.tsd{tsd}.cpl{c}"
            if tsd == 1 and c < 3:  # #GP, then the ud2 return (kvm_pvm: no #GP at CPL3)
                t += [Step("exc_dispatch", ("rdtsc", "", c), (cid,)), Step("exc_dispatch", ("rdtsc", "", c))]
            else:
                t.append(Step("exc_dispatch", ("rdtsc", "", c), (cid,)))
    t.append(Step("cpuid_vendor_done", ("cpuid-vendor", "", 0), ("host.cpuid-vendor.leaf0",)))
    t.append(Step("cpuid_hvbit_done", ("cpuid-hv-bit", "", 0), ("host.cpuid-hv-bit",)))
    t.append(Step("cpuid_hvsig_done", ("cpuid-hv-sig", "", 0), ("host.cpuid-hv-signature",)))
    # hv_main(): the software host's guest traps into exc_dispatch; stops there killed the run.
    t += [Step("exc_dispatch", ("hv_main", "", 0), unsafe=True)] * 4
    return t


def simulate(plan: WitnessPlan, trace: list[Step]) -> tuple[set, int, BreakpointSchedule]:
    """Run the schedule over the trace: (check ids read, stops, schedule)."""
    sched = BreakpointSchedule(plan)
    sched.start()
    read, stops = set(), 0
    for step in trace:
        assert len(sched.armed) <= HW_BREAKPOINT_SLOTS
        if step.location not in sched.armed:
            continue
        assert not step.unsafe, f"armed at an unsafe point: {step}"
        assert step.cpl == 0, f"hardware breakpoint on CPL{step.cpl} code: {step}"
        # kvm_pvm killed runs stopped at exc_dispatch with it as the only breakpoint (docs/gdb.md).
        assert step.location != "exc_dispatch" or len(sched.armed) >= 2, step
        stops += 1
        read |= set(step.reads)
        sched.hit(step.location, read, step.probe if sched.by_loc[step.location].guard else None)
    return read, stops, sched


def test_kvm_plan_never_arms_more_than_four_hardware_breakpoints(monkeypatch):
    plan = witness_plan("kvm", ["host", "guest-svm"])
    assert plan.peak_armed <= HW_BREAKPOINT_SLOTS
    assert not any(w.guest for w in plan.watches)  # no SVM guest under KVM here
    _, _, sched = simulate(plan, kvm_pvm_trace())
    assert sched.peak <= HW_BREAKPOINT_SLOTS
    assert not sched.armed  # everything retired before hv_main's exceptions
    # The schedule refuses a fifth slot ...
    with pytest.raises(AssertionError, match="armed at once"):
        BreakpointSchedule(plan, limit=plan.peak_armed - 1).start()
    # ... and the plan a shape that would need one.
    from lab import witness
    monkeypatch.setattr(witness, "HW_BREAKPOINT_SLOTS", plan.peak_armed - 1)
    with pytest.raises(ValueError, match="hardware breakpoints"):
        witness.witness_plan("kvm", ["host"])


def test_kvm_plan_reads_the_ring_and_rdtsc_checks_and_avoids_the_unsafe_stops():
    plan = witness_plan("kvm", ["host"])
    ids = set(plan.check_ids)
    for c in (1, 2, 3):
        assert {f"host.cpl-enter.cpl{c}.iretq", f"host.cpl-return.from{c}.ud2",
                f"host.rdtsc.tsd0.cpl{c}", f"host.rdtsc.tsd1.cpl{c}", f"host.priv-insn.cli.cpl{c}"} <= ids
    assert {"host.cpl-enter.cpl3.sysret", "host.cpl-return.from1.syscall", "host.cpl-return.from2.syscall",
            "host.cpl-return.from3.syscall", "host.cpuid-vendor.leaf0", "host.cpuid-hv-bit",
            "host.cpuid-hv-signature"} <= ids
    assert "host.priv-insn.hlt.cpl3" not in ids  # a stop for it kills the run under kvm_pvm
    assert len(ids) == len(plan.check_ids) == 27
    read, stops, _ = simulate(plan, kvm_pvm_trace())  # asserts: no unsafe or CPL>0 point armed
    assert ids <= read
    assert stops == 36


def test_the_guard_disarms_around_the_unsafe_probe_and_then_retires():
    plan = witness_plan("kvm", ["host"])
    sched = BreakpointSchedule(plan)
    assert sched.start()[0].location == "probe_priv"  # the guard goes in first
    assert sched.hit("probe_priv", (), ("priv-insn", "hlt", 3)) == (["exc_dispatch"], [])
    assert "exc_dispatch" not in sched.armed
    delete, insert = sched.hit("probe_priv", (), ("priv-insn", "cli", 3))
    assert [w.location for w in insert] == ["exc_dispatch"] and delete == ["probe_priv"]
    # An unreadable probe counts as unsafe.
    sched = BreakpointSchedule(plan)
    sched.start()
    assert sched.hit("probe_priv", (), None) == (["exc_dispatch"], [])
    # Without its guard (or its end point) the watch is not kept.
    sched = BreakpointSchedule(plan)
    sched.start()
    sched.drop("probe_priv")
    assert [w.location for w in sched.unguarded()] == ["exc_dispatch"]


class FakeGdb:
    """Just enough of lab.gdbmi.Gdb to run GdbWitness over a trace: hardware slots as GDB's
    KVM target has them, stops where the firmware passes an armed point."""

    def __init__(self, trace):
        self.trace = list(trace)
        self.bps = {}  # number -> (location, temporary)
        self.next_number = 1
        self.peak = 0
        self.step = None
        self.violations = []

    def connect(self, addr):
        pass

    def breakpoint(self, location, condition=None, temporary=False):
        if len(self.bps) >= HW_BREAKPOINT_SLOTS:
            raise AssertionError(f"a 5th hardware breakpoint: {location}")
        number = str(self.next_number)
        self.next_number += 1
        self.bps[number] = (location.lstrip("*"), temporary)
        self.peak = max(self.peak, len(self.bps))
        return number

    def delete(self, *numbers):
        for n in numbers:
            del self.bps[n]

    def cont(self):
        pass

    def wait_stopped(self, timeout):
        while self.trace:
            self.step = self.trace.pop(0)
            hit = [n for n, (loc, _) in self.bps.items() if loc == self.step.location]
            if hit:
                if self.step.unsafe or self.step.cpl:
                    self.violations.append(self.step)
                temporary = self.bps[hit[0]][1]
                if temporary:
                    del self.bps[hit[0]]
                return {"reason": "breakpoint-hit", "bkptno": hit[0], "disp": "del" if temporary else "keep"}
        return {"reason": TARGET_CLOSED}

    def close(self, timeout=1.0):
        pass

    def mark_unresponsive(self):
        pass


class TraceWitness(GdbWitness):
    """GdbWitness whose readers take the values from the trace step instead of the CPU."""

    def _read_step(self, watch):
        step = self._gdb.step
        for cid in step.reads:
            self._put(cid, "x", {"source": watch.location})
        return step.probe

    _read_exception = _read_syscall_entry = _read_cpuid_vendor = _read_step
    _read_cpuid_hv_bit = _read_cpuid_hv_signature = _read_priv_entry = _read_step


def test_kvm_witness_arms_at_most_four_breakpoints_through_a_whole_boot(tmp_path):
    fake = FakeGdb(kvm_pvm_trace())
    w = TraceWitness(tmp_path, "host.elf64", None, "127.0.0.1:1", "kvm", scopes=("host",))
    w._gdb, w._prepared = fake, True
    w.start()
    readings = {r.check_id: r for r in w.finish(timeout=5)}
    assert w.error is None, w.error
    assert fake.violations == [] and fake.peak <= HW_BREAKPOINT_SLOTS and not fake.bps
    assert all(r.value == "x" for r in readings.values()) and set(w.plan.check_ids) <= set(readings)
    assert w.stops == 36


def test_tcg_plan_covers_the_architectural_checks():
    ids = set(witness_plan("tcg", ["host", "guest-svm"]).check_ids)
    for cid in ("host.cpl-enter.cpl1.iretq", "host.cpl-enter.cpl2.iretq", "host.cpl-enter.cpl3.iretq",
                "host.cpl-return.from3.ud2", "host.rdtsc.tsd1.cpl3", "host.rdtscp.tsd0.cpl2",
                "host.priv-insn.hlt.cpl1", "host.cpuid-vendor.leaf0", "host.cpuid-hv-signature",
                "guest-svm.cpl-enter.cpl0.vmrun"):
        assert cid in ids
    assert len(ids) == len(witness_plan("tcg", ["host", "guest-svm"]).check_ids)  # no duplicates


def test_exception_values_use_the_record_notation():
    assert x86.exception_value(13, 0) == "#GP(0)"
    assert x86.exception_value(13, 0xD2) == "#GP(0xd2)"
    assert x86.exception_value(6) == "#UD"
    assert x86.exception_value(14, 5) == "#PF(0x5)"
    assert x86.exception_value(9) == "#V9"
    assert x86.decode_bits(0x24, x86.CR4_BITS) == ["TSD", "PAE"]


def test_vmcb_decoding():
    raw = bytearray(4096)
    struct.pack_into("<I", raw, 0x00C, 1 << 18 | 1 << 24 | 1 << 27)  # CPUID HLT IOIO_PROT
    struct.pack_into("<I", raw, 0x010, 1)  # VMRUN
    struct.pack_into("<I", raw, 0x058, 1)
    struct.pack_into("<QQQ", raw, 0x070, 0x72, 0, 0)
    struct.pack_into("<B", raw, 0x4CB, 3)
    struct.pack_into("<Q", raw, 0x578, 0x1000123)
    struct.pack_into("<Q", raw, 0x4D0, 1 << 12)
    v = x86.decode_vmcb(bytes(raw))
    assert (v["exit_code"], v["cpl"], v["rip"], v["asid"]) == (0x72, 3, 0x1000123, 1)
    assert x86.vmcb_intercepts(v) == ["CPUID", "HLT", "IOIO_PROT", "VMRUN"]
    text = x86.format_vmcb(v, 0x137000)
    assert "0x72 CPUID" in text and "cpl=3" in text and "SVME" in text and "not set up" not in text
    assert x86.exit_name(0x7B) == "IOIO" and x86.exit_name(0xFFFFFFFF) == "INVALID"
    assert x86.exit_name(0x40 + 13) == "EXCP13_GP" and x86.exit_name(0x400) == "NPF"
    assert x86.exit_detail(0x7B, 0xE00040) == "port=0xe0 out 32-bit"


def test_current_probe_decoding_and_context():
    raw = struct.pack("<4I16s16s", x86.CURRENT_PROBE_MAGIC, 7, 3, 1, b"rdtsc", b"")
    assert x86.decode_current_probe(raw) == {"valid": True, "id": 7, "cpl": 3, "tsd": 1,
                                             "name": "rdtsc", "param": ""}
    assert context_of(0x1000040, 0, None, None) == "guest"
    assert context_of(0x100000, 0x2000, 0x2000, 0x1000) == "guest"  # CR3 is the VMCB's guest CR3
    assert context_of(0x100000, 0x1000, 0x2000, 0x1000) == "host"


# -- the judge sees the readings: negative controls ------------------------------------------
def exp(expected="#GP(0)"):
    return Expectation("host", "rdtsc", {"tsd": "1", "cpl": "3"}, expected, "SDM Vol. 2B RDTSC")


def facts():
    from lab.expectations import Facts
    return Facts(accel="tcg", kvm_module=None, vendor="AuthenticAMD", rdtscp=False, svm=True, hypervisor=True)


def test_a_disagreeing_reading_fails_the_check():
    assert judge_one(exp(), facts(), "#GP(0)", "#GP(0)").status == "pass"
    check = judge_one(exp(), facts(), "#GP(0)", "ok")
    assert check.status == "fail" and "disagree" in check.reason


def test_an_unreached_reading_is_an_error():
    check = judge_one(exp(), facts(), "#GP(0)", UNREACHED)
    assert check.status == "error"


# -- real boots ------------------------------------------------------------------------------
def witnessed_boot(tmp_path, accel, artifacts, *, variant="normal", plan=None, scopes=("host", "guest-svm")):
    """Boot paused, attach the witness, run to the end; (readings, serial transcript, witness)."""
    s = debug.plan_session(accel, run_dir=tmp_path / "run", variant=variant)
    from lab.build import artifacts as arts
    art = arts(variant)
    w = GdbWitness(s.run_dir, art.symbols, art.guest_symbols, s.gdb_addr, accel, scopes=scopes, plan=plan)
    w.prepare()  # GDB starts while QEMU does
    qemu = debug.start_qemu(s)
    try:
        t0 = time.monotonic()
        w.start()
        rc = qemu.wait(20)
        readings = w.finish(timeout=5)
        w.wall = time.monotonic() - t0
    finally:
        debug.stop_qemu(s, qemu)
        w.finish(timeout=1)
    assert rc == 1, (s.run_dir / "qemu.stderr").read_text()
    transcript = parse_stream((s.run_dir / "serial.log").read_bytes())
    return {r.check_id: r for r in readings}, transcript, w


def serial_values(transcript):
    return {check_id(o.scope, o.probe, o.params): o.value for o in transcript.observations}


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel", [pytest.param("tcg", marks=pytest.mark.tcg),
                                   pytest.param("kvm", marks=pytest.mark.kvm)])
def test_witness_agrees_with_the_serial_records(tmp_path, accel, artifacts, no_leftovers):
    readings, transcript, w = witnessed_boot(tmp_path, accel, artifacts)
    assert transcript.complete, transcript.problems  # the witness did not disturb the run
    assert w.error is None, w.error
    serial = serial_values(transcript)
    assert readings, "no readings"
    for cid, r in readings.items():
        assert r.value != UNREACHED, (cid, r.detail)
        assert serial.get(cid) == r.value, f"{cid}: serial {serial.get(cid)!r}, gdb {r.value!r} {r.detail}"
    assert set(w.plan.check_ids) <= set(readings)
    if accel == "tcg":
        gp = readings["host.rdtsc.tsd1.cpl3"]
        assert gp.value == "#GP(0)" and gp.detail["insn"].startswith("0f 31") and gp.detail["cr4.tsd"] == 1
        assert readings["host.rdtscp.tsd1.cpl2"].detail["insn"].startswith("0f 01 f9")
        assert readings["guest-svm.cpl-enter.cpl0.vmrun"].detail["efer.svme"] == 1
        assert readings["host.cpl-enter.cpl3.iretq"].detail["source"] == "ring_entry"
        assert w.stops < 80  # few stops: the witness must stay cheap
    else:
        # CPL1-3 from the exception frames of the ring returns; the CPL after them from $cs.
        for c in (1, 2, 3):
            enter = readings[f"host.cpl-enter.cpl{c}.iretq"]
            assert enter.value == str(c) and enter.detail["source"] == "exception frame"
            assert readings[f"host.cpl-return.from{c}.ud2"].value == "0"
        assert readings["host.cpl-enter.cpl3.sysret"].value == "3"
        assert readings["host.cpl-return.from1.syscall"].detail["source"] == "syscall_entry"
        # RDTSC with CR4.TSD=1 at CPL1/2: #GP(0) at the rdtsc itself, in the ring.
        for c in (1, 2):
            gp = readings[f"host.rdtsc.tsd1.cpl{c}"]
            assert gp.value == "#GP(0)" and gp.detail["insn"].startswith("0f 31"), gp.detail
            assert gp.detail["cr4.tsd"] == 1 and int(gp.detail["frame.cs"], 16) & 3 == c
        for c in (1, 2, 3):
            assert readings[f"host.rdtsc.tsd0.cpl{c}"].detail["cr4.tsd"] == 0
        assert readings["host.rdtsc.tsd1.cpl3"].detail["cr4.tsd"] == 1  # whatever the outcome
        assert readings["host.priv-insn.cli.cpl3"].detail["insn"].startswith("fa")
        assert "host.priv-insn.hlt.cpl3" not in readings  # never stopped for: see KVM_UNSAFE_EXC_STOPS
        assert readings["host.cpuid-hv-signature"].value == "KVMKVMKVM\0\0\0"
        assert 30 <= w.stops <= 40
    saved = json.loads((tmp_path / "run" / "gdb.readings.json").read_text())
    assert saved["error"] is None and saved["readings"]
    assert (tmp_path / "run" / "gdb.mi.log").read_text().count("*stopped") >= len(w.plan.watches)


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel, lies", [
    pytest.param("tcg", ("host.rdtsc.tsd1.cpl3", "host.cpl-enter.cpl3.iretq", "host.cpuid-vendor.leaf0"),
                 marks=pytest.mark.tcg),
    # kvm_pvm does not enforce CR4.TSD at CPL3: the rdtsc lie ("ok") is the truth there.
    pytest.param("kvm", ("host.cpl-enter.cpl3.iretq", "host.cpuid-vendor.leaf0"), marks=pytest.mark.kvm),
])
def test_witness_contradicts_a_lying_firmware(tmp_path, accel, lies, lie_artifacts, no_leftovers):
    readings, transcript, w = witnessed_boot(tmp_path, accel, lie_artifacts, variant="lie")
    assert transcript.complete and w.error is None, w.error
    serial = serial_values(transcript)
    known = {"host.rdtsc.tsd1.cpl3": ("ok", "#GP(0)"), "host.cpl-enter.cpl3.iretq": ("0", "3"),
             # the lie firmware's `info cpuid.vendor` is the CPU's own
             "host.cpuid-vendor.leaf0": ("LieLieLieLie", transcript.info["cpuid.vendor"])}
    for cid in lies:
        lie, truth = known[cid]
        assert serial[cid] == lie
        assert readings[cid].value == truth != lie
        check = judge_one(Expectation("host", "x", {}, truth, "-"), facts(), serial[cid], readings[cid].value)
        assert check.status == "fail" and "disagree" in check.reason


@needs_gdb
@pytest.mark.gdb
@pytest.mark.tcg
def test_a_breakpoint_never_reached_reads_unreached(tmp_path, artifacts, no_leftovers):
    plan = WitnessPlan("tcg", ("host",), (
        Watch("cpuid_vendor_done", "cpuid-vendor", ("host.cpuid-vendor.leaf0",), once=True),
        Watch("panic", "cpuid-vendor", ("host.never.reached",), once=True),  # panic() never runs
        Watch("no_such_symbol", "cpuid-vendor", ("host.no.symbol",), once=True),
    ))
    readings, transcript, w = witnessed_boot(tmp_path, "tcg", artifacts, plan=plan)
    assert transcript.complete
    assert readings["host.cpuid-vendor.leaf0"].value == "AuthenticAMD"
    assert readings["host.never.reached"].value == UNREACHED
    assert readings["host.no.symbol"].value == UNREACHED
    assert "no_such_symbol" in readings["host.no.symbol"].detail["error"]


@needs_gdb
@pytest.mark.gdb
@pytest.mark.tcg
def test_finish_detaches_when_qemu_does_not_end(tmp_path, artifacts, no_leftovers):
    """A witness that cannot finish must not hold the CPU: GDB detaches and is gone."""
    s = debug.plan_session("tcg", run_dir=tmp_path / "run", kernel_args=("fault=hang",))
    w = GdbWitness(s.run_dir, artifacts.symbols, None, s.gdb_addr, "tcg", scopes=("host",))
    qemu = debug.start_qemu(s)
    try:
        time.sleep(0.1)
        w.start()
        t0 = time.monotonic()
        readings = w.finish(timeout=0.5)
        assert time.monotonic() - t0 < 3
        assert "still running" in (w.error or "")
        assert all(r.value == UNREACHED for r in readings)
        assert qemu.poll() is None  # QEMU is the caller's to end
    finally:
        debug.stop_qemu(s, qemu)
