"""The GDB witness: a second observer that trusts only the CPU and the build.

Three pieces (docs/gdb.md):

- **the plan** (`witness_plan`): where GDB stops the CPU, derived from the expectation plan
  and what the accelerator allows (`capabilities`): the IDT stubs of the vectors the
  expected outcomes need (the CPU entering `isr_stub_<n>` *is* vector n), and `hv_main`,
  where the host's probe phase ends. No firmware order, no stop counts.
- **the session** (`GdbWitness`): GDB/MI attaches to the paused QEMU, loads the GDB-side
  collector (lab/gdb/collector.py), which records the CPU state at every stop and lets the
  CPU go on, and serves the one real stop at `hv_main`.
- **the reading** (`read_stops`): a pure function from the recorded stops and the ELF64 to
  observations. Which instruction: the RIP the CPU pushed, resolved to a `probe_insn_<stub>`
  / `probe_done_<stub>` label, with the bytes the CPU executed compared to the binary's.
  Which CPL: the CS the CPU pushed. Which gate: CR4 at the stop. Which outcome: the vector of
  the stub the CPU entered and the error code it pushed; `ok` only from the return trap
  right after the instruction (a #UD at `probe_done_<stub>`, CS of the probe's ring).
  Never memory the firmware writes about itself.

The judge compares the readings with the serial records (lab/judge.py): a check GDB should
have seen but saw executed never, or more than once, disagrees with the serial witness.
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from . import catalogue, processes
from .elf import Image
from .gdb import x86
from .gdbmi import HW_BREAKPOINT_SLOTS, TARGET_CLOSED, Gdb, GdbTimeout

UNREACHED = "unreached"  # the session broke before it could look: the judge makes it `error`
NEVER = "never executed"  # the session was whole and the CPU never ran it: a disagreement
UNREAD = "?"  # a gate the stop holds no reading of
COLLECTOR = Path(__file__).resolve().parent / "gdb" / "collector.py"
END_OF_HOST_PROBES = "hv_main"
WITNESS_RDMSR = "witness_rdmsr"  # firmware/probe.c: the RDMSR the CPU runs for the witness
# The real-mode RDTSC runs from a copy below 1 MiB (firmware/realmode.S): its entry no-op and
# instruction there, as absolute ELF symbols.
REALMODE, REALMODE_PRE, REALMODE_INSN = "realmode", "realmode_pre_copy", "realmode_rdtsc_copy"
# The RSM of the lab's SMI handler in SMRAM (firmware/smm_entry.S), absolute: QEMU stops at the
# linear address, GDB knows the stop by RIP (CS.base is not in GDB's PC): a watch at each.
SMM_RSM, SMM_RSM_RIP = "smm_rsm_copy", "smm_rsm_rip"
GUEST_CPUID_INSN, GUEST_CPUID_DONE = "guest_cpuid_insn", "guest_cpuid_done"  # guests/guest/entry.S
VMEXIT_AT, VMCB_AT = "svm_vmexit_return", "svm_vmcb"  # firmware/svm_run.S, svm.c
SVM_EXIT_CPUID = 0x72  # APM Vol. 2 App. C
NOP2 = bytes.fromhex("6690")  # xchg %ax,%ax: where a stub starts with it, the witness steps past  # the host's probe phase is over when the CPU gets here


# -- what each accelerator lets GDB do -------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    name: str
    software_breakpoints: bool
    hw_slots: int | None  # None: no limit that matters (TCG checks breakpoints at translation)
    stops_above_cpl0: bool  # a breakpoint on CPL1-3 code stops GDB
    stops_in_guest: bool  # a breakpoint in a nested (SVM/VMX) guest stops GDB
    note: str
    stops_in_soft_guest: bool = True  # breakpoints keep working while the software host runs its guest
    soft_guest_note: str = ""
    # GDB stops the CPU at each probe's entry no-op (software breakpoints, at any CPL) and single
    # steps the instruction: the chain instruction -> delivery. "": it can, else why it cannot.
    no_insn_stops: str = ""

    @property
    def insn_stops(self) -> bool:
        return not self.no_insn_stops


def capabilities(accel: str, kvm_module: str | None) -> Capabilities:
    """docs/gdb.md "What each accelerator allows". TCG: QEMU's gdbstub checks software
    breakpoints as it translates, at any CPL and in an SVM guest. KVM: hardware breakpoints
    (DR0-DR3, 4 at once); kvm_intel and kvm_amd stop GDB at any CPL through
    KVM_SET_GUEST_DEBUG; kvm_pvm only on CPL0 code (a breakpoint at CPL>0 becomes the guest's
    #DB: docs/platform.md). An unknown KVM module gets the narrowest set."""
    if accel == "tcg":
        return Capabilities("tcg", True, None, True, True, "software breakpoints anywhere")
    if accel == "kvm" and kvm_module in ("kvm_intel", "kvm_amd"):
        # The IDT stubs keep hardware breakpoints (4 slots); the probes' entry no-ops take QEMU's
        # KVM software breakpoints (an INT3 KVM intercepts: KVM_GUESTDBG_USE_SW_BP, at any CPL),
        # which GDB steps over as usual (no resume past the no-op: docs/gdb.md).
        return Capabilities(kvm_module, False, HW_BREAKPOINT_SLOTS, True, False,
                            "hardware breakpoints at any CPL, none in a nested guest; software ones at the probes")
    if kvm_module == "kvm_pvm":
        return Capabilities(kvm_module, False, HW_BREAKPOINT_SLOTS, False, False,
                            "hardware breakpoints on CPL0 code only", False,
                            "kvm_pvm: a hardware breakpoint hit while the software host runs its guest reaches "
                            "the guest as #DB instead of stopping GDB (measured: the boot ends with an unexpected "
                            "#DB at the host's IDT stub; docs/gdb.md)",
                            NO_INSN_STOPS_PVM)
    return Capabilities(kvm_module or accel, False, HW_BREAKPOINT_SLOTS, False, False,
                        "hardware breakpoints on CPL0 code only",
                        no_insn_stops=f"{kvm_module or accel}: not known to stop GDB on CPL1-3 code or to take "
                                      "software breakpoints")


NO_INSN_STOPS_PVM = ("kvm_pvm stops GDB on CPL0 code only and takes no software breakpoints (docs/gdb.md)")
# What GDB does not see of a check where it cannot stop at the instruction: the links of the chain
# left out, for the report (per check: lab.judge puts it in the check's details).
MISSING_LINKS = ("no stop at the instruction: the CPU's CS, SS, RFLAGS, CR4 and bytes before it, GDB's decoding "
                 "of them and the single step that shows nothing else ran are not seen; the trap's frame, the "
                 "IDT gate, the stack switch and the gates read at the trap are")


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Watch:
    location: str  # an ELF symbol; the breakpoint goes on its address
    kind: str  # trap | end (lab/gdb/collector.py)
    vector: int | None = None
    error_code: bool = False
    hw: bool = False
    ends: tuple[str, ...] = ()
    # (port, stub): the TSS I/O bitmap bytes of that port, read through TR at a stop in that stub
    io: tuple[tuple[int, str], ...] = ()
    # (MSR, stub): at a trap whose RIP is in that probe stub, the CPU runs `witness_rdmsr` for it
    msr: tuple[tuple[int, str], ...] = ()
    stub: str = ""  # insn: the probe stub whose entry no-op it is
    sys: bool = False  # trap: read IDTR/TR, the gate and the TSS here (no insn watch before it)
    arm: str = ""  # regs: enable ("-": disable) the watch at that location when it stops here
    vmcb: str = ""  # vmexit: the symbol of the VMCB whose exit fields it reads

    def spec(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, (), False) or k == "kind"}


