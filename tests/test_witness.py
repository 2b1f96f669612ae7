"""The GDB witness (lab/witness.py): its plan, its decoders, and real boots where its
readings must agree with the serial records, disagree with a lying firmware, and say
`unreached` for a breakpoint that never fires."""
from __future__ import annotations

import json
import shutil
import struct
import time

import pytest

from lab import debug
from lab.expectations import Expectation
from lab.gdb import x86
from lab.gdb.lab_gdb import context_of
from lab.ids import check_id
from lab.judge import judge_one
from lab.records import parse_stream
from lab.witness import UNREACHED, GdbWitness, Watch, WitnessPlan, probe_check_id, witness_plan

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


def test_kvm_plan_fits_four_one_shot_hardware_breakpoints(monkeypatch):
    plan = witness_plan("kvm", ["host", "guest-svm"])
    assert len(plan.watches) <= 4 and all(w.once for w in plan.watches)
    assert not any(w.guest for w in plan.watches)  # no SVM guest under KVM here
    assert "host.cpl-enter.cpl3.iretq" in plan.check_ids
    from lab import witness
    monkeypatch.setattr(witness, "HW_BREAKPOINT_SLOTS", 3)
    with pytest.raises(ValueError, match="hardware breakpoints"):
        witness.witness_plan("kvm", ["host"])


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
        assert readings["host.cpl-enter.cpl3.iretq"].detail["source"] == "exception frame"
        assert readings["host.cpuid-hv-signature"].value == "KVMKVMKVM\0\0\0"
    saved = json.loads((tmp_path / "run" / "gdb.readings.json").read_text())
    assert saved["error"] is None and saved["readings"]
    assert (tmp_path / "run" / "gdb.mi.log").read_text().count("*stopped") >= len(w.plan.watches)


@needs_gdb
@pytest.mark.gdb
@pytest.mark.tcg
def test_witness_contradicts_a_lying_firmware(tmp_path, lie_artifacts, no_leftovers):
    readings, transcript, _ = witnessed_boot(tmp_path, "tcg", lie_artifacts, variant="lie")
    serial = serial_values(transcript)
    for cid, lie, truth in (("host.rdtsc.tsd1.cpl3", "ok", "#GP(0)"),
                            ("host.cpl-enter.cpl3.iretq", "0", "3"),
                            ("host.cpuid-vendor.leaf0", "LieLieLieLie", "AuthenticAMD")):
        assert serial[cid] == lie
        assert readings[cid].value == truth


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
