"""Bochs as a third engine (docs/bochs.md) and the VMX host it runs: the same kernel and
judge, the guest under VMX (corei7_skylake_x) and SVM (trinity_apu), negative controls (a
guest that lies, a host that forgets an exit or passes CPUID through, an exit nobody
handles) and every fault path ending in a verdict with no Bochs left running."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from lab import bochs
from lab.config import ConfigError
from lab.hostinfo import ToolMissing
from lab.judge import judge
from lab.runner import make_config, preboot, run_one

MISSING = bochs.missing_reason()
pytestmark = [pytest.mark.bochs, pytest.mark.skipif(bool(MISSING), reason=f"Bochs missing: {MISSING}"),
              pytest.mark.usefixtures("no_bochs_left")]

INTEL, AMD = bochs.DEFAULT_MODEL, bochs.SVM_MODEL


def bochs_left(tmp_path) -> list[str]:
    """Bochs processes of this test: children of pytest, or naming the test's folder."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    me = str(os.getpid())
    return [row for row in out.splitlines()[1:] if len(row.split(None, 2)) == 3
            and "bochs" in row.split(None, 2)[2] and (str(tmp_path) in row or row.split()[1] == me)]


@pytest.fixture
def no_bochs_left(tmp_path):
    """No Bochs of this test left running."""
    yield
    left = bochs_left(tmp_path)
    assert not left, f"left running: {left}"