@dataclass(frozen=True)
class WitnessPlan:
    accel: str
    caps: Capabilities
    watches: tuple[Watch, ...]
    checks: tuple[str, ...]  # check ids GDB must read (each exactly once)
    unwitnessed: dict[str, str] = field(default_factory=dict)  # check id -> why GDB cannot
    missing: dict[str, str] = field(default_factory=dict)  # check id -> links of the chain GDB cannot see

    @property
    def chained(self) -> frozenset[str]:
        """The probe stubs GDB stops at before their instruction (read_stops: their traps need it)."""
        return frozenset(w.stub for w in self.watches if w.kind == "insn")

    @property
    def vectors(self) -> tuple[int, ...]:
        return tuple(w.vector for w in self.watches if w.kind == "trap")

    def validate(self) -> None:
        if len({w.location for w in self.watches}) != len(self.watches):
            raise ValueError("one watch per location")
        hw = sum(1 for w in self.watches if w.hw)
        if self.caps.hw_slots is not None and hw > self.caps.hw_slots:
            raise ValueError(f"the plan needs {hw} hardware breakpoints; x86 has {self.caps.hw_slots}")


def _vector_of(value: str | None) -> int | None:
    """The vector a value in the record notation reaches CPL0 through: an exception's own,
    or #UD for `ok` and for every non-exception value (the return trap after the stub)."""
    if not value or not value.startswith("#"):
        return 6
    name = value[1:].split("(")[0]
    for vec, mn in x86.EXC_MNEMONICS.items():
        if mn == name:
            return vec
    return int(name[1:]) if name.startswith("V") and name[1:].isdigit() else None


def _vector_set(exp, deviant: dict) -> set[int]:
    vs = {_vector_of(exp.expected)} | ({_vector_of(deviant[exp.id])} if exp.id in deviant else set())
    return {v for v in vs if v is not None}


def witness_plan(accel: str, kvm_module: str | None, expectations: Iterable,
                 deviant: dict[str, str | None] | None = None) -> WitnessPlan:
    """Stops for every expected check the accelerator lets GDB see. `expectations`: the
    judge's plan (lab.expectations.plan); `deviant`: check id -> a known deviation's value
    (None: the firmware does not run it), so its stop is planned for too.

    Host probes trap into the host's IDT stubs. A guest under SVM traps into its own IDT's
    stubs (`guest_isr_stub_<n>`; needs stops inside a guest). A guest under the software host
    traps into the host's IDT (the CPU's only IDT): the host stubs stay armed for it."""
    caps = capabilities(accel, kvm_module)
    deviant = deviant or {}
    entries = {(r.scope, r.probe, tuple(r.params.items())): r.entry
               for scope in ("host", *catalogue.GUEST_SCOPES, catalogue.SMM_SCOPE) for r in catalogue.rows(scope)}
    host_vecs: dict[str, set[int]] = {}  # check id -> vectors of the host IDT it needs
    guest_vecs: dict[str, set[int]] = {}  # ... of the guest's own IDT
    entry_stops: dict[str, str] = {}  # check id -> label to stop at
    unwitnessed: dict[str, str] = {}
    planned: dict[str, catalogue.Probe] = {}  # check id -> its catalogue entry
    cpuid_checks: list[str] = []  # the guest's CPUID, read at guest_cpuid_insn/_done (and its exit)
    realmode: list[str] = []  # the real-mode RDTSC (firmware/realmode.S)
    smm: list[str] = []  # the lab's SMI handler (firmware/smm_entry.S)
    for exp in expectations:
        entry = entries.get((exp.scope, exp.probe, tuple(exp.params.items())))
        if entry is None or exp.skip or (exp.id in deviant and deviant[exp.id] is None):
            continue
        planned[exp.id] = entry
        how = entry.witness_in(exp.scope)
        if how == "realmode":  # no IDT, no trap: only the chain's stop and step can see it
            if caps.insn_stops:
                realmode.append(exp.id)
            else:
                unwitnessed[exp.id] = f"{caps.name}: runs at boot in real mode, with no trap to read; only a stop " \
                                      f"at the instruction could see it ({caps.no_insn_stops})"
        elif how == catalogue.SMM_STOP:  # the lab's SMI handler, in SMM
            if accel == "tcg":
                smm.append(exp.id)
            else:
                unwitnessed[exp.id] = f"{caps.name}: GDB stops in SMM measured under TCG only (docs/gdb.md)"
        elif how.startswith("none"):
            unwitnessed[exp.id] = how.removeprefix("none: ")
        elif exp.scope == "guest-soft" and not caps.stops_in_soft_guest:
            unwitnessed[exp.id] = caps.soft_guest_note
        elif how == "cpuid" and exp.scope == "guest-soft":
            cpuid_checks.append(exp.id)  # CPUID at the guest's CPL1: natively, or a #GP the host answers
        elif exp.scope in ("host", "guest-soft"):
            host_vecs[exp.id] = _vector_set(exp, deviant)
        elif not caps.stops_in_guest:
            unwitnessed[exp.id] = f"{caps.name}: GDB cannot stop inside a nested guest"
        elif how == "entry":
            entry_stops[exp.id] = "guest_start"
        elif how == "cpuid":
            cpuid_checks.append(exp.id)
        else:
            guest_vecs[exp.id] = _vector_set(exp, deviant)
    hw = caps.hw_slots is not None
    # The vectors the expected outcomes need, most needed first, while hardware slots last
    # (one goes to the end marker). TCG has no slot limit, but each breakpoint costs QEMU a
    # re-translation of its page, so it gets the same derived set.
    need: dict[int, int] = {}
    for vs in host_vecs.values():
        for v in vs:
            need[v] = need.get(v, 0) + 1
    ranked = sorted(need, key=lambda v: (-need[v], v))
    vectors = sorted(ranked[: caps.hw_slots - 1] if hw else ranked)
    # Controls no register at the stop holds, read only at the stops of the stubs whose planned
    # checks need them: memory the CPU consults (the TSS I/O bitmap), and MSRs (no gdbstub
    # register: the CPU itself runs an RDMSR for each, one single step).
    def at_stubs(reg: str, what) -> tuple:
        return tuple(sorted({(*what(g), e.stub.name) for cid, e in planned.items() if cid in host_vecs and e.stub
                             for g in e.gates if g.reg == reg}))

    io = at_stubs("iomap", lambda g: (g.bit,))
    msr = at_stubs("msr", lambda g: (g.msr,))
    # The chain instruction -> delivery: a stop at each planned host stub's entry no-op (software
    # breakpoints: they need no slot). Where the accelerator cannot, its traps read what the CPU
    # used to deliver them (IDTR, TR, the gate, the TSS) at the trap itself.
    chained = sorted({e.stub.name for cid, e in planned.items() if cid in host_vecs and cid.startswith("host.")
                      and e.stub is not None and e.stub.image == "host"}) if caps.insn_stops else []
    watches = [Watch("isr_stub_3_exc" if v == 3 else f"isr_stub_{v}", "trap", v, v in x86.EXC_WITH_ERROR_CODE, hw,
                     io=() if caps.insn_stops else io, msr=msr, sys=not caps.insn_stops)
               for v in vectors]
    watches += [Watch(f"probe_pre_{name}", "insn", stub=name, io=tuple(x for x in io if x[1] == name))
                for name in chained]
    if realmode:
        watches.append(Watch(REALMODE_PRE, "insn", stub=REALMODE))
    if smm:
        watches += [Watch(SMM_RSM, "regs", hw=hw), Watch(SMM_RSM_RIP, "regs", hw=hw)]
    # The host's probe phase ends at hv_main: its stubs go there, unless a guest under the
    # software host (which traps into the same stubs) is to be witnessed too.
    if not any(cid.startswith("guest-soft.") for cid in host_vecs):
        watches.append(Watch(END_OF_HOST_PROBES, "end", hw=hw, ends=tuple(w.location for w in watches)))
    if guest_vecs:
        gvecs = sorted({v for vs in guest_vecs.values() for v in vs})
        watches += [Watch(f"guest_isr_stub_{v}", "trap", v, v in x86.EXC_WITH_ERROR_CODE, hw) for v in gvecs]
    watches += [Watch(loc, "regs", hw=hw) for loc in sorted(set(entry_stops.values()))]
    if cpuid_checks:
        # The #VMEXIT watch is armed only from the guest's CPUID to its return (3 stops, not one
        # per exit): the collector enables it at guest_cpuid_insn and disables it at guest_cpuid_done.
        svm = any(cid.startswith("guest-svm.") for cid in cpuid_checks)
        cpuid_hw = hw and not caps.insn_stops  # a hardware KVM takes software breakpoints here
        watches += [Watch(GUEST_CPUID_INSN, "regs", hw=cpuid_hw, arm=VMEXIT_AT if svm else ""),
                    Watch(GUEST_CPUID_DONE, "regs", hw=cpuid_hw, arm=f"-{VMEXIT_AT}" if svm else "")]
        if svm:
            watches.append(Watch(VMEXIT_AT, "vmexit", hw=hw, vmcb=VMCB_AT))
    checks = list(entry_stops) + list(guest_vecs) + cpuid_checks + realmode + smm
    for cid, vs in host_vecs.items():
        # A chained stub's faults are seen by the single step, wherever its IDT sends the CPU: only
        # its return trap (#UD) needs a watch.
        if chained and planned[cid].stub is not None and planned[cid].stub.name in chained:
            vs = vs & {6}
        missing = vs - set(vectors)
        if missing:
            unwitnessed[cid] = (f"{caps.name}: no hardware breakpoint left for vector "
                                f"{', '.join(x86.exception_value(v) for v in sorted(missing))}")
        else:
            checks.append(cid)
    missing = {cid: f"{caps.name}: {MISSING_LINKS} ({caps.no_insn_stops})" for cid in checks
               if cid.startswith("host.") and not caps.insn_stops}
    plan = WitnessPlan(accel, caps, tuple(watches), tuple(checks), unwitnessed, missing)
    plan.validate()
    return plan


