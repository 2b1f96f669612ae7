"""The 32-bit host kernel (firmware/arch32): booted for CPU models without long mode, with the
same catalogue, records and verdicts as the 64-bit one; its 32-bit exception frames read by the
GDB witness; and its deviations named (TCG's RDTSC without a TSC, kvm_pvm's 32-bit IRET)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from lab import catalogue, deviations
from lab.build import host32_of
from lab.config import ConfigError
from lab.elf import Image
from lab.expectations import LONG_MODE_ONLY, NO_HV_32, Facts, plan
from lab.runner import make_config, preboot, run_one
from lab.witness import _frame, read_stops

pytestmark = pytest.mark.usefixtures("no_leftovers")


def boot(tmp_path, art, qemu, kvm, accel, cpu, witness="both", **kw):
    pre = preboot(make_config(accel, art, qemu=qemu, kvm=kvm, cpu=cpu, **kw))
    assert not pre.skip, pre.skip
    return run_one(pre.cfg, tmp_path / accel, kvm, witness)


def bad(out):
    return [(c.id, c.status, c.expected, c.observed, c.reason) for c in out.checks if c.status in ("fail", "error")]


def by_id(out):
    return {c.id: c for c in out.checks}


# -- the generator: one catalogue, two texts -----------------------------------------------------
def test_the_32_bit_stubs_are_the_64_bit_ones_with_32_bit_registers():
    s64, s32 = catalogue.firmware_sources()["probes.gen.S"], catalogue.firmware_sources(32)["probes.gen.S"]
    assert "mov %rax, %cr4" in s64 and "mov %rax, %cr4" not in s32 and "mov %eax, %cr4" in s32
    assert not re.search(r"%r([abcd]x|sp|bp|si|di)\b", s32)  # no 64-bit register left
    for stub in catalogue.stubs():
        text = stub.asm32 or catalogue.to_32bit(stub.asm)
        body = "".join(f"    {line.strip()}\n" for line in text.splitlines() if line.strip())
        assert f"probe_insn_{stub.name}:\n{body}probe_done_{stub.name}:" in s32
    assert catalogue.to_32bit("rdtsc") == "rdtsc"  # instructions without registers: the same text


def test_the_32_bit_table_leaves_out_the_64_bit_only_rows():
    h64, h32 = catalogue.firmware_sources()["probes.gen.h"], catalogue.firmware_sources(32)["probes.gen.h"]
    only64 = [r for r in catalogue.table_rows() if r.entry.long_mode_only]
    assert only64 and h32.count('\n    { "host"') == len(catalogue.table_rows()) - len(only64)
    assert h64.count('\n    { "host"') == len(catalogue.table_rows())  # negative control: 64-bit has them
    assert '"sysret"' in h64 and '"sysret"' not in h32


# -- the GDB witness reads a 32-bit frame by the kernel's width -----------------------------------
def _stack(*words: int, width: int) -> str:
    return b"".join(w.to_bytes(width, "little") for w in words).hex()


def test_a_32_bit_frame_is_read_as_4_byte_words():
    # #GP(0) from CPL3: error code, EIP, CS, EFLAGS, ESP, SS (SDM Vol. 3A 6.12.1).
    stop = {"vector": 13, "stack": _stack(0, 0x101234, 0x2B, 0x202, 0x130000, 0x23, width=4)}
    assert _frame(stop, 4) == {"error_code": 0, "rip": 0x101234, "cs": 0x2B, "rflags": 0x202,
                               "rsp": 0x130000, "ss": 0x23}
    # From CPL0 the CPU pushes no ESP/SS: what follows on the stack is not the frame's.
    stop = {"vector": 6, "stack": _stack(0x101234, 0x08, 0x2, 0xDEAD, 0xBEEF, 0, width=4)}
    assert _frame(stop, 4)["rsp"] is None and _frame(stop, 4)["cs"] == 0x08
    # Negative control: the same bytes read as a 64-bit frame are not this frame.
    assert _frame(stop, 8)["rip"] != 0x101234


@pytest.fixture(scope="module")
def image32(artifacts):
    return Image.load(host32_of(artifacts.kernel)[1])


def test_the_witness_reads_a_probe_of_the_32_bit_host(image32):
    assert image32.bits == 32
    insn = image32.symbols["probe_insn_hlt"]
    stop = {"kind": "trap", "at": "isr_stub_13", "vector": 13,
            "regs": {"cs": 0x08, "rip": image32.symbols["isr_stub_13"], "rsp": 0x120000, "cr4": 0, "efer": 0,
                     "rax": 0, "rbx": 0, "rcx": 0, "rdx": 0},
            "stack": _stack(0, insn, 0x2B, 0x2, 0x130000, 0x23, width=4),
            "at_rip": image32.read(insn, 16).hex()}
    found, stray = read_stops([stop], image32)
    assert [r.value for r in found["host.priv-insn.hlt.cpl3"]] == ["#GP(0)"] and not stray
    # Negative control: a 64-bit frame layout at the same stop does not place it.
    wrong = {**stop, "stack": _stack(0, insn, 0x2B, 0x2, 0x130000, 0x23, width=8)}
    assert "host.priv-insn.hlt.cpl3" not in read_stops([wrong], image32)[0]


# -- deviations: keyed on the module and on the model -------------------------------------------
def _exp(facts, cid):
    return next(e for e in plan(facts) if e.id == cid)


def test_the_32_bit_iret_deviation_is_kvm_pvm_on_a_model_without_long_mode_only():
    pvm32 = Facts("kvm", "kvm_pvm", "GenuineIntel", False, False, True, long_mode=False)
    dev = deviations.find(pvm32, _exp(pvm32, "host.priv-insn.hlt.cpl2"))
    assert dev.name == "kvm_pvm-iret32-outer" and dev.observed is None  # not run: it would stop QEMU
    # ... and it wins over a value deviation of the same row (nothing is observed at all)
    assert deviations.find(pvm32, _exp(pvm32, "host.rdtsc.tsd1.cpl3")).name == "kvm_pvm-iret32-outer"
    assert {"cpl=1", "cpl=2", "cpl=3", "from_cpl=3"} <= set(deviations.skipped_probes("kvm", "kvm_pvm", pvm32.has))
    assert deviations.find(pvm32, _exp(pvm32, "host.rdtsc.tsd1.cpl0")) is None  # CPL0 runs
    # Negative controls: the 64-bit host, and a hardware KVM, run the IRET.
    pvm64 = dataclasses.replace(pvm32, long_mode=True)
    assert deviations.find(pvm64, _exp(pvm64, "host.priv-insn.hlt.cpl2")) is None
    assert "cpl=1" not in deviations.skipped_probes("kvm", "kvm_pvm", pvm64.has)
    intel32 = dataclasses.replace(pvm32, kvm_module="kvm_intel")
    assert deviations.find(intel32, _exp(intel32, "host.priv-insn.hlt.cpl2")) is None


def test_rdtsc_without_the_tsc_is_ud_and_tcgs_deviation_needs_that_model():
    no_tsc = Facts("tcg", None, "GenuineIntel", False, False, True, tsc=False, long_mode=False)
    exp = _exp(no_tsc, "host.rdtsc.tsd0.cpl3")
    assert exp.expected == "#UD"  # SDM Vol. 2B RDTSC: no TSC, no instruction
    assert deviations.find(no_tsc, exp).name == "tcg-rdtsc-without-tsc"
    with_tsc = dataclasses.replace(no_tsc, tsc=True)  # negative control: pentium3 follows the rule
    exp = _exp(with_tsc, "host.rdtsc.tsd0.cpl3")
    assert exp.expected == "ok" and deviations.find(with_tsc, exp) is None


# -- booting it ------------------------------------------------------------------------------------
def test_a_model_without_long_mode_boots_the_32_bit_host(artifacts, qemu, kvm):
    pre = preboot(make_config("tcg", artifacts, qemu=qemu, kvm=kvm, cpu="pentium3"))
    assert not pre.skip and (pre.cfg.kernel, pre.cfg.symbols) == host32_of(artifacts.kernel)
    assert pre.cfg.modules == () and pre.cfg.guest_symbols is None  # no hypervisor, no guest
    # Negative control: a model with long mode keeps the 64-bit kernel.
    pre = preboot(make_config("tcg", artifacts, qemu=qemu, kvm=kvm, cpu="qemu64"))
    assert pre.cfg.kernel == artifacts.kernel


def test_a_forced_hypervisor_on_a_model_without_long_mode_is_the_users_error(artifacts, qemu, kvm):
    with pytest.raises(ConfigError, match="--host-mode soft: .* no long mode"):
        preboot(make_config("tcg", artifacts, qemu=qemu, kvm=kvm, cpu="pentium3", host_mode="soft"))
    assert not preboot(make_config("tcg", artifacts, qemu=qemu, kvm=kvm, cpu="pentium3", host_mode="none")).skip


@pytest.mark.tcg
def test_tcg_pentium3_passes_on_the_32_bit_host_with_both_witnesses(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "tcg", "pentium3")
    assert out.boot.exit == "ok", out.boot.exit_detail
    assert not bad(out)
    checks = by_id(out)
    assert out.transcript.info.get("host.bits") == "32"
    assert checks["host.rdtsc.tsd1.cpl3"].observed == "#GP(0)"
    assert checks["host.cpl-enter.cpl3.iretq"].observed == "3"
    assert checks["host.priv-insn.mov-cr4.cpl2"].observed == "#GP(0)"
    for cid in ("host.rdtsc.tsd1.cpl3", "host.cpl-return.from3.ud2", "host.priv-insn.hlt.cpl1"):
        assert checks[cid].witnesses.get("gdb") == checks[cid].observed, cid  # GDB read the 32-bit frame
    # Every host check GDB reads from a trap has its reading (the judge fails a disagreement).
    rows = {r.id: r for r in catalogue.rows()}
    traps = [c for c in out.checks if c.scope == "host" and c.status != "skip" and c.id in rows
             and rows[c.id].entry.witness_in("host") == "trap"]
    assert traps and all("gdb" in c.witnesses for c in traps), [c.id for c in traps if "gdb" not in c.witnesses]
    assert checks["host.cpl-enter.cpl3.sysret"].status == "skip"
    assert checks["host.cpl-enter.cpl3.sysret"].reason == LONG_MODE_ONLY
    guest = [c for c in out.checks if c.scope.startswith("guest-")]
    assert guest and all(c.status == "skip" and c.reason == NO_HV_32 for c in guest)


@pytest.mark.tcg
def test_tcg_486_rdtsc_is_ud_by_the_rule_and_tcg_deviates_by_name(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "tcg", "486")
    assert out.boot.exit == "ok", out.boot.exit_detail
    assert not bad(out)
    rdtsc = [c for c in out.checks if c.probe == "rdtsc" and c.scope == "host"]
    assert len(rdtsc) == 9  # 8 protected-mode rows and the real-mode one
    for c in rdtsc:
        assert c.expected == "#UD" and c.status == "xfail" and c.reason.startswith("tcg-rdtsc-without-tsc"), c
    assert by_id(out)["host.rdtsc.tsd1.cpl3"].observed == "#GP(0)"
    assert by_id(out)["host.rdtsc.tsd0.cpl3"].witnesses.get("gdb") == "ok"


@pytest.mark.tcg
def test_the_lie_build_of_the_32_bit_host_is_caught_by_both_witnesses(tmp_path, lie_artifacts, qemu, kvm):
    out = boot(tmp_path, lie_artifacts, qemu, kvm, "tcg", "pentium3")
    checks = by_id(out)
    failed = {c.id: c for c in out.checks if c.status == "fail"}
    lies = {cid for cid in catalogue.LIES if checks[cid].status != "skip"}  # what this model runs
    assert {"host.rdtsc.tsd1.cpl3", "host.cpuid-vendor.leaf0", "host.cpl-enter.cpl3.iretq"} <= lies
    assert lies <= set(failed)
    for cid in lies:
        assert failed[cid].witnesses["serial"] != failed[cid].witnesses["gdb"], cid


@pytest.mark.kvm
def test_kvm_32_bit_host_ends_cleanly_with_the_iret_deviation_named(tmp_path, artifacts, qemu, kvm):
    out = boot(tmp_path, artifacts, qemu, kvm, "kvm", "pentium3", witness="serial")
    assert out.boot.exit == "ok", out.boot.exit_detail
    assert not bad(out)
    checks = by_id(out)
    assert checks["host.rdtsc.tsd1.cpl0"].status == "pass"
    outer = checks["host.rdtsc.tsd1.cpl3"]
    if kvm.module == "kvm_pvm":
        assert outer.status == "skip" and outer.reason.startswith("kvm_pvm-iret32-outer")
    else:  # a hardware KVM runs the 32-bit IRET: the rule, not a deviation
        assert outer.status == "pass"