def test_negative_control_a_leftover_is_seen(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "bochs", str(tmp_path)])
    try:
        assert bochs_left(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def boot(tmp_path, art, kvm, cpu=INTEL, **kw):
    cfg = make_config("bochs", art, qemu=bochs.bochs_binary(), kvm=kvm, cpu=cpu, **kw)
    return run_one(cfg, tmp_path / "run", kvm)


def checks(outcome):
    return {c.id: c for c in outcome.checks}


def bad(outcome):
    return [(c.id, c.status, c.observed, c.reason) for c in outcome.checks if c.status not in ("pass", "skip")]


# -- the VMX host ---------------------------------------------------------------------------
def test_vmx_guest_sees_cpl0_the_signature_and_its_exits(tmp_path, artifacts, kvm):
    out = boot(tmp_path, artifacts, kvm)
    assert out.boot.exit == "ok", out.boot.exit_detail
    assert not bad(out), bad(out)
    c = checks(out)
    assert c["guest-vmx.cpl-enter.cpl0.vmentry"].observed == "0"
    assert c["guest-vmx.cpuid-hv-signature"].observed == "LabRingMinus"
    assert c["guest-vmx.cpuid-hv-bit"].observed == "1"
    assert c["host.cpuid-hv-bit"].observed == "0"  # the same CPU, seen from the host
    assert c["guest-vmx.rdtsc.tsd1.cpl3"].observed == "#GP(0)"
    assert all(int(c[f"guest-vmx.vmexit.{r}"].observed) >= 1 for r in ("cpuid", "rdtsc", "hlt", "io"))
    assert all(v.status == "skip" for v in out.checks if v.scope in ("guest-svm", "guest-soft"))
    assert out.transcript.info["hv"] == "vmx" and "cost.cpuid.vmexit_cycles" in out.transcript.info
    # The run folder reproduces the boot by hand.
    for name in ("bochsrc", "bochsrc.repro", "bochs.rc", "command.txt", "serial.log", "bochs.log"):
        assert (out.run_dir / name).is_file(), name
    assert out.boot.wall_s < 15  # about 3 s here unloaded (docs/bochs.md "Speed")


def test_vmx_signature_is_what_was_asked(tmp_path, artifacts, kvm):
    c = checks(boot(tmp_path, artifacts, kvm, hv_signature="AbcdEfghIjkl"))
    assert c["guest-vmx.cpuid-hv-signature"].observed == "AbcdEfghIjkl"
    assert c["guest-vmx.cpuid-hv-signature"].status == "pass"


def test_negative_control_host_passing_cpuid_through_fails(tmp_path, artifacts, kvm):
    c = checks(boot(tmp_path, artifacts, kvm, kernel_args=("hv-intercept-cpuid=0",)))
    assert c["guest-vmx.cpuid-hv-signature"].status == "fail"
    assert c["guest-vmx.cpuid-hv-bit"].status == "fail" and c["guest-vmx.cpuid-hv-bit"].observed == "0"


def test_negative_control_guest_that_lies_fails(tmp_path, lie_artifacts, kvm):
    c = checks(boot(tmp_path, lie_artifacts, kvm))
    lie = c["guest-vmx.rdtsc.tsd1.cpl3"]
    assert lie.status == "fail" and lie.observed == "ok"


def test_negative_control_host_that_forgets_rdtsc_exiting_fails(tmp_path, artifacts, kvm):
    c = checks(boot(tmp_path, artifacts, kvm, kernel_args=("hv-fault=no-rdtsc-exit",)))
    seen = c["guest-vmx.rdtsc-intercepted.cpl0.intercept1"]
    assert seen.status == "fail" and seen.observed == "native"
    assert c["guest-vmx.vmexit.rdtsc"].status == "error"  # the exit never happened


def test_vmx_unknown_exit_is_reported_with_its_reason_not_hung(tmp_path, artifacts, kvm):
    out = boot(tmp_path, artifacts, kvm, kernel_args=("hv-fault=unknown-exit",), timeout_s=20)
    assert out.boot.exit == "ok"
    end = checks(out)["guest-vmx.guest-end"]
    assert end.status == "fail" and end.observed == "unknown-exit"
    assert end.details["guest.exit_code"] == "0x0"  # basic exit reason 0: exception (#UD)
    assert end.details["guest.exit_intr_info"] == "0x80000306"  # valid, hardware exception, vector 6


def test_negative_control_wrong_expected_signature_fails(tmp_path, artifacts, kvm):
    """The judge, not the firmware, decides: the same transcript against another signature."""
    out = boot(tmp_path, artifacts, kvm)
    wrong = dataclasses.replace(out.facts, hv_signature="SomethingEls")
    c = {x.id: x for x in judge(wrong, out.transcript)}
    assert c["guest-vmx.cpuid-hv-signature"].status == "fail"


# -- Bochs' SVM, next to TCG's ---------------------------------------------------------------
@pytest.mark.tcg
@pytest.mark.usefixtures("no_leftovers")
def test_amd_model_runs_the_svm_host_with_the_same_exits_as_tcg(tmp_path, artifacts, kvm, qemu):
    out = boot(tmp_path, artifacts, kvm, cpu=AMD)
    assert not bad(out), bad(out)
    c = checks(out)
    assert c["guest-svm.cpl-enter.cpl0.vmrun"].status == "pass"
    assert all(v.status == "skip" for v in out.checks if v.scope == "guest-vmx")
    tcg = run_one(make_config("tcg", artifacts, qemu=qemu, kvm=kvm), tmp_path / "tcg", kvm)
    t = checks(tcg)
    for reason in ("cpuid", "rdtsc", "hlt", "ioio"):
        assert c[f"guest-svm.vmexit.{reason}"].status == t[f"guest-svm.vmexit.{reason}"].status == "pass"
    # Exits the guest's fixed probes cause are the same count on both engines; the CPUID
    # count also has the cost loop, which runs to a cycle budget.
    for reason in ("hlt", "ioio"):
        assert c[f"guest-svm.vmexit.{reason}"].observed == t[f"guest-svm.vmexit.{reason}"].observed, reason


# -- fault paths: a verdict, no Bochs left ---------------------------------------------------
def test_hang_is_a_timeout(tmp_path, artifacts, kvm):
    out = boot(tmp_path, artifacts, kvm, kernel_args=("fault=hang",), timeout_s=6)
    assert out.boot.exit == "timeout"
    assert checks(out)["run.integrity"].status == "error"


def test_triple_fault_is_a_crash(tmp_path, artifacts, kvm):
    out = boot(tmp_path, artifacts, kvm, kernel_args=("fault=triple",))
    assert out.boot.exit == "crash" and "triple fault" in out.boot.exit_detail


def test_firmware_exit_code_is_read_back(tmp_path, artifacts, kvm):
    out = boot(tmp_path, artifacts, kvm, kernel_args=("fault=exception",))
    assert out.boot.exit == "exit-code" and "code 3" in out.boot.exit_detail  # LAB_EXIT_UNEXPECTED
    assert "unexpected_exception" in out.transcript.info  # the UART drained before the exit


def test_bochs_panic_is_a_clear_error(tmp_path, artifacts, kvm, monkeypatch):
    cfg = make_config("bochs", artifacts, qemu=bochs.bochs_binary(), kvm=kvm, cpu=INTEL)
    pre = bochs.preboot(cfg).cfg  # the model decided first; the panic comes at the boot
    monkeypatch.setattr(bochs, "BIOS", tmp_path / "no-such-bios")
    out = run_one(pre, tmp_path / "run", kvm)
    integrity = checks(out)["run.integrity"]
    assert integrity.status == "error" and "Bochs panic" in integrity.reason and "ROM" in integrity.reason
    # Undecided, the same panic stops the pre-boot question, and says why just as clearly.
    out = run_one(cfg, tmp_path / "run2", kvm)
    integrity = checks(out)["run.integrity"]
    assert integrity.status == "error" and "ROM" in integrity.reason


def test_missing_binary_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LAB_BOCHS", "no-such-bochs")
    with pytest.raises(ToolMissing, match="Bochs not found.*apt-get install bochs"):
        bochs.bochs_binary()


def test_unknown_model_and_impossible_host_mode_are_config_errors(artifacts, kvm):
    with pytest.raises(ConfigError, match="Bochs has no CPU model"):
        bochs.check_choice("bochs", "qemu64")
    with pytest.raises(ConfigError, match="--cpu cannot name both"):
        bochs.check_choice("every", INTEL)
    cfg = make_config("bochs", artifacts, qemu=bochs.bochs_binary(), kvm=kvm, cpu=AMD, host_mode="vmx")
    with pytest.raises(ConfigError, match="has no VMX"):
        preboot(cfg)


# -- Bochs' description of a model ------------------------------------------------------------
def test_model_facts_come_from_bochs_own_cpuid_table():
    intel = bochs.describe(bochs.bochs_binary(), INTEL)
    amd = bochs.describe(bochs.bochs_binary(), AMD)
    assert (intel["vendor"], intel["vmx"], intel["svm"], intel["lm"]) == ("GenuineIntel", True, False, True)
    assert (amd["vendor"], amd["vmx"], amd["svm"], amd["hypervisor"]) == ("AuthenticAMD", False, True, False)


def test_cpuid_dump_parser_reads_each_bit_it_claims():
    log = ("00000000000i[CPU0  ] CPUID[0x00000000]: 0000000d 68747541 444d4163 69746e65\n"
           "00000000000i[CPU0  ] CPUID[0x00000001]: 00610f01 00010800 80000020 178bfbff\n"
           "00000000000i[CPU0  ] CPUID[0x80000001]: 00600f12 20000000 00000000 00000000\n")
    f = bochs.model_facts(bochs.parse_cpuid_dump(log))
    assert f["vendor"] == "AuthenticAMD" and f["max-basic-leaf"] == 0xD
    assert f["vmx"] and f["hypervisor"] and not f["svm"] and not f["rdtscp"] and not f["lm"]
    assert bochs.model_facts({}) == {}


def test_grub_words_are_quoted_literally():
    assert bochs._grub_word("hv-signature=it's$HOME") == "'hv-signature=it'\\''s$HOME'"


def test_bochs_is_witnessed_by_the_serial_console_only(tmp_path):
    """Debian's Bochs has no gdbstub: GDB alone cannot witness it, and a run says `serial`."""
    from lab.cli import RunOptions, run_lab

    with pytest.raises(ConfigError, match="Bochs has no gdbstub"):
        run_lab(RunOptions(accel="bochs", witness="gdb", runs_dir=str(tmp_path), quiet=True))
    assert not list(tmp_path.iterdir())  # refused before anything was created
    status, rep = run_lab(RunOptions(accel="bochs", witness="both", runs_dir=str(tmp_path), quiet=True))
    assert status == 0 and rep["witness"] == "serial"
    assert not any("gdb" in c["witnesses"] for c in rep["checks"])