# -- the reading: CPU stops -> observations (pure) ---------------------------------------------
@dataclass(frozen=True)
class Reading:
    check_id: str
    value: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stub:
    name: str
    insn: int  # probe_insn_<name>
    done: int  # probe_done_<name>
    code: bytes  # the binary's bytes from insn to done


def stubs_of(image: Image, which: str = "host") -> dict[str, Stub]:
    out = {}
    for s in catalogue.stubs(which):
        insn, done = image.symbols.get(f"probe_insn_{s.name}"), image.symbols.get(f"probe_done_{s.name}")
        if insn is not None and done is not None:
            out[s.name] = Stub(s.name, insn, done, image.read(insn, done - insn))
    return out


def _frame(stop: dict, word: int = 8) -> dict | None:
    """The frame the CPU pushed on the stack at an IDT stub: [error code,] RIP, CS, RFLAGS,
    RSP, SS as 8-byte words (64-bit mode, SDM Vol. 3A 6.14.1), or EIP, CS, EFLAGS as 4-byte
    words with ESP, SS only from CPL>0 (`word=4`: the 32-bit host, SDM Vol. 3A 6.12.1)."""
    if not stop.get("stack"):
        return None
    raw = bytes.fromhex(stop["stack"])
    off = word if x86.EXC_WITH_ERROR_CODE.__contains__(stop["vector"]) else 0
    err = int.from_bytes(raw[0:word], "little") if off else 0
    rip, cs, rflags, rsp, ss = (int.from_bytes(raw[off + word * i:off + word * (i + 1)], "little") for i in range(5))
    if word == 4 and not cs & 3:
        rsp = ss = None  # no stack switch: the CPU pushed neither
    return {"error_code": err, "rip": rip, "cs": cs, "rflags": rflags, "rsp": rsp, "ss": ss}


def _decode_cpuid(regs: dict, how: str) -> str:
    """`bytes:bdc` -> 4 bytes each of EBX, EDX, ECX; `bit:c31` -> ECX bit 31."""
    kind, spec = how.split(":")
    reg = {"a": "rax", "b": "rbx", "c": "rcx", "d": "rdx"}
    if kind == "bytes":
        return b"".join((regs[reg[r]] & 0xFFFFFFFF).to_bytes(4, "little") for r in spec).decode("latin-1")
    return str(regs[reg[spec[0]]] >> int(spec[1:]) & 1)


