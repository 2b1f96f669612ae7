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
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from . import catalogue
from .elf import Image
from .gdb import x86
from .gdbmi import HW_BREAKPOINT_SLOTS, TARGET_CLOSED, Gdb, GdbTimeout

UNREACHED = "unreached"  # the session broke before it could look: the judge makes it `error`
NEVER = "never executed"  # the session was whole and the CPU never ran it: a disagreement
UNREAD = "?"  # a gate the stop holds no reading of
COLLECTOR = Path(__file__).resolve().parent / "gdb" / "collector.py"
END_OF_HOST_PROBES = "hv_main"
WITNESS_RDMSR = "witness_rdmsr"  # firmware/probe.c: the RDMSR the CPU runs for the witness
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


def capabilities(accel: str, kvm_module: str | None) -> Capabilities:
    """docs/gdb.md "What each accelerator allows". TCG: QEMU's gdbstub checks software
    breakpoints as it translates, at any CPL and in an SVM guest. KVM: hardware breakpoints
    (DR0-DR3, 4 at once); kvm_intel and kvm_amd stop GDB at any CPL through
    KVM_SET_GUEST_DEBUG; kvm_pvm only on CPL0 code (a breakpoint at CPL>0 becomes the guest's
    #DB: docs/platform.md). An unknown KVM module gets the narrowest set."""
    if accel == "tcg":
        return Capabilities("tcg", True, None, True, True, "software breakpoints anywhere")
    if accel == "kvm" and kvm_module in ("kvm_intel", "kvm_amd"):
        return Capabilities(kvm_module, False, HW_BREAKPOINT_SLOTS, True, False,
                            "hardware breakpoints at any CPL, none in a nested guest")
    if kvm_module == "kvm_pvm":
        return Capabilities(kvm_module, False, HW_BREAKPOINT_SLOTS, False, False,
                            "hardware breakpoints on CPL0 code only", False,
                            "kvm_pvm: a hardware breakpoint hit while the software host runs its guest reaches "
                            "the guest as #DB instead of stopping GDB (measured: the boot ends with an unexpected "
                            "#DB at the host's IDT stub; docs/gdb.md)")
    return Capabilities(kvm_module or accel, False, HW_BREAKPOINT_SLOTS, False, False,
                        "hardware breakpoints on CPL0 code only")


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Watch:
    location: str  # an ELF symbol; the breakpoint goes on its address
    kind: str  # trap | end (lab/gdb/collector.py)
    vector: int | None = None
    error_code: bool = False
    hw: bool = False
    ends: tuple[str, ...] = ()
    # (ELF symbol, offset, stub): a byte the CPU consults, read at a trap whose RIP is in that stub
    mem: tuple[tuple[str, int, str], ...] = ()
    # (MSR, stub): at a trap whose RIP is in that probe stub, the CPU runs `witness_rdmsr` for it
    msr: tuple[tuple[int, str], ...] = ()

    def spec(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, (), False) or k == "kind"}


