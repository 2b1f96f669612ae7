"""`invoke lab.debug` and the lab-* GDB commands: the README walkthrough replayed as written,
KVM breakpoints, the messages for a gone CPU, a VMCB before its first exit, a bad --break."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lab import debug
from lab.build import ROOT
from lab.config import ConfigError
from lab.gdb import lab_gdb, x86
from lab.hostinfo import kvm_status

README = ROOT / "README.md"
KVM = kvm_status()


# -- the README walkthrough ----------------------------------------------------------------
def walkthrough_blocks() -> list[tuple[str, list[str], list[str]]]:
    """(accel, GDB commands, expected output lines) of each block in the README's
    "Step through it in GDB" section; the block's first line is the `$ invoke` command."""
    text = README.read_text()
    section = text.split("## Step through it in GDB", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"```\n(.*?)```", section, re.S):
        lines = body.splitlines()
        assert lines[0].startswith("$ invoke lab.debug"), lines[0]
        accel = "kvm" if "--accel kvm" in lines[0] else "tcg"
        cmds, expected = [], []
        for line in lines[1:]:
            line = re.sub(r"\s{2,}#.*$", "", line)  # a reader's comment
            if line.startswith("(gdb) "):
                cmds.append(line[len("(gdb) "):])
            elif line.strip():
                expected.append(line)
        blocks.append((accel, cmds, expected))
    return blocks


def _norm(line: str) -> str:
    # Addresses and line numbers as the README shows them: a firmware change that moves them makes
    # the walkthrough stale, and this test says so (write `...` where a value is not the point).
    return re.sub(r"\s+", " ", line).strip()


def missing_lines(expected: list[str], output: str) -> list[str]:
    """Expected lines (`...` elides) not found in `output`, in order."""
    actual = [_norm(line) for line in output.splitlines()]
    i, missing = 0, []
    for want in expected:
        parts = [p.strip() for p in _norm(want).split("...")]
        pattern = re.compile(".*".join(re.escape(p) for p in parts))
        for j in range(i, len(actual)):
            if pattern.search(actual[j]):
                i = j + 1
                break
        else:
            missing.append(want)
    return missing