def read_stops(stops: list[dict], image: Image, guest: Image | None = None,
               guest_scope: str | None = None,
               chained: frozenset[str] = frozenset()) -> tuple[dict[str, list[Reading]], list[dict]]:
    """Recorded stops -> (check id -> readings, in stop order; stops the reader could not
    place). Pure: tests feed it recorded or synthetic stops.

    A stop counts only where the CPU itself delivered it: the host's IDT stubs (host probes,
    and a guest under the software host, whose traps the CPU delivers to the host's IDT) and
    the guest's own IDT stubs for a guest under SVM/VMX (under the software host the host,
    not the CPU, enters those).

    `chained`: the host stubs the session stopped at before their instruction (insn watches).
    Their trap counts only as the end of that chain: the stop at the entry no-op (the CPU's
    CS, SS, RFLAGS, CR4 and the bytes there, decoded by GDB and compared with the catalogue's
    instruction), one single step (nothing else ran), and the delivery the step ended in (the
    IDT gate the CPU used, the frame and the stack it pushed). Anything that does not fit is
    a problem named in the reading's value, so the judge calls it a disagreement."""
    host_stubs = stubs_of(image)
    guest_stubs = stubs_of(guest, "guest") if guest is not None else {}
    word = image.bits // 8
    lstar = image.symbols.get("syscall_entry")
    out: dict[str, list[Reading]] = {}
    stray: list[dict] = []
    checkpoint: dict | None = None  # the last checkpoint trap (SYSCALL stubs): CS and RSP there
    pending: dict | None = None  # the last insn stop, until the trap that closes its chain
    cpuid_pre: dict | None = None  # the guest's last stop at its CPUID ...
    exits: list[dict] = []  # ... and the #VMEXITs since
    smm_stops: list[dict] = []  # the lab's SMI handler at its RSM, in SMM

    def flush() -> None:  # an insn stop no trap closed: its reading from what the step showed
        nonlocal pending
        if pending is not None and pending.get("stub") == REALMODE:
            _realmode(pending, image, out)
        elif pending is not None and pending.get("stub") in host_stubs:
            _insn_only(pending, host_stubs[pending["stub"]], image, word, out, stray)
        pending = None

    # kvm_pvm's traps take IDTR/TR from the first trap's reading: the end of the host's probes
    # read them again, and a change in between breaks every reading that relied on them.
    first_sys = next((s["sys"] for s in stops if s.get("kind") == "trap" and s.get("sys")), None)
    end_sys = next((s["sys"] for s in stops if s.get("kind") == "sys-end"), None)
    moved = ([f"IDTR/TR changed during the host's probes ({first_sys} at the first trap, {end_sys} at the end)"]
             if first_sys is not None and end_sys is not None and end_sys != first_sys else [])
    for stop in stops:
        regs = stop.get("regs") or {}
        kind = stop.get("kind")
        if kind == "insn":
            flush()
            pending = stop
            continue
        if kind == "vmexit":
            exits.append(stop)
            continue
        if kind == "regs" and stop["at"] in (GUEST_CPUID_INSN, GUEST_CPUID_DONE):
            flush()
            if stop["at"] == GUEST_CPUID_INSN:
                cpuid_pre, exits = stop, []
            else:
                _guest_cpuid(cpuid_pre, exits, stop, guest, guest_scope, out, stray)
                cpuid_pre, exits = None, []
            continue
        if kind == "regs" and stop["at"] in (SMM_RSM, SMM_RSM_RIP):
            smm_stops.append(stop)
            continue
        if kind == "regs":  # a stop at a label: the CPL the CPU runs it at
            flush()
            for entry in catalogue.CATALOGUE:
                if guest_scope in entry.scopes and entry.witness_in(guest_scope) == "entry":
                    params, value = _params(entry, regs["cs"] & 3, regs, {}, "ok")
                    _add(out, guest_scope, entry.probe, params, value,
                         {"at": stop["at"], "cs": f"{regs['cs']:#x}", "rip": f"{regs['rip']:#x}",
                          "saw": "the guest's first instruction"})
            continue
        if kind != "trap":
            flush()
            continue
        frame = _frame(stop, word)
        if frame is None:
            flush()
            continue
        rip, vector = frame["rip"], stop["vector"]
        cpl = frame["cs"] & 3
        evidence = {"vector": vector, "rip": f"{rip:#x}", "frame.cs": f"{frame['cs']:#x}",
                    "cs": f"{regs['cs']:#x}", "cr4": f"{regs['cr4']:#x}", "at": stop["at"]}
        if stop.get("at_rip"):
            evidence["bytes"] = stop["at_rip"][:8]
        in_guest_idt = stop["at"].startswith("guest_")
        if rip == lstar and vector == 6 and not in_guest_idt:  # the LSTAR entry's return trap
            flush()
            stub = host_stubs.get("return_syscall")
            linked = checkpoint is not None and checkpoint["rsp"] == frame["rsp"] and stub is not None \
                and regs["rcx"] == stub.done  # SYSCALL saved the address after itself in RCX
            if not linked:
                stray.append({**evidence, "why": "SYSCALL entry without its checkpoint at a probe stub"})
                continue
            params = {"from_cpl": str(checkpoint["cpl"]), "via": "syscall"}
            evidence.update({"from.cs": f"{checkpoint['cs']:#x}", "rcx": f"{regs['rcx']:#x}",
                             **checkpoint["evidence"]})
            _add(out, "host", "cpl-return", params, _with_problems(str(cpl), checkpoint["problems"]), evidence)
            checkpoint = None
            continue
        scope, img = "host", image
        stub = next((s for s in host_stubs.values() if s.insn <= rip <= s.done), None)
        if stub is None or in_guest_idt:
            stub = next((s for s in guest_stubs.values() if s.insn <= rip <= s.done), None)
            scope, img = guest_scope, guest
            # Which IDT the CPU used for this guest: its own under SVM/VMX, the host's (soft).
            if stub is not None and in_guest_idt == (guest_scope == "guest-soft"):
                flush()
                continue
        if stub is None or scope is None:
            flush()
            continue  # not a probe: the firmware's own traps (ring plumbing, the hosts' work)
        spec = next(s for s in catalogue.stubs(None) if s.name == stub.name)
        pre = None
        if scope == "host" and pending is not None and pending.get("stub") == stub.name:
            pre, pending = pending, None
        flush()
        completed = rip == stub.done and vector == 6
        problems: list[str] = []
        after = regs
        if scope == "host" and stub.name in chained:
            problems, evidence_chain = _chain_problems(pre, stop, frame, stub, spec, image, word)
            evidence.update(evidence_chain)
            if pre is not None:
                after = pre.get("after") or regs  # the CPU right after the instruction
        else:
            problems = _trap_problems(stop, frame, stub, image, word, scope == "host")
            if stop.get("sys"):
                problems += moved
            # What the CPU executed at RIP must be what the binary has there.
            executed = bytes.fromhex(stop.get("at_rip") or "")
            binary = img.read(rip, max(1, stub.done - rip))
            if not completed and executed[: len(binary)] != binary:
                evidence["binary"] = binary.hex()
                problems.append(f"the CPU executed {executed[: len(binary)].hex()} at {rip:#x}, the binary has "
                                f"{binary.hex()}")
            evidence["saw"] = "the trap only" if scope == "host" else "the trap at the guest's own IDT" \
                if in_guest_idt else "the guest's trap at the host's IDT"
        if spec.continue_at and rip == stub.insn and vector == 6:
            checkpoint = {"cpl": cpl, "cs": frame["cs"], "rsp": frame["rsp"], "problems": problems,
                          "evidence": {k: v for k, v in evidence.items() if k in ("saw", "insn", "chain")}}
            continue
        outcome = "ok" if completed else x86.exception_value(vector, frame["error_code"])
        gates_from = pre if pre is not None else stop
        for entry in catalogue.by_stub(stub.name):
            if scope not in entry.scopes or entry.witness_in(scope).startswith("none"):
                continue
            # CR4 as the instruction ran under it (at the stop before it, where there was one)
            cr4 = pre["regs"]["cr4"] if pre is not None else regs["cr4"]
            params, value = _params(entry, cpl, {**after, "cr4": cr4}, frame, outcome,
                                    io_readings(gates_from), msr_readings(stop))
            unread = [k for k, v in params.items() if v == UNREAD]
            if unread:  # the row cannot be named: its check stays unread (never executed / unreached)
                stray.append({**evidence, "why": f"{entry.probe}: no reading of {', '.join(unread)} at this stop"})
                continue
            _add(out, scope, entry.probe, params, _with_problems(value, problems), evidence)
    flush()
    if smm_stops:
        _smm(smm_stops, out)
    return out, stray


def _guest_cpuid(pre: dict | None, exits: list[dict], done: dict, guest: Image | None, scope: str | None,
                 out: dict, stray: list) -> None:
    """The guest's CPUID from what the CPU did: at guest_cpuid_insn the leaf the guest asked for
    (RAX, and its CS), under SVM the #VMEXIT the CPU took on it (exit code CPUID, the guest's RIP
    at that CPUID and the same leaf in the VMCB it just wrote: APM Vol. 2 15.5.2, App. C), then the
    registers the guest got back at guest_cpuid_done: the check's value."""
    if guest is None or scope is None:
        return
    insn, after = guest.symbols.get(GUEST_CPUID_INSN), guest.symbols.get(GUEST_CPUID_DONE)
    evidence = {"at": done["at"], "rip": f"{done['regs']['rip']:#x}"}
    if pre is None:
        stray.append({**evidence, "why": "the guest got CPUID's registers back with no stop at its CPUID"})
        return
    leaf = pre["regs"]["rax"] & 0xFFFFFFFF
    entry = next((e for e in catalogue.CATALOGUE if scope in e.scopes and e.cpuid and e.cpuid[0] == leaf), None)
    if entry is None:
        return  # a leaf the guest asks for itself, no check's
    problems = []
    evidence.update({"leaf": f"{leaf:#x}", "guest.cs": f"{pre['regs']['cs']:#x}",
                     "saw": "the guest's CPUID" + (", its #VMEXIT" if scope == "guest-svm" else "")
                            + " and the registers it got back"})
    if scope == "guest-svm":
        cpuid_exits = [x for x in exits if (x.get("vmcb") or {}).get("exit_code") == SVM_EXIT_CPUID]
        if len(exits) != 1 or len(cpuid_exits) != 1:
            problems.append(f"{len(cpuid_exits)} CPUID #VMEXITs among {len(exits)} between the guest's CPUID and "
                            "its return, not one")
        else:
            vmcb = cpuid_exits[0]["vmcb"]
            evidence.update({"exit": f"{vmcb['exit_code']:#x}", "exit.rip": f"{vmcb['rip']:#x}",
                             "exit.cpl": str(vmcb["cpl"])})
            if vmcb["rip"] != insn or vmcb["rax"] & 0xFFFFFFFF != leaf:
                problems.append(f"the CPUID #VMEXIT was at guest RIP {vmcb['rip']:#x} leaf {vmcb['rax']:#x}, the "
                                f"guest's CPUID is at {insn:#x} leaf {leaf:#x}")
    if done["regs"]["rip"] != after:
        problems.append(f"the guest resumed at {done['regs']['rip']:#x}, not after its CPUID")
    params = {k: str(v[0]) for k, v in entry.dims}
    value = _decode_cpuid(done["regs"], entry.cpuid[2])
    _add(out, scope, entry.probe, params, _with_problems(value, problems), evidence)