@dataclass(frozen=True)
class WitnessPlan:
    accel: str
    caps: Capabilities
    watches: tuple[Watch, ...]
    checks: tuple[str, ...]  # check ids GDB must read (each exactly once)
    unwitnessed: dict[str, str] = field(default_factory=dict)  # check id -> why GDB cannot

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
               for scope in ("host", *catalogue.GUEST_SCOPES) for r in catalogue.rows(scope)}
    host_vecs: dict[str, set[int]] = {}  # check id -> vectors of the host IDT it needs
    guest_vecs: dict[str, set[int]] = {}  # ... of the guest's own IDT
    entry_stops: dict[str, str] = {}  # check id -> label to stop at
    unwitnessed: dict[str, str] = {}
    planned: dict[str, catalogue.Probe] = {}  # check id -> its catalogue entry
    for exp in expectations:
        entry = entries.get((exp.scope, exp.probe, tuple(exp.params.items())))
        if entry is None or exp.skip or (exp.id in deviant and deviant[exp.id] is None):
            continue
        planned[exp.id] = entry
        how = entry.witness_in(exp.scope)
        if how.startswith("none"):
            unwitnessed[exp.id] = how.removeprefix("none: ")
        elif exp.scope == "guest-soft" and not caps.stops_in_soft_guest:
            unwitnessed[exp.id] = caps.soft_guest_note
        elif exp.scope in ("host", "guest-soft"):
            host_vecs[exp.id] = _vector_set(exp, deviant)
        elif not caps.stops_in_guest:
            unwitnessed[exp.id] = f"{caps.name}: GDB cannot stop inside a nested guest"
        elif how == "entry":
            entry_stops[exp.id] = "guest_start"
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

    mem = at_stubs("iomap", lambda g: ("tss_iomap", g.bit // 8))
    msr = at_stubs("msr", lambda g: (g.msr,))
    watches = [Watch("isr_stub_3_exc" if v == 3 else f"isr_stub_{v}", "trap", v, v in x86.EXC_WITH_ERROR_CODE, hw,
                     mem=mem, msr=msr)
               for v in vectors]
    # The host's probe phase ends at hv_main: its stubs go there, unless a guest under the
    # software host (which traps into the same stubs) is to be witnessed too.
    if not any(cid.startswith("guest-soft.") for cid in host_vecs):
        watches.append(Watch(END_OF_HOST_PROBES, "end", hw=hw, ends=tuple(w.location for w in watches)))
    if guest_vecs:
        gvecs = sorted({v for vs in guest_vecs.values() for v in vs})
        watches += [Watch(f"guest_isr_stub_{v}", "trap", v, v in x86.EXC_WITH_ERROR_CODE, hw) for v in gvecs]
    watches += [Watch(loc, "regs", hw=hw) for loc in sorted(set(entry_stops.values()))]
    checks = list(entry_stops) + list(guest_vecs)
    for cid, vs in host_vecs.items():
        missing = vs - set(vectors)
        if missing:
            unwitnessed[cid] = (f"{caps.name}: no hardware breakpoint left for vector "
                                f"{', '.join(x86.exception_value(v) for v in sorted(missing))}")
        else:
            checks.append(cid)
    plan = WitnessPlan(accel, caps, tuple(watches), tuple(checks), unwitnessed)
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
               guest_scope: str | None = None) -> tuple[dict[str, list[Reading]], list[dict]]:
    """Recorded stops -> (check id -> readings, in stop order; stops the reader could not
    place). Pure: tests feed it recorded or synthetic stops.

    A stop counts only where the CPU itself delivered it: the host's IDT stubs (host probes,
    and a guest under the software host, whose traps the CPU delivers to the host's IDT) and
    the guest's own IDT stubs for a guest under SVM/VMX (under the software host the host,
    not the CPU, enters those)."""
    host_stubs = stubs_of(image)
    guest_stubs = stubs_of(guest, "guest") if guest is not None else {}
    lstar = image.symbols.get("syscall_entry")
    out: dict[str, list[Reading]] = {}
    stray: list[dict] = []
    checkpoint: dict | None = None  # the last checkpoint trap (SYSCALL stubs): CS and RSP there
    for stop in stops:
        regs = stop.get("regs") or {}
        if stop.get("kind") == "regs":  # a stop at a label: the CPL the CPU runs it at
            for entry in catalogue.CATALOGUE:
                if guest_scope in entry.scopes and entry.witness_in(guest_scope) == "entry":
                    params, value = _params(entry, regs["cs"] & 3, regs, {}, "ok")
                    _add(out, guest_scope, entry.probe, params, value,
                         {"at": stop["at"], "cs": f"{regs['cs']:#x}", "rip": f"{regs['rip']:#x}"})
            continue
        if stop.get("kind") != "trap":
            continue
        frame = _frame(stop, image.bits // 8)
        if frame is None:
            continue
        rip, vector = frame["rip"], stop["vector"]
        cpl = frame["cs"] & 3
        evidence = {"vector": vector, "rip": f"{rip:#x}", "frame.cs": f"{frame['cs']:#x}",
                    "cs": f"{regs['cs']:#x}", "cr4": f"{regs['cr4']:#x}", "at": stop["at"]}
        if stop.get("at_rip"):
            evidence["bytes"] = stop["at_rip"][:8]
        in_guest_idt = stop["at"].startswith("guest_")
        if rip == lstar and vector == 6 and not in_guest_idt:  # the LSTAR entry's return trap
            stub = host_stubs.get("return_syscall")
            linked = checkpoint is not None and checkpoint["rsp"] == frame["rsp"] and stub is not None \
                and regs["rcx"] == stub.done  # SYSCALL saved the address after itself in RCX
            if not linked:
                stray.append({**evidence, "why": "SYSCALL entry without its checkpoint at a probe stub"})
                continue
            params = {"from_cpl": str(checkpoint["cpl"]), "via": "syscall"}
            evidence.update({"from.cs": f"{checkpoint['cs']:#x}", "rcx": f"{regs['rcx']:#x}"})
            _add(out, "host", "cpl-return", params, str(cpl), evidence)
            checkpoint = None
            continue
        scope, img = "host", image
        stub = next((s for s in host_stubs.values() if s.insn <= rip <= s.done), None)
        if stub is None or in_guest_idt:
            stub = next((s for s in guest_stubs.values() if s.insn <= rip <= s.done), None)
            scope, img = guest_scope, guest
            # Which IDT the CPU used for this guest: its own under SVM/VMX, the host's (soft).
            if stub is not None and in_guest_idt == (guest_scope == "guest-soft"):
                continue
        if stub is None or scope is None:
            continue  # not a probe: the firmware's own traps (ring plumbing, the hosts' work)
        spec = next(s for s in catalogue.stubs(None) if s.name == stub.name)
        if spec.continue_at and rip == stub.insn and vector == 6:
            checkpoint = {"cpl": cpl, "cs": frame["cs"], "rsp": frame["rsp"]}
            continue
        completed = rip == stub.done and vector == 6
        # What the CPU executed at RIP must be what the binary has there.
        executed = bytes.fromhex(stop.get("at_rip") or "")
        binary = img.read(rip, max(1, stub.done - rip))
        value_suffix = ""
        if not completed and executed[: len(binary)] != binary:
            evidence["binary"] = binary.hex()
            value_suffix = f"@{executed[: len(binary)].hex()}"
        outcome = "ok" if completed else x86.exception_value(vector, frame["error_code"])
        for entry in catalogue.by_stub(stub.name):
            if scope not in entry.scopes or entry.witness_in(scope).startswith("none"):
                continue
            params, value = _params(entry, cpl, regs, frame, outcome, _memory(stop, img), msr_readings(stop))
            unread = [k for k, v in params.items() if v == UNREAD]
            if unread:  # the row cannot be named: its check stays unread (never executed / unreached)
                stray.append({**evidence, "why": f"{entry.probe}: no reading of {', '.join(unread)} at this stop"})
                continue
            _add(out, scope, entry.probe, params, value + value_suffix, evidence)
    return out, stray


def gate_value(gate: catalogue.Gate, regs: dict, frame: dict, memory: dict[int, int],
               msrs: dict[int, int | None] | None = None) -> int | None:
    """A control as the CPU had it at the trap: a CR4 bit from CR4, IOPL from the RFLAGS the CPU
    pushed, an I/O bitmap bit from the bitmap the CPU consults (`memory`: address -> byte read
    at the stop; 1 = the port is allowed), an MSR bit from the RDMSR the CPU ran at the stop
    (`msrs`). None where the stop holds no reading."""
    if gate.reg == "cr4":
        return regs["cr4"] >> gate.bit & 1
    if gate.reg == "iopl":
        return frame["rflags"] >> 12 & 3
    if gate.reg == "iomap" and "tss_iomap" in memory:
        byte = memory.get(memory["tss_iomap"] + gate.bit // 8)
        return None if byte is None else 1 - (byte >> (gate.bit % 8) & 1)
    if gate.reg == "msr":
        value = (msrs or {}).get(gate.msr)
        return None if value is None else value >> gate.bit & 1
    return None


def msr_readings(stop: dict) -> dict[int, int | None]:
    """The MSRs the CPU read at this stop (`witness_rdmsr`): MSR -> value, None where the RDMSR
    did not complete."""
    return {int(k, 16): v for k, v in (stop.get("msr") or {}).items()}


def _memory(stop: dict, image: Image) -> dict[int, int]:
    """The bytes the collector read at this stop (address -> byte), with the ELF's address of
    the I/O bitmap under "tss_iomap"."""
    out = {int(a): int(b, 16) for a, b in (stop.get("mem") or {}).items()}
    if "tss_iomap" in image.symbols:
        out["tss_iomap"] = image.symbols["tss_iomap"]
    return out


def _params(entry: catalogue.Probe, cpl: int, regs: dict, frame: dict, outcome: str,
            memory: dict[int, int] | None = None, msrs: dict[int, int | None] | None = None):
    """An entry's params from the CPU: `cpl`/`from_cpl` from the pushed CS, each gate as the CPU
    had it (gate_value), fixed words (insn, via, leaf) from the entry."""
    params: dict[str, str] = {}
    gates = {g.param: g for g in entry.gates}
    for key, values in entry.dims:
        if key in ("cpl", "from_cpl"):
            params[key] = str(cpl)
        elif key in gates:
            value = gate_value(gates[key], regs, frame, memory or {}, msrs)
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
    for cid, rs in found.items():
        if cid not in out:
            out[cid] = Reading(cid, " ".join(r.value for r in rs), {**rs[0].detail, "unplanned": True})
    return out


# -- the session -------------------------------------------------------------------------------
class GdbWitness:
    """One GDB session against one paused QEMU. The collector records every stop inside GDB;
    this side only attaches, serves the stop at `hv_main` and reads the record at the end."""

    def __init__(self, run_dir: Path | str, host_elf: Path | str, guest_elf: Path | str | None,
                 gdb_addr: str, accel: str, *, gdb: str = "gdb", command_timeout: float = 5.0):
        self.run_dir = Path(run_dir)
        self.host_elf = Path(host_elf)
        self.guest_elf = Path(guest_elf) if guest_elf else None
        self.gdb_addr = gdb_addr
        self.accel = accel
        self.plan: WitnessPlan | None = None
        self.guest_scope: str | None = None
        self._image: Image | None = None  # the host ELF, read once at start()
        self.transcript = self.run_dir / "gdb.mi.log"
        self.stops_path = self.run_dir / "gdb.stops.jsonl"
        self.error: str | None = None  # why the session ended early, if it did
        self.seconds = 0.0
        self._gdb = Gdb(self.transcript, accel=accel, gdb=gdb, timeout=command_timeout)
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

    def _wait_prepared(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
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
                if "mem" in spec:
                    spec["mem"] = in_stubs((image.symbols[sym] + off, name) for sym, off, name in spec["mem"]
                                           if sym in image.symbols)
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
            config = {"out": str(self.stops_path), "watches": specs, "word": image.bits // 8}
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
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.error = self.error or f"QEMU still running {timeout:g} s after finish() was called"
                self._quit.set()
                self._thread.join(0.5)
                if self._thread.is_alive():
                    self._gdb.mark_unresponsive()
        elif self.plan is not None and self.error is None:
            self.error = "GDB never attached"
        self._gdb.close()
        stops = self.stops()
        if self.plan is None:
            return {}
        guest = Image.load(self.guest_elf) if self.guest_elf else None
        found, stray = read_stops(stops, self._image or Image.load(self.host_elf), guest, self.guest_scope)
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
            "error": self.error,
            "stops": len(stops),
            "seconds": round(self.seconds, 4),
            "stray": stray,
            "readings": [asdict(r) for r in result.values()],
        }
        (self.run_dir / "gdb.readings.json").write_text(json.dumps(out, indent=2) + "\n")


def _stop_location(stop: dict) -> str:
    frame = stop.get("frame") or {}
    func = frame.get("func", "")
    return func if func and func != "??" else frame.get("addr", "?")