def run_batch(tmp_path: Path, accel: str, cmds: list[str], timeout: float = 60, scope: str = "host") -> str:
    """A lab.debug session (same QEMU, same GDB setup) with `cmds` typed at the prompt."""
    s = debug.plan_session(accel, scope, run_dir=tmp_path / "run")
    qemu = debug.start_qemu(s)
    try:
        argv = [s.gdb_cmd[0], "-q", "-nx", "-batch"] + [a for c in s.gdb_setup + cmds for a in ("-ex", c)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return out.stdout + out.stderr
    finally:
        debug.stop_qemu(s, qemu)


def test_readme_has_a_tcg_and_a_kvm_walkthrough():
    accels = [a for a, _, _ in walkthrough_blocks()]
    assert accels == ["tcg", "kvm"]


def test_walkthrough_matcher_catches_a_wrong_line_number():
    """Negative control: a file:line the source does not have is reported."""
    out = "Temporary breakpoint 2, probe_iretq () at ring.S:84\n84\tiretq\n"
    assert missing_lines(["Temporary breakpoint 2, probe_iretq () at ring.S:84"], out) == []
    assert missing_lines(["Temporary breakpoint 2, probe_iretq () at ring.S:42"], out)
    assert missing_lines(["42          iretq"], out)
    assert missing_lines(["Breakpoint 3, exc_dispatch (f=...) at exc.c:70"],
                         "Breakpoint 3, exc_dispatch (f=0x137da0 <rsp0_stack+16208>) at exc.c:70") == []


@pytest.mark.gdb
@pytest.mark.tcg
def test_readme_walkthrough_tcg_works_as_written(tmp_path, artifacts, no_leftovers):
    accel, cmds, expected = walkthrough_blocks()[0]
    out = run_batch(tmp_path, accel, cmds)
    assert missing_lines(expected, out) == [], out
    assert "refused" not in out and "No symbol" not in out, out


@pytest.mark.gdb
@pytest.mark.kvm
def test_readme_walkthrough_kvm_works_as_written(tmp_path, artifacts, no_leftovers):
    if KVM.module != "kvm_pvm":
        pytest.skip(f"the README's KVM block shows kvm_pvm's output; /dev/kvm here is {KVM.module}")
    accel, cmds, expected = walkthrough_blocks()[1]
    out = run_batch(tmp_path, accel, cmds)
    assert missing_lines(expected, out) == [], out
    assert "Software breakpoint" not in out and "refused" not in out, out


# -- KVM sessions: hardware breakpoints, refusals, notes ------------------------------------
@pytest.mark.gdb
@pytest.mark.kvm
def test_guest_scope_under_kvm_shows_the_guest_entry_and_the_run_completes(tmp_path, artifacts, no_leftovers):
    out = run_batch(tmp_path, "kvm", ["continue", "x/2gx $rsp", "continue"], scope="guest")
    m = re.search(r"Temporary breakpoint 1, soft_enter_iretq .*\n.*\n0x[0-9a-f]+:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out)
    assert m, out
    assert lab_gdb.in_guest_window(int(m.group(1), 16)) and int(m.group(2), 16) & 3 == 1, out  # RIP, CS: CPL1
    assert b" end count=" in (tmp_path / "run" / "serial.log").read_bytes(), out  # the boot still ends



def test_kvm_session_declares_kvm_before_attaching(artifacts):
    s = debug.plan_session("kvm")
    kvm_at = next(i for i, c in enumerate(s.gdb_setup) if c.startswith("lab-kvm"))
    attach = next(i for i, c in enumerate(s.gdb_setup) if c.startswith("target remote"))
    assert kvm_at < attach and s.gdb_setup[kvm_at] == f"lab-kvm {KVM.module or 'kvm'}"
    assert not any(c.startswith("lab-kvm") for c in debug.plan_session("tcg").gdb_setup)


def test_guest_scope_under_kvm_stops_where_gdb_can(artifacts):
    assert debug.plan_session("kvm", "guest").gdb_setup[-2] == "thbreak *soft_enter_iretq"
    assert debug.plan_session("tcg", "guest").gdb_setup[-2] == "break *guest_start"


def test_session_notes_say_what_cannot_work():
    pvm = " ".join(debug.session_notes("kvm", "host", "kvm_pvm", ""))
    assert "hardware breakpoints" in pvm and "CPL0 code only" in pvm and "exc_dispatch" in pvm
    assert "finish" in pvm
    guest = " ".join(debug.session_notes("kvm", "guest", "kvm_pvm", ""))
    assert "soft_enter_iretq" in guest and "CPL1" in guest
    # measured under kvm_pvm: stepi does step the CPL1 guest, and stepping a trapping instruction ends it
    assert "does step the guest's CPL1 instructions" in guest and "WARNING" in guest and "shutdown" in guest
    other = " ".join(debug.session_notes("kvm", "host", "kvm_intel", ""))
    assert "kvm_pvm" not in other and "not measured" in other  # no kvm_pvm claim elsewhere
    tcg = " ".join(debug.session_notes("tcg", "host", "kvm_pvm", ""))
    assert "hardware" not in tcg and "kvm_pvm" not in tcg


def test_break_refusal_rule():
    inside, outside = lab_gdb.GUEST_WINDOW[0] + 0x40, 0x100000
    assert lab_gdb.break_refusal("kvm_pvm", inside)
    assert lab_gdb.break_refusal("kvm_pvm", outside) is None
    assert lab_gdb.break_refusal(None, inside) is None  # TCG stops anywhere
    assert lab_gdb.break_refusal("kvm_intel", inside) is None  # not claimed for other modules
    syms = {"soft_trap": 0x106690, "soft_exit_tramp": 0x100767, "kmain": 0x1021f0}
    assert "trap path" in lab_gdb.break_refusal("kvm_pvm", 0x106690, syms)
    assert lab_gdb.break_refusal("kvm_pvm", 0x1021f0, syms) is None
    assert lab_gdb.break_refusal(None, 0x106690, syms) is None


@pytest.mark.parametrize("symbol, message", [
    ("nosuchsym", "no such symbol in host.elf64"),
    ("kmian", "did you mean kmain"),
    ("0xZZ", "not a symbol or a hex address"),
])
def test_bad_break_is_one_clear_error(artifacts, symbol, message):
    with pytest.raises(ConfigError, match=message):
        debug.plan_session("tcg", break_symbol=symbol)


def test_good_break_is_accepted(artifacts):
    assert debug.plan_session("tcg", break_symbol="exc_dispatch").gdb_setup[-2] == "break *exc_dispatch"
    assert debug.plan_session("tcg", break_symbol="0x100000").gdb_setup[-2] == "break *0x100000"


@pytest.mark.skipif(KVM.module != "kvm_pvm", reason=f"kvm_pvm's rule; /dev/kvm here is {KVM.module}")
def test_break_in_guest_code_under_kvm_pvm_is_refused(artifacts):
    with pytest.raises(ConfigError, match="stops GDB on CPL0 code only"):
        debug.plan_session("kvm", "guest", break_symbol="guest_start")


def test_invoke_debug_bad_break_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run(["invoke", "lab.debug", "--break", "nosuchsym"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --break 'nosuchsym': no such symbol in host.elf64 or guest.elf64"], out.stderr
    assert "Traceback" not in out.stdout + out.stderr


# -- the lab-* commands in a real GDB -------------------------------------------------------
def gdb_batch(*cmds: str, symbols=True) -> str:
    art = debug.artifacts()
    pre = ["set confirm off", "set architecture i386:x86-64"] + ([f"file {art.symbols}"] if symbols else [])
    argv = ["gdb", "-q", "-nx", "-batch"] + [a for c in pre + [f"source {debug.LAB_GDB_SCRIPT}", *cmds]
                                             for a in ("-ex", c)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


@pytest.mark.gdb
def test_lab_commands_are_listed_by_help_user_defined(artifacts):
    out = gdb_batch("help user-defined")
    for name in ("lab-cpl", "lab-cr4", "lab-vmcb", "lab-probes", "lab-kvm"):
        assert re.search(rf"^{name} -- \S", out, re.M), out


@pytest.mark.gdb
def test_lab_commands_without_a_cpu_say_so(artifacts):
    out = gdb_batch("lab-cpl", "lab-cr4", "lab-vmcb")
    for name in ("lab-cpl", "lab-cr4", "lab-vmcb"):
        assert f"{name}: no CPU to read: QEMU is not attached" in out, out
    assert "No registers" not in out and "Traceback" not in out


@pytest.mark.gdb
def test_lab_kvm_turns_break_into_hbreak_and_refuses_software_stoppers(artifacts):
    out = gdb_batch("lab-kvm kvm_pvm", "break kmain", "tbreak kmain", "finish", "until", "advance kmain",
                    f"break *{lab_gdb.GUEST_WINDOW[0] + 0x40:#x}", "info breakpoints")
    assert "(break -> hbreak" in out and "(tbreak -> thbreak" in out, out
    for name in ("finish", "until", "advance"):
        assert f"{name}: refused under KVM" in out, out
    assert f"break *{lab_gdb.GUEST_WINDOW[0] + 0x40:#x}: refused: guest code runs at CPL1/CPL3" in out, out
    out = gdb_batch("lab-kvm kvm_pvm", "break soft_trap", "break *soft_exit_tramp", "break exc_dispatch")
    assert "break soft_trap: refused: `soft_trap` is the software host's trap path" in out, out
    assert "break *soft_exit_tramp: refused" in out and "break exc_dispatch: refused" not in out, out
    assert not re.search(r"^Breakpoint \d+ at", out, re.M), out  # no software breakpoint set


@pytest.mark.gdb
def test_without_lab_kvm_break_stays_software(artifacts):
    out = gdb_batch("break kmain")
    assert re.search(r"^Breakpoint 1 at 0x[0-9a-f]+: file kmain.c", out, re.M), out  # control for the above


@pytest.mark.gdb
def test_lab_probes_lists_the_elf_labels(artifacts):
    out = gdb_batch("lab-probes")
    stubs = lab_gdb.probe_stubs(x86.elf_symbols(str(debug.artifacts().symbols)))
    assert stubs, "the firmware has no probe_insn_ labels"
    assert f"probed instructions ({len(stubs)})" in out
    for name, insn, _done in stubs:  # each by the label `break` takes
        assert re.search(rf"{insn:#010x}\s+probe_insn_{re.escape(name)}\s", out), (name, out)
    assert "current probe" not in out  # nothing read from firmware memory
    assert re.search(r"\s+probe_insn_rdtsc\s+return trap \+2\s+0f 31$", out, re.M), out  # bytes from the ELF
    # every name it prints is one `break` takes
    for label in re.findall(r"^\s+0x[0-9a-f]+\s+(probe_insn_\w+)", out, re.M)[:3]:
        assert re.search(r"^Breakpoint 1 at 0x", gdb_batch(f"break {label}"), re.M), label


@pytest.mark.gdb
@pytest.mark.tcg
def test_hardware_slots_and_vmcb_before_and_after_its_first_exit(tmp_path, artifacts, no_leftovers):
    out = run_batch(tmp_path, "tcg", [
        "lab-kvm kvm_pvm",                # TCG takes hardware breakpoints too: count the slots
        "tbreak *svm_vmrun_insn", "break *0x100000", "break *0x100010", "break *0x100020",
        "break *0x100030",                # a fifth
        "continue", "lab-vmcb",           # at kmain: SVM off
        "continue", "lab-vmcb",           # at the first VMRUN: no exit yet
        "tbreak *svm_vmexit_return", "continue", "lab-vmcb",
    ])
    assert "EFER.SVME=0: SVM is off" in out, out
    assert "break: all 4 hardware breakpoint slots (DR0-DR3) are in use" in out, out
    assert "no #VMEXIT yet (exit code 0 is CR0_READ, which is not intercepted)" in out, out
    assert re.search(r"exit\s+0x[0-9a-f]+ (?!CR0_READ)[A-Z]", out), out  # a real exit afterwards


@pytest.mark.gdb
@pytest.mark.tcg
def test_lab_cpl_after_qemu_exited(tmp_path, artifacts, no_leftovers):
    out = run_batch(tmp_path, "tcg", ["delete", "continue", "lab-cpl"])
    assert "Remote connection closed" in out or "exited" in out, out
    assert "lab-cpl: no CPU to read: QEMU is not attached" in out, out


# -- pure decoders ---------------------------------------------------------------------------
def test_elf_symbols_agree_with_nm(artifacts):
    path = str(debug.artifacts().symbols)
    ours = x86.elf_symbols(path)
    nm = subprocess.run(["nm", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    theirs = {}
    for row in nm.splitlines():
        addr, kind, name = row.split()
        if kind.lower() in "tdbr" and name not in theirs:
            theirs[name] = int(addr, 16)
    assert theirs and all(name in ours for name in theirs)
    assert sum(ours[n] == a for n, a in theirs.items()) >= len(theirs) - 2  # duplicate static names


def test_elf_bytes_are_the_linked_instruction(artifacts):
    path = str(debug.artifacts().symbols)
    rdtsc = x86.elf_symbols(path)["probe_insn_rdtsc"]
    assert x86.elf_bytes(path, rdtsc, 2) == b"\x0f\x31"  # RDTSC is 0F 31 (SDM Vol. 2B)
    assert x86.elf_bytes(path, 0x10, 2) is None  # no section there


def test_elf_symbols_of_a_non_elf_is_empty(tmp_path):
    (tmp_path / "x").write_bytes(b"not an elf" * 10)
    assert x86.elf_symbols(str(tmp_path / "x")) == {}


def test_probe_stubs_pair_each_label_with_its_return_trap():
    syms = {"probe_insn_rdtsc": 0x2000, "probe_done_rdtsc": 0x2002, "probe_insn_hlt": 0x1000,
            "probe_done_hlt": 0x1001, "probe_insn_odd": 0x3000, "kmain": 0x10}
    assert lab_gdb.probe_stubs(syms) == [("hlt", 0x1000, 0x1001), ("rdtsc", 0x2000, 0x2002), ("odd", 0x3000, None)]


def _vmcb(**kw) -> dict[str, int]:
    v = dict.fromkeys((name for name, _, _ in x86.VMCB_CONTROL + x86.VMCB_SAVE), 0)
    v.update(kw)
    return v


@pytest.mark.parametrize("v, efer, state", [
    (_vmcb(asid=1, intercept_misc2=1, rip=0x1000040), 0, "EFER.SVME=0"),
    (_vmcb(), x86.EFER_SVME, "not set up yet"),
    (_vmcb(asid=1, intercept_misc2=1, rip=0x1000040), x86.EFER_SVME, "no #VMEXIT yet"),
    (_vmcb(asid=1, intercept_misc2=1, rip=0x1000040, intercept_cr=1), x86.EFER_SVME, None),  # CR0_READ is real
    (_vmcb(asid=1, intercept_misc2=1, rip=0x1000040, exit_code=0x72), x86.EFER_SVME, None),
])
def test_vmcb_exit_state(v, efer, state):
    got = x86.vmcb_exit_state(v, efer)
    assert (got is None) if state is None else got.startswith(state)


def test_a_stale_address_in_a_walkthrough_is_missing():
    """The control for the walkthroughs: an address that moved is a line not found."""
    out = "0x10aa90 <probe_insn_rdtsc>:\t0x0f\t0x31\n"
    assert not missing_lines(["0x10aa90 <probe_insn_rdtsc>:    0x0f    0x31"], out)
    assert missing_lines(["0x10aa10 <probe_insn_rdtsc>:    0x0f    0x31"], out)