def _realmode(pre: dict, image: Image, out: dict) -> None:
    """The real-mode RDTSC (firmware/realmode.S): at its entry no-op the CPU has CR0.PE=0 and the
    CR4.TSD the row names, the instruction there is RDTSC (live, and the bytes the build copied),
    and the single step ends right after it (completed: no fault, SDM Vol. 2B RDTSC: TSD binds
    only in protected mode) or in the handler its IVT names (the exception, SDM Vol. 3A 20.1.4)."""
    regs, after = pre["regs"], pre.get("after") or {}
    insn = image.symbols.get(REALMODE_INSN)
    problems = []
    asm = [a[2] for a in pre.get("asm") or []]
    if not asm or not same_instruction(asm[0], "rdtsc"):
        problems.append(f"the CPU was to execute `{asm[0] if asm else '?'}`, the catalogue declares `rdtsc`")
    built = image.read(image.symbols["realmode_rdtsc"], 2)
    if bytes.fromhex(pre.get("bytes") or "")[:2] != built:
        problems.append(f"live bytes {pre.get('bytes', '')[:4]} at the copy, the build has {built.hex()}")
    if regs.get("cr0", 0) & 1:
        problems.append(f"CR0 {regs.get('cr0', 0):#x}: protected mode, not real-address mode")
    if regs["eflags"] & TF:
        problems.append("RFLAGS.TF set before the instruction")
    if after.get("rip") == (insn or -1) + 2 and after.get("cs") == regs["cs"]:
        outcome = "ok"
    else:
        ivt = bytes.fromhex(pre.get("idt") or "")
        target = (after.get("cs", 0) << 4) + after.get("rip", 0)
        vector = next((v for v in range(len(ivt) // 4) if (int.from_bytes(ivt[4 * v + 2:4 * v + 4], "little") << 4)
                       + int.from_bytes(ivt[4 * v:4 * v + 2], "little") == target), None)
        outcome = x86.exception_value(vector) if vector is not None else "?"
        if vector is None:
            problems.append(f"after the instruction the CPU was at {target:#x}: neither after it nor an IVT handler")
    entry = next(e for e in catalogue.CATALOGUE if e.witness_in("host") == REALMODE)
    params, value = _params(entry, 0, regs, {"rflags": regs["eflags"]}, outcome)
    _add(out, "host", entry.probe, params, _with_problems(value, problems),
         {"at": pre["at"], "insn": "; ".join(asm[:1]), "insn.cr0": f"{regs.get('cr0', 0):#x}",
          "insn.cr4": f"{regs['cr4']:#x}", "saw": "the instruction and the state right after it",
          "chain": "insn -> step: completed" if outcome == "ok" else f"insn -> step: {outcome}"})


def _smm(stops: list[dict], out: dict) -> None:
    """The lab's SMI handler, stopped at its RSM in SMRAM (firmware/smm_entry.S): the CPU there is
    in SMM's real-address-like mode (SDM Vol. 3C 32.5.1 Table 32-4: CS = SMBASE >> 4, CR0.PE=PG=0)
    at SMBASE+8000h+offset, which only SMM can fetch. EBX holds the entry's `alter` flag, ECX the
    entries so far: the quiet entries are the smi-entries count; every entry shows its CS and CR0."""
    problems = []
    counts = [s["regs"]["rcx"] & 0xFFFFFFFF for s in stops]
    if counts != list(range(1, len(stops) + 1)):
        problems.append(f"the handler's own entry counts were {counts}, not 1..{len(stops)}")
    quiet = sum(1 for s in stops if not s["regs"]["rbx"] & 0xFFFFFFFF)
    cs = {s["regs"]["cs"] for s in stops}
    cr0 = {s["regs"]["cr0"] & 0x80000001 for s in stops}  # PG | PE
    rips = sorted({s["regs"]["rip"] for s in stops})
    evidence = {"at": SMM_RSM, "stops": str(len(stops)), "rip": ",".join(f"{r:#x}" for r in rips),
                "saw": "the lab's SMI handler at its RSM, in SMM"}
    entry = {e.probe: e for e in catalogue.CATALOGUE if e.witness_in(catalogue.SMM_SCOPE) == catalogue.SMM_STOP}
    for probe, value in (("smi-entries", str(quiet)),
                         ("smm-cs", f"{cs.pop():#x}" if len(cs) == 1 else "differs: " + ",".join(map(hex, sorted(cs)))),
                         ("smm-cr0", f"{cr0.pop():#x}" if len(cr0) == 1 else "differs")):
        params = {k: str(v[0]) for k, v in entry[probe].dims}
        _add(out, catalogue.SMM_SCOPE, probe, params, _with_problems(value, problems), evidence)


def _with_problems(value: str, problems: list[str]) -> str:
    """A reading whose chain of evidence broke: the value with what broke, so it differs from
    any serial record (the judge: witnesses disagree, both values shown)."""
    return f"{value} [GDB: {'; '.join(problems)}]" if problems else value


# -- the chain: the CPU at the instruction, the instruction, its delivery ------------------------
RF, IF, TF = 1 << 16, 1 << 9, 1 << 8  # RFLAGS (SDM Vol. 3A 2.3)
_NUM = re.compile(r"(?<![\w%])-?(?:0x[0-9a-f]+|\d+)")
_REG32 = re.compile(r"%e(ax|bx|cx|dx|sp|bp|si|di)\b")


def _norm_insn(text: str, bits: int = 64) -> tuple[str, str]:
    """(mnemonic, operands) of an AT&T instruction, so GNU as's text and a disassembler's print
    compare: blanks dropped, numbers by value (-16 = -0x10); 32-bit register names as their
    64-bit ones (GDB decodes the 32-bit host's code as x86-64: the same bytes, wider names)."""
    mnem, _, ops = text.strip().lower().partition(" ")
    ops = _NUM.sub(lambda m: str(int(m.group(0), 0)), re.sub(r"\s+", "", ops))
    if bits == 32:
        ops = _REG32.sub(r"%r\1", ops)
    return mnem, ops


def same_instruction(decoded: str, declared: str, bits: int = 64) -> bool:
    """Whether a disassembler's text is the catalogue's instruction: same operands, same
    mnemonic up to the size suffix GNU as takes and disassemblers drop (inb / in)."""
    (m1, o1), (m2, o2) = _norm_insn(decoded, bits), _norm_insn(declared, bits)
    return o1 == o2 and (m1 == m2 or (m1[:-1], m1[-1:]) == (m2, m1[-1:]) and m1[-1:] in "bwlq"
                         or (m2[:-1], m2[-1:]) == (m1, m2[-1:]) and m2[-1:] in "bwlq")


def declared_instructions(spec: catalogue.Stub, bits: int = 64) -> list[str]:
    """The instructions the catalogue declares from probe_insn_<stub> to its return trap, that trap included."""
    text = (spec.asm32 or catalogue.to_32bit(spec.asm)) if bits == 32 else spec.asm
    return [line.strip() for line in text.splitlines() if line.strip()] + ["ud2"]


def _new_stack(tss_hex: str | None, gate: dict, before_cpl: int, before_rsp: int | None, word: int) -> int | None:
    """Where the CPU builds the frame (SDM Vol. 3A 6.12.1, 6.14.2-6.14.5): the TSS's stack for the
    handler's ring (RSP0) on a privilege change, the IST stack a 64-bit gate names, else the
    current stack; 64-bit mode aligns it down to 16 bytes."""
    handler_cpl = gate["selector"] & 3
    if gate["ist"] or before_cpl != handler_cpl:
        if not tss_hex:
            return None
        tss = bytes.fromhex(tss_hex)
        off = (0x24 + 8 * (gate["ist"] - 1)) if gate["ist"] else 4 + word * 2 * handler_cpl
        base = int.from_bytes(tss[off:off + word], "little")
    elif before_rsp is None:
        return None
    else:
        base = before_rsp
    return base & ~0xF if word == 8 else base


def _delivery_problems(vector: int, before: dict | None, handler: dict, frame: dict, gate_hex: str | None,
                       tss_hex: str | None, word: int, expect_rip: int, may_change: int = 0) -> list[str]:
    """What an exception delivered by the CPU implies and a forgery must fake: the IDT gate the
    CPU used sends it where it is, with the gate's CS; the frame holds the interrupted state
    (`before`: the CPU's registers at the instruction; None: not seen), RIP the instruction
    (faults, SDM Vol. 3A 6.5) and the error code exactly for the vectors that push one (the
    handler's RSP is the new stack less that frame, SDM Vol. 3A 6.13, 6.14.2)."""
    problems = []
    if not gate_hex:
        return [f"no reading of IDT gate {vector}"]
    gate = x86.idt_gate(bytes.fromhex(gate_hex), word)
    if not gate["present"] or gate["type"] not in (0xE, 0xF):
        problems.append(f"IDT gate {vector} is no present interrupt or trap gate (type {gate['type']:#x})")
    if gate["offset"] != handler["rip"]:
        problems.append(f"IDT gate {vector} sends the CPU to {gate['offset']:#x}, the trap was at {handler['rip']:#x}")
    if handler["cs"] != gate["selector"]:
        problems.append(f"the handler runs with CS {handler['cs']:#x}, IDT gate {vector} loads {gate['selector']:#x}")
    if frame["rip"] != expect_rip:
        problems.append(f"the frame's RIP is {frame['rip']:#x}, the instruction is at {expect_rip:#x}")
    if before is not None:
        if frame["cs"] != before["cs"]:
            problems.append(f"the frame's CS is {frame['cs']:#x}, the CPU ran the instruction with {before['cs']:#x}")
        if (frame["rflags"] ^ before["eflags"]) & ~(RF | may_change):
            problems.append(f"the frame's RFLAGS is {frame['rflags']:#x}, the CPU had {before['eflags']:#x}")
        if frame["rsp"] is not None and (frame["rsp"], frame["ss"] & 0xFFFF) != (before["rsp"], before["ss"] & 0xFFFF):
            problems.append(f"the frame's SS:RSP is {frame['ss']:#x}:{frame['rsp']:#x}, the CPU had "
                            f"{before['ss']:#x}:{before['rsp']:#x}")
    before_cpl = (before or frame)["cs"] & 3
    base = _new_stack(tss_hex, gate, before_cpl, before["rsp"] if before else frame["rsp"], word)
    err = vector in x86.EXC_WITH_ERROR_CODE
    pushes = 5 + err if word == 8 or before_cpl != gate["selector"] & 3 else 3 + err
    if base is None and before is None and frame["rsp"] is None:
        pass  # 32-bit, no privilege change, no stop before it: the CPU pushed no ESP to compare with
    elif base is None:
        problems.append("no reading of the stack the CPU switched to (TSS)")
    elif handler["rsp"] != base - word * pushes:
        problems.append(f"RSP at the handler is {handler['rsp']:#x}, the CPU pushes {pushes} words "
                        f"({'with' if err else 'without'} an error code for vector {vector}) below {base:#x}")
    return problems


def _insn_problems(pre: dict, stub: "Stub", spec: catalogue.Stub, image: Image, word: int) -> tuple[list[str], dict]:
    """The CPU at the probe's entry no-op: the instruction there is the catalogue's (GDB's own
    decoding of the live bytes), with the catalogue's inputs, nothing can interrupt it (IF=0,
    TF=0), and QEMU's CPL is CS's RPL."""
    regs, problems = pre["regs"], []
    asm = [a[2] for a in pre.get("asm") or []]
    want = declared_instructions(spec, image.bits)
    decoded = "; ".join(asm) or "?"
    if len(asm) != len(want) or not all(same_instruction(a, w, image.bits) for a, w in zip(asm, want)):
        problems.append(f"the CPU was to execute `{decoded}`, the catalogue declares `{'; '.join(want)}`")
    addrs = [a[0] for a in pre.get("asm") or []]
    if addrs and (addrs[0] != stub.insn or addrs[-1] != stub.done):
        problems.append(f"the instructions do not run from probe_insn_{stub.name} to its return trap")
    live = bytes.fromhex(pre.get("bytes") or "")
    built = image.read(stub.insn, stub.done - stub.insn + 2)
    if live != built:
        problems.append(f"live bytes {live.hex()} at probe_insn_{stub.name}, the binary has {built.hex()}")
    if regs["eflags"] & (IF | TF):
        problems.append(f"RFLAGS {regs['eflags']:#x} before the instruction: IF or TF set, something else could run")
    cpl = (pre.get("sys") or {}).get("cpl")
    if cpl is not None and cpl != regs["cs"] & 3:
        problems.append(f"the CPU's CPL is {cpl}, CS {regs['cs']:#x}")
    mask = (1 << 8 * word) - 1
    for reg, declared in (("rax", spec.rax), ("rcx", spec.rcx)):
        if not declared:
            continue
        if declared.startswith("cr4"):
            want_v = regs["cr4"] | int(declared.partition("|")[2] or "0", 0)
        else:
            want_v = int(declared, 0)
        if regs[reg] & mask != want_v & mask:
            problems.append(f"{reg.upper()} is {regs[reg]:#x} before the instruction, the catalogue gives {want_v:#x}")
    evidence = {"insn": decoded, "insn.cs": f"{regs['cs']:#x}", "insn.ss": f"{regs['ss']:#x}",
                "insn.rflags": f"{regs['eflags']:#x}", "insn.cr4": f"{regs['cr4']:#x}"}
    return problems, evidence


def _chain_problems(pre: dict | None, trap: dict, frame: dict, stub: "Stub", spec: catalogue.Stub, image: Image,
                    word: int) -> tuple[list[str], dict]:
    """The whole chain for a trap of a stub GDB stops at: the stop at the instruction, the single
    step, and the delivery the step ended in (or, when the instruction completed, the #UD of the
    return trap right after it)."""
    if pre is None:
        return [f"no stop at probe_pre_{stub.name} before this trap: the CPU did not enter the stub "
                "at its instruction"], {"saw": "the trap, without the instruction"}
    problems, evidence = _insn_problems(pre, stub, spec, image, word)
    before, after = pre["regs"], pre.get("after") or {}
    idt, tss = pre.get("idt"), pre.get("tss")
    vector = trap["vector"]
    size = 2 * word
    gate_hex = idt[vector * 2 * size:(vector + 1) * 2 * size] if idt else None
    evidence["saw"] = "the instruction and its delivery"
    if after.get("rip") == stub.done:  # it completed: the return trap (a #UD) ended the stub
        if not (vector == 6 and frame["rip"] == stub.done):
            problems.append(f"the instruction completed, but the next trap was vector {vector} at {frame['rip']:#x}")
        flags = IF if any(w.split()[0] in ("cli", "sti") for w in declared_instructions(spec)) else 0
        problems += _delivery_problems(vector, after, trap["regs"], frame, gate_hex, tss, word, stub.done, flags)
        evidence["chain"] = "insn -> step: completed -> #UD at its return trap"
        return problems, evidence
    stepped = x86.vector_at(idt, after.get("rip", -1), word)
    if stepped is None:
        problems.append(f"after the instruction the CPU was at {after.get('rip', 0):#x}: neither its return trap "
                        "nor an exception handler of its IDT")
    elif stepped != vector or trap.get("via") != pre["at"]:
        problems.append(f"the single step delivered vector {stepped}, this trap is vector {vector}")
    problems += _delivery_problems(vector, before, trap["regs"], frame, gate_hex, tss, word, stub.insn)
    evidence["chain"] = f"insn -> step: vector {vector} delivered"
    return problems, evidence


def _trap_problems(stop: dict, frame: dict, stub: "Stub", image: Image, word: int, host: bool) -> list[str]:
    """A trap with no stop before it (an accelerator that cannot stop there): what the trap
    itself shows of an honest delivery, where the session read it (`sys`)."""
    problems = []
    vector = stop["vector"]
    if frame["rip"] == stub.done and vector != 6:
        problems.append(f"vector {vector} at the return trap probe_done_{stub.name}: no instruction faults there")
    if host and stop.get("sys"):
        problems += _delivery_problems(vector, None, stop["regs"], frame, stop.get("gate"), stop.get("tss"), word,
                                       frame["rip"])
    return problems


def _insn_only(pre: dict, stub: "Stub", image: Image, word: int, out: dict, stray: list) -> None:
    """An insn stop whose chain no trap closed: what the step showed, read as the check, with
    the broken link named (so the check cannot pass quietly)."""
    spec = next(s for s in catalogue.stubs(None) if s.name == stub.name)
    problems, evidence = _insn_problems(pre, stub, spec, image, word)
    after = pre.get("after") or {}
    if after.get("rip") == stub.done:
        outcome = "ok"
        problems.append("the instruction completed but its return trap was not seen")
    else:
        vector = x86.vector_at(pre.get("idt"), after.get("rip", -1), word)
        outcome = x86.exception_value(vector) if vector is not None else "?"
        problems.append(f"after the instruction the CPU was at {after.get('rip', 0):#x}, "
                        + (f"vector {vector}'s handler, which no watch stops at" if vector is not None
                           else "no exception handler of its IDT"))
    evidence.update({"at": pre["at"], "saw": "the instruction, not its delivery"})
    regs = pre["regs"]
    frame = {"rflags": regs["eflags"], "error_code": 0}
    for entry in catalogue.by_stub(stub.name):
        if "host" not in entry.scopes or entry.witness_in("host").startswith("none"):
            continue
        params, value = _params(entry, regs["cs"] & 3, {**after, "cr4": regs["cr4"]}, frame, outcome,
                                io_readings(pre), {})
        if UNREAD in params.values():
            stray.append({**evidence, "why": f"{entry.probe}: {'; '.join(problems)}"})
            continue
        _add(out, "host", entry.probe, params, _with_problems(value, problems), evidence)


def gate_value(gate: catalogue.Gate, regs: dict, frame: dict, io: dict[int, int | None] | None = None,
               msrs: dict[int, int | None] | None = None) -> int | None:
    """A control as the CPU had it: a CR4 bit from CR4, IOPL from the RFLAGS the CPU pushed, an
    I/O bitmap bit from the bitmap the CPU consults (`io`: port -> the bitmap's 16 bits at
    TR.base + the TSS's I/O map base + port/8, None where that lies past TR.limit: denied, SDM
    Vol. 1 18.5.2; 1 = the port is allowed), an MSR bit from the RDMSR the CPU ran at the stop
    (`msrs`). None where the stop holds no reading."""
    if gate.reg == "cr4":
        return regs["cr4"] >> gate.bit & 1
    if gate.reg == "iopl":
        return frame["rflags"] >> 12 & 3
    if gate.reg == "iomap":
        if io is None or gate.bit not in io:
            return None
        bits = io[gate.bit]
        return 0 if bits is None else 1 - (bits >> (gate.bit % 8) & 1)
    if gate.reg == "msr":
        value = (msrs or {}).get(gate.msr)
        return None if value is None else value >> gate.bit & 1
    return None


def msr_readings(stop: dict) -> dict[int, int | None]:
    """The MSRs the CPU read at this stop (`witness_rdmsr`): MSR -> value, None where the RDMSR
    did not complete."""
    return {int(k, 16): v for k, v in (stop.get("msr") or {}).items()}


def io_readings(stop: dict) -> dict[int, int | None] | None:
    """The TSS I/O bitmap as the collector read it through TR at this stop: port -> the 16 bits
    the CPU reads for it (None: past TR.limit), or None where the stop read none."""
    io = stop.get("io")
    if not io:
        return None
    return {int(p): (None if v is None else int.from_bytes(bytes.fromhex(v), "little"))
            for p, v in io["ports"].items()}


def _params(entry: catalogue.Probe, cpl: int, regs: dict, frame: dict, outcome: str,
            io: dict[int, int | None] | None = None, msrs: dict[int, int | None] | None = None):
    """An entry's params from the CPU: `cpl`/`from_cpl` from the pushed CS, each gate as the CPU
    had it (gate_value), fixed words (insn, via, leaf) from the entry."""
    params: dict[str, str] = {}
    gates = {g.param: g for g in entry.gates}
    for key, values in entry.dims:
        if key in ("cpl", "from_cpl"):
            params[key] = str(cpl)
        elif key in gates:
            value = gate_value(gates[key], regs, frame, io, msrs)
            params[key] = UNREAD if value is None else str(value)
        elif len(values) == 1:
            params[key] = str(values[0])
        else:
            raise ValueError(f"{entry.probe}: dimension {key} is neither CPU state nor fixed")
    if entry.kind == "outcome":
        return params, outcome
    if entry.kind == "cpl-of":
        return params, str(cpl)  # the CPL the CPU ran that code at, trap or not
    if outcome != "ok":
        return params, outcome  # the ring trip or CPUID stub faulted: that is the observation
    if entry.kind == "enter":
        return params, str(cpl)
    if entry.kind == "return":
        return params, str(regs["cs"] & 3)  # the CPL of the handler the CPU entered
    value = _decode_cpuid(regs, entry.cpuid[2])
    return params, value if cpl == 0 else f"{value}@cpl{cpl}"


def _add(out: dict, scope: str, probe: str, params: dict, value: str, evidence: dict) -> None:
    cid = catalogue.check_id(scope, probe, params)
    out.setdefault(cid, []).append(Reading(cid, value, dict(evidence)))


def verdicts(plan: WitnessPlan, found: dict[str, list[Reading]], error: str | None) -> dict[str, Reading]:
    """One reading per planned check: the value, or NEVER (a whole session saw no execution),
    UNREACHED (the session broke first), or the values of every execution when there was more
    than one (the serial witness reports one). Readings of unplanned checks are kept too: the
    judge calls each a disagreement."""
    out: dict[str, Reading] = {}
    for cid in plan.checks:
        rs = found.get(cid, [])
        if not rs:
            out[cid] = Reading(cid, UNREACHED if error else NEVER, {"error": error} if error else {})
        elif len(rs) > 1:
            out[cid] = Reading(cid, f"{' '.join(r.value for r in rs)} (executed {len(rs)} times)", rs[0].detail)
        else:
            out[cid] = rs[0]
        if cid in plan.missing:  # what this accelerator keeps GDB from seeing of the check
            out[cid] = Reading(cid, out[cid].value, {**out[cid].detail, "missing": plan.missing[cid]})
    for cid, rs in found.items():
        if cid not in out:
            out[cid] = Reading(cid, " ".join(r.value for r in rs), {**rs[0].detail, "unplanned": True})
    return out


# -- the session -------------------------------------------------------------------------------
class GdbWitness:
    """One GDB session against one paused QEMU. The collector records every stop inside GDB;
    this side only attaches, serves the stop at `hv_main` and reads the record at the end."""

    def __init__(self, run_dir: Path | str, host_elf: Path | str, guest_elf: Path | str | None,
                 gdb_addr: str, accel: str, *, gdb: str = "gdb", command_timeout: float = 5.0,
                 deadline: float | None = None, record: bool = True):
        self.run_dir = Path(run_dir)
        self.host_elf = Path(host_elf)
        self.guest_elf = Path(guest_elf) if guest_elf else None
        self.gdb_addr = gdb_addr
        self.accel = accel
        # False: the same stops, nothing read at them (lab/bench.py's baseline for a stop's cost)
        self.record = record
        self.plan: WitnessPlan | None = None
        self.guest_scope: str | None = None
        self._image: Image | None = None  # the host ELF, read once at start()
        self.transcript = self.run_dir / "gdb.mi.log"
        self.stops_path = self.run_dir / "gdb.stops.jsonl"
        self.error: str | None = None  # why the session ended early, if it did
        self.seconds = 0.0
        self._gdb = Gdb(self.transcript, accel=accel, gdb=gdb, timeout=command_timeout, deadline=deadline)
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self._prepared = False
        self._preparing: threading.Thread | None = None
        self._prepare_error: BaseException | None = None
        self._t0 = 0.0

    def prepare(self) -> None:
        """Start GDB, load the symbols and the collector, read the host ELF. start() does it
        if nothing did before (prepare_in_background() overlaps it with QEMU's start)."""
        if self._prepared:
            return
        self._t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stops_path.write_text("")
        try:
            self._gdb.start()
            self._gdb.load_symbols(self.host_elf)
            if self.guest_elf:
                self._gdb.add_symbols(self.guest_elf)
            self._gdb.console(f"source {COLLECTOR}")
            self._image = Image.load(self.host_elf)
        except BaseException:
            self._gdb.close()
            raise
        self._prepared = True

    def prepare_in_background(self) -> None:
        """prepare() in a thread, while the caller starts QEMU (GDB's own start-up is ~0.1 s).
        start() waits for it and raises what it raised; finish() waits for it too, so GDB
        never outlives the session."""
        def work() -> None:
            try:
                self.prepare()
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                self._prepare_error = exc

        self._preparing = threading.Thread(target=work, name="gdb-prepare", daemon=True)
        self._preparing.start()

    def gdb_pid(self) -> int | None:
        """GDB's pid while it runs (a timeout's verdict names its state)."""
        return self._gdb.pid

    @property
    def teardown(self) -> list[str]:
        """How GDB had to be ended, when it did not exit when asked."""
        return self._gdb.teardown

    def _wait_prepared(self) -> None:
        if self._preparing is not None:
            # prepare() is bounded by the deadline (its GDB/MI commands) and by close()'s bound.
            self._preparing.join(self._gdb.timeout + 5.0)
            if self._preparing.is_alive():
                self._gdb.mark_unresponsive()
                self._gdb.close()
                raise GdbTimeout("GDB start-up", self._gdb.timeout, [], processes.describe("GDB", self._gdb.pid))
            self._preparing = None
        if self._prepare_error is not None:
            exc, self._prepare_error = self._prepare_error, None
            raise exc

    def start(self, plan: WitnessPlan, guest_scope: str | None = None) -> None:
        """Attach to the paused QEMU, arm the plan and let the CPU run. `guest_scope`: which
        host runs the guest (guest-svm, guest-vmx, guest-soft), so its stops are placed.
        Raises GdbError or GdbTimeout if GDB cannot attach (GDB is then already gone)."""
        self.plan = plan
        self.guest_scope = guest_scope
        self._wait_prepared()
        self.prepare()
        try:
            self._gdb.connect(self.gdb_addr)
            image = self._image
            specs = [w.spec() for w in plan.watches]
            stubs = stubs_of(image)

            def in_stubs(items) -> list:  # (value, stub) -> [value, first and last RIP of its trap]
                return [[value, stubs[name].insn, stubs[name].done] for value, name in items if name in stubs]

            for spec in specs:  # ELF symbols -> addresses for the collector's reads
                spec["addr"] = image.symbols.get(spec["location"])
                if spec["kind"] == "insn" and spec["stub"] == REALMODE:
                    spec["insn"] = image.symbols.get(REALMODE_INSN)
                    spec["done"] = spec["insn"] + 2 if spec["insn"] is not None else None
                    continue
                if spec["kind"] == "insn":
                    stub = stubs.get(spec["stub"])
                    if stub is None:
                        continue  # no such stub in this ELF: GDB reports the missing symbol
                    spec["insn"], spec["done"] = stub.insn, stub.done
                    spec["io"] = [port for port, _name in spec.get("io", ())]
                    continue
                if spec["kind"] == "vmexit":
                    spec["vmcb"] = image.symbols.get(spec["vmcb"])
                    spec["enabled"] = False  # armed by the guest's CPUID (plan: Watch.arm)
                if "io" in spec:
                    spec["io"] = in_stubs(spec["io"])
                if "msr" in spec:  # the CPU reads it there
                    spec["msr"] = in_stubs(spec["msr"])
                    spec["rdmsr_at"] = image.symbols.get(WITNESS_RDMSR)
                # TCG: an IDT stub that starts with the 2-byte no-op (66 90) is resumed past it.
                # Not under KVM: there a hardware breakpoint resumed without GDB's single step
                # over it reached the guest as #DB (measured under kvm_pvm).
                addr = image.symbols.get(spec["location"])
                if (plan.caps.software_breakpoints and spec["kind"] == "trap" and addr is not None
                        and image.read(addr, 2) == NOP2):
                    spec["skip"] = 2
            msr = next((sp for sp in specs if sp.get("msr")), {})
            config = {"out": str(self.stops_path), "watches": specs, "word": image.bits // 8,
                      "stubs": [[st.insn, st.done] for st in stubs.values()],
                      "faults": {"msr": msr.get("msr", []), "rdmsr_at": msr.get("rdmsr_at")},
                      "record": self.record}
            self._gdb.console("python lab_collect_start(" + repr(json.dumps(config)) + ")")
            self._gdb.cont()
        except BaseException:
            self._gdb.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="gdb-witness", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        gdb = self._gdb
        try:
            while not self._quit.is_set():
                try:
                    stop = gdb.wait_stopped(0.25)
                except GdbTimeout:
                    continue
                reason = stop.get("reason")
                if reason == TARGET_CLOSED:
                    break
                if reason == "signal-received" and stop.get("signal-name") == "SIGABRT":
                    self.error = "QEMU stopped the CPU (SIGABRT: KVM internal error?)"
                    break
                at = _stop_location(stop)
                if reason == "breakpoint-hit" and at == END_OF_HOST_PROBES:
                    gdb.console(f"python lab_collect_end({at!r})")
                else:
                    self.error = f"unexpected stop: {reason} {stop.get('signal-name', '')} at {at}".strip()
                    break
                gdb.cont()
        except Exception as exc:  # noqa: BLE001 - a failing witness must not stop the run
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.seconds = time.monotonic() - self._t0
            gdb.close()  # detaches if QEMU still runs, so the boot goes on without us

    def finish(self, timeout: float = 10.0) -> dict[str, Reading]:
        """Wait up to `timeout` s for the session to end (QEMU exited), end GDB, and return
        one reading per planned check (and any unplanned ones)."""
        # GDB's start-up is bounded by its command timeouts: waiting for it means no GDB it
        # starts can outlive this call. A failed start-up was start()'s to report.
        with contextlib.suppress(BaseException):
            self._wait_prepared()
        if self._thread is not None:
            end = time.monotonic() + timeout
            while self._thread.is_alive() and time.monotonic() < end:
                self._thread.join(min(0.05, max(0.0, end - time.monotonic())))
                if processes.is_stopped(self._gdb.pid):  # it will not end by itself: no point waiting
                    break
            if self._thread.is_alive():
                pid = self._gdb.pid
                self.error = self.error or (
                    f"GDB stopped answering: {processes.describe('GDB', pid)}" if processes.is_stopped(pid)
                    else f"the GDB session did not end {timeout:g} s after the boot did")
                self._quit.set()
                self._thread.join(0.25)
                if self._thread.is_alive():
                    self._gdb.mark_unresponsive()
        elif self.plan is not None and self.error is None:
            self.error = "GDB never attached"
        self._gdb.close()
        stops = self.stops()
        if self.plan is None:
            return {}
        guest = Image.load(self.guest_elf) if self.guest_elf else None
        found, stray = read_stops(stops, self._image or Image.load(self.host_elf), guest, self.guest_scope,
                                  self.plan.chained)
        missing = [s for s in stops if "error" in s]
        if missing and not self.error:
            self.error = "; ".join(f"{s['at']}: {s['error']}" for s in missing)
        unread = sorted({f"{m:#x}" for s in stops for m, v in msr_readings(s).items() if v is None})
        if unread and not self.error:  # its checks cannot be keyed: unreached, not never executed
            self.error = f"the CPU did not complete RDMSR {', '.join(unread)} at a stop (witness_rdmsr)"
        result = verdicts(self.plan, found, self.error)
        self._write(stops, result, stray)
        return result

    def stops(self) -> list[dict]:
        out = []
        if self.stops_path.exists():
            for line in self.stops_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    self.error = self.error or "the collector's record is cut short"
        return out

    def _write(self, stops: list[dict], result: dict[str, Reading], stray: list[dict]) -> None:
        out = {
            "accel": self.accel,
            "capabilities": asdict(self.plan.caps),
            "watches": [asdict(w) for w in self.plan.watches],
            "checks": list(self.plan.checks),
            "unwitnessed": self.plan.unwitnessed,
            "missing": self.plan.missing,
            "error": self.error,
            # the CPU stops GDB made (a record `via` a step was written at the stop before it)
            "stops": sum(1 for s in stops if "via" not in s and "error" not in s),
            "records": len(stops),
            "seconds": round(self.seconds, 4),
            "stray": stray,
            "readings": [asdict(r) for r in result.values()],
        }
        (self.run_dir / "gdb.readings.json").write_text(json.dumps(out, indent=2) + "\n")


def _stop_location(stop: dict) -> str:
    frame = stop.get("frame") or {}
    func = frame.get("func", "")
    return func if func and func != "??" else frame.get("addr", "?")
