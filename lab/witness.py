"""The GDB witness: a second, independent observer of the probes the firmware reports.

The firmware prints what it saw; this module stops the CPU at a few named points and reads
the machine state itself (CS, CR4, the exception frame, the faulting instruction's bytes,
the CPUID output registers). Its readings are compared with the serial records by the
judge; it never decides pass or fail.

    plan = witness_plan("tcg", ["host", "guest-svm"])
    w = GdbWitness(run_dir, host_elf, guest_elf, "127.0.0.1:1234", "tcg", plan=plan)
    w.start()                      # attach to the paused QEMU, set breakpoints, continue
    ...                            # the runner reads the serial console meanwhile
    readings = w.finish(timeout=10)    # list[Reading], once QEMU has exited

Where it looks (symbols: firmware/README.md "GDB witness points"; details: docs/gdb.md):
- `exc_dispatch` (CPL0; every exception; RDI = the frame): vector, error code, saved RIP
  and CS, CR4, the bytes at the saved RIP. A #UD at `ring_return_ud2` is the way back from
  ring n: the frame's CS is ring n's CS, $cs is the CPL after the return, and a probe whose
  ring trip ends without an exception completed (`ok`).
- `ring_entry`, `ring_entry_sysret`, `syscall_entry` (TCG): $cs at the first instruction
  in the ring / after SYSCALL. Dropped once the CPL probes are over (fewer stops).
- `syscall_entry` (KVM): $cs after SYSCALL from CPL1/CPL2 (CPL0 code there); deleted once
  both are read, before the CPL3 SYSCALL (which runs it at CPL3 under kvm_pvm).
- `probe_priv` (KVM, guard): which priv-insn probe is about to run (RDI = insn, EDX = cpl).
- `cpuid_*_done` (CPL0, once each): EBX/ECX/EDX right after CPUID.
- `guest_start` (TCG, guest symbols, once): $cs and EFER while the SVM guest runs.

Under KVM only hardware breakpoints on CPL0 code work (at most 4 armed at once), and under
kvm_pvm a GDB stop at `exc_dispatch` for the #GP that `hlt` raises at CPL3 killed the run
(with `exc_dispatch` as the only armed breakpoint; docs/gdb.md):
`exc_dispatch` is never armed while that probe runs (a guard at `probe_priv` disarms it and
re-arms it at the next probe); that one check has no reading under KVM. `BreakpointSchedule`
decides what is armed when; it is pure and unit-tested.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from .expectations import HOST_RINGS, PRIV_INSNS
from .gdb import x86
from .gdbmi import HW_BREAKPOINT_SLOTS, TARGET_CLOSED, Gdb, GdbError, GdbTimeout
from .ids import check_id

UNREACHED = "unreached"  # the judge turns it into `error`

# Bytes of each probed instruction: a fault counts for the probe only at that instruction;
# elsewhere the reading says so (`#GP(0)@0f0b`) and cannot agree with the serial record.
PROBE_INSN_BYTES = {
    "rdtsc": bytes.fromhex("0f31"),
    "rdtscp": bytes.fromhex("0f01f9"),
    "hlt": bytes.fromhex("f4"),
    "cli": bytes.fromhex("fa"),
    "mov-cr4": bytes.fromhex("0f22e0"),  # mov %rax, %cr4
}
# current_probe.name holds 15 characters: the firmware shortens this one.
_PROBE_NAMES = {"cpuid-hv-sig": "cpuid-hv-signature"}
# current_probe -> the record's params, in record order (docs/records.md).
_PARAMS: dict[str, Callable[[dict], dict[str, object]]] = {
    "cpl-enter": lambda cp: {"cpl": cp["cpl"], "via": cp["param"]},
    "cpl-return": lambda cp: {"from_cpl": cp["cpl"], "via": cp["param"]},
    "priv-insn": lambda cp: {"insn": cp["param"], "cpl": cp["cpl"]},
    "rdtsc": lambda cp: {"tsd": cp["tsd"], "cpl": cp["cpl"]},
    "rdtscp": lambda cp: {"tsd": cp["tsd"], "cpl": cp["cpl"]},
    "cpuid-vendor": lambda cp: {"leaf": 0},
    "cpuid-hv-bit": lambda cp: {},
    "cpuid-hv-signature": lambda cp: {},
}
# Probes whose observation is "the exception, or ok".
OUTCOME_PROBES = ("priv-insn", "rdtsc", "rdtscp")
# GDB-side reader of one exception stop (KVM): registers, frame, current_probe and the bytes
# at the saved RIP in one MI round trip instead of four (~1 ms less per stop; a KVM boot has
# ~30 such stops). Prints one line `LABW {json}`; the witness falls back to MI reads on error.
_GDB_EXC_READER = """
import gdb, json
def lab_witness_exc(cp_addr, size, rip_off):
    f = gdb.selected_frame()
    inf = gdb.selected_inferior()
    out = {r: int(f.read_register(r)) & 0xFFFFFFFFFFFFFFFF for r in ("rdi", "cs", "cr4")}
    frame = bytes(inf.read_memory(out["rdi"], size))
    out["frame"] = frame.hex()
    out["cp"] = bytes(inf.read_memory(cp_addr, 48)).hex() if cp_addr else None
    rip = int.from_bytes(frame[rip_off:rip_off + 8], "little")
    try:
        out["insn"] = bytes(inf.read_memory(rip, 4)).hex()
    except gdb.MemoryError:
        out["insn"] = None
    gdb.write("LABW " + json.dumps(out) + chr(10))
"""
CPL_PROBES = ("cpl-enter", "cpl-return")
# A probe's identity before it runs: (probe, param, cpl), e.g. ("priv-insn", "hlt", 3).
ProbeKey = tuple[str, str, int]
# kvm_pvm: a GDB stop at exc_dispatch for the #GP of `hlt` at CPL3 kills the VM (after
# `continue` it triple-faults, no `end` record) - measured with exc_dispatch as the only
# hardware breakpoint armed; with a second one armed it survived (docs/gdb.md). Every other
# exception stop is fine. To be safe exc_dispatch is never armed while this probe runs (a
# guard at probe_priv disarms it), so its check has no GDB reading under KVM.
KVM_UNSAFE_EXC_STOPS: tuple[ProbeKey, ...] = (("priv-insn", "hlt", 3),)


@dataclass(frozen=True)
class Reading:
    check_id: str
    value: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Watch:
    """One breakpoint: where, what to read there, and which checks it should produce."""

    location: str  # a symbol; the breakpoint goes on its exact address (`*symbol`)
    reader: str  # exception | ring-entry | syscall-entry | cpuid-vendor | cpuid-hv-bit | priv-entry | ...
    expects: tuple[str, ...] = ()  # check ids; any left without a reading -> `unreached`
    once: bool = False  # one-shot (GDB deletes it at its first hit)
    during: tuple[str, ...] = ()  # only while these probes run: deleted at the first stop in another
    guest: bool = False  # the symbol comes from the guest's ELF
    armed: bool = True  # armed at start; False: armed later, by a one-shot's `then`
    then: str | None = None  # a one-shot's successor (a location): armed when this one fires
    until_read: bool = False  # deleted at the stop that completes its `expects`
    until: tuple[str, ...] = ()  # deleted at the first stop at one of these locations
    suspend: tuple[ProbeKey, ...] = ()  # never armed while these probes run (needs a guard)
    guard: bool = False  # its stops tell which probe runs next: (dis)arms `suspend` watches


@dataclass(frozen=True)
class WitnessPlan:
    accel: str
    scopes: tuple[str, ...]
    watches: tuple[Watch, ...]

    @property
    def check_ids(self) -> list[str]:
        return [cid for w in self.watches for cid in w.expects]

    @property
    def peak_armed(self) -> int:
        """The most breakpoints armed at any moment. BreakpointSchedule only ever arms a
        one-shot's successor after that one-shot is gone, and re-arms a suspended watch it
        disarmed first, so the peak is what is armed at start (validate() checks the shape)."""
        return sum(1 for w in self.watches if w.armed)

    def validate(self) -> None:
        by_loc = {w.location: w for w in self.watches}
        if len(by_loc) != len(self.watches):
            raise ValueError("one watch per location")
        targets = [w.then for w in self.watches if w.then]
        if len(targets) != len(set(targets)):
            raise ValueError("a watch is the successor of two watches")
        for w in self.watches:
            if w.then and (not w.once or w.then not in by_loc or by_loc[w.then].armed):
                raise ValueError(f"{w.location}: `then` needs a one-shot and an unarmed successor")
            if not w.armed and w.location not in targets:
                raise ValueError(f"{w.location}: never armed")
            if w.suspend and not any(g.guard for g in self.watches):
                raise ValueError(f"{w.location}: `suspend` without a guard watch")
            if any(loc not in by_loc for loc in w.until):
                raise ValueError(f"{w.location}: `until` names a location without a watch")
        if self.accel == "kvm" and self.peak_armed > HW_BREAKPOINT_SLOTS:
            raise ValueError(f"the KVM plan needs {self.peak_armed} hardware breakpoints at once; "
                             f"x86 has {HW_BREAKPOINT_SLOTS}")


class BreakpointSchedule:
    """What is armed when: pure bookkeeping by location, no GDB. `start()` and `hit()` say
    what to delete and what to insert; deletions come first, so the count never passes
    `limit` (4 hardware slots under KVM; a breach raises AssertionError)."""

    def __init__(self, plan: WitnessPlan, limit: int | None = None):
        self.plan = plan
        self.limit = limit if limit is not None else (HW_BREAKPOINT_SLOTS if plan.accel == "kvm" else None)
        self.by_loc = {w.location: w for w in plan.watches}
        self.armed: set[str] = set()
        self.suspended: set[str] = set()  # disarmed by a guard; re-armed at the next guard stop
        self.retired: set[str] = set()  # done for good (fired once, read all, ended): never re-armed
        self.seen: set[ProbeKey] = set()  # probes a guard saw start
        self.peak = 0
        self.keys = {k for w in plan.watches for k in w.suspend}

    def start(self) -> list[Watch]:
        """Watches to insert at attach: guards first (a suspend watch needs its guard)."""
        first = sorted((w for w in self.plan.watches if w.armed), key=lambda w: not w.guard)
        for w in first:
            self._arm(w.location)
        return first

    def drop(self, location: str) -> None:
        """A breakpoint that could not be inserted, or deleted outside the schedule."""
        self.armed.discard(location)
        self.suspended.discard(location)
        self.retired.add(location)

    def unguarded(self) -> list[Watch]:
        """Armed watches that must not stay armed (call after start()): a `suspend` watch
        whose guard is not armed, an `until` watch none of whose end points is armed."""
        guarded = any(self.by_loc[loc].guard for loc in self.armed)
        out = []
        for loc in sorted(self.armed):
            w = self.by_loc[loc]
            if (w.suspend and not guarded) or (w.until and not self.armed & set(w.until)):
                out.append(w)
        return out

    def hit(self, location: str, read: Iterable[str] = (), probe: ProbeKey | None = None,
            ) -> tuple[list[str], list[Watch]]:
        """After a stop at `location` (its readings done; `read`: every check id read so
        far; `probe`: what a guard saw start) -> (locations to delete, watches to insert)."""
        watch = self.by_loc[location]
        read = set(read)
        delete: list[str] = []  # retired for good
        insert: list[Watch] = []
        if watch.once:
            self.armed.discard(location)  # GDB deleted it at the hit: its slot is free
            self.retired.add(location)
        elif watch.until_read and watch.expects and set(watch.expects) <= read:
            delete.append(location)
        for w in self.plan.watches:
            if location in w.until and w.location not in delete:
                delete.append(w.location)  # armed or suspended: it ends here either way
        disarm: list[str] = []  # suspended: re-armed at a later guard stop
        if watch.guard:
            if probe is not None:
                self.seen.add(probe)
            for w in self.plan.watches:
                if not w.suspend:
                    continue
                # An unreadable probe (None) counts as unsafe: disarm.
                unsafe = probe is None or probe in w.suspend
                if w.location in delete or w.location in self.retired:
                    continue
                if unsafe and w.location in self.armed:
                    self.armed.discard(w.location)
                    self.suspended.add(w.location)
                    disarm.append(w.location)
                elif not unsafe and w.location in self.suspended:
                    self.suspended.discard(w.location)
                    insert.append(w)
            if not self.suspended and self.keys <= self.seen:
                delete.append(location)  # every unsafe probe is over: the guard's job is done
        if watch.then and watch.then not in self.armed and watch.then not in self.retired:
            insert.append(self.by_loc[watch.then])
        gone = [loc for loc in delete if loc in self.armed]  # the rest has no breakpoint now
        for loc in delete:
            self.armed.discard(loc)
            self.suspended.discard(loc)
            self.retired.add(loc)
        for w in insert:
            self._arm(w.location)
        return disarm + gone, insert

    def _arm(self, location: str) -> None:
        self.armed.add(location)
        self.peak = max(self.peak, len(self.armed))
        if self.limit is not None and len(self.armed) > self.limit:
            raise AssertionError(f"{len(self.armed)} breakpoints armed at once ({sorted(self.armed)}); "
                                 f"the limit is {self.limit}")


def _cid(probe: str, **params: object) -> str:
    return check_id("host", probe, params)


def witness_plan(accel: str, scopes: Iterable[str] = ("host",)) -> WitnessPlan:
    """Where the witness stops the CPU for this accelerator and these check scopes.

    TCG: software breakpoints (QEMU checks them at translation time: memory is untouched and
    there is no slot limit), also on CPL>0 code and in the running SVM guest.
    KVM: hardware breakpoints on CPL0 code, never more than 4 armed at once: `exc_dispatch`
    (every exception but those of the `hlt` probe at CPL3, see KVM_UNSAFE_EXC_STOPS), its
    guard at `probe_priv`, `syscall_entry` for the SYSCALLs from CPL1/2, and the three CPUID
    points chained (one slot). CPL1-3 are read from exception frames. There is no SVM guest
    under this KVM, so guest scopes get no watches.
    """
    scopes = tuple(scopes)
    watches: list[Watch] = []
    cpuid = [
        Watch("cpuid_vendor_done", "cpuid-vendor", (_cid("cpuid-vendor", leaf=0),), once=True),
        Watch("cpuid_hvbit_done", "cpuid-hv-bit", (_cid("cpuid-hv-bit"),), once=True),
        Watch("cpuid_hvsig_done", "cpuid-hv-signature", (_cid("cpuid-hv-signature"),), once=True),
    ]
    if "host" in scopes and accel == "kvm":
        # Firmware order (firmware/README.md): ring trips 3, 1, 2 (iretq in, ud2 out), the
        # SYSRET trip, SYSCALL from 1, 2, 3, priv-insn at 3, 1, 2, rdtsc tsd 0/1 x cpl 0-3.
        # RDTSCP is skipped on kvm_pvm (KVM internal error); if a host runs it, its readings
        # still come (unplanned), like those of any probe that faults.
        ids = [_cid("cpl-enter", cpl=c, via="iretq") for c in HOST_RINGS]
        ids += [_cid("cpl-return", from_cpl=c, via="ud2") for c in HOST_RINGS]
        ids += [_cid("cpl-enter", cpl=3, via="sysret"), _cid("cpl-return", from_cpl=3, via="syscall")]
        ids += [_cid("priv-insn", insn=i, cpl=c) for c in HOST_RINGS for i in PRIV_INSNS
                if ("priv-insn", i, c) not in KVM_UNSAFE_EXC_STOPS]
        ids += [_cid("rdtsc", tsd=t, cpl=c) for t in (0, 1) for c in HOST_RINGS]
        watches += [
            Watch("probe_priv", "priv-entry", guard=True),
            # Deleted once its checks are read, at the latest at the first CPUID point: hv_main()
            # follows, and exc_dispatch stops in its soft host killed the run (measured).
            Watch("exc_dispatch", "exception", tuple(ids), suspend=KVM_UNSAFE_EXC_STOPS,
                  until_read=True, until=("cpuid_vendor_done",)),
            # CPL0 code after SYSCALL from CPL1/2 only: kvm_pvm runs it at CPL3 for the SYSCALL
            # from CPL3 (a breakpoint there would hand the guest a #DB). That probe comes
            # last; this watch is gone by then (deleted once from1 and from2 are read).
            Watch("syscall_entry", "syscall-entry",
                  tuple(_cid("cpl-return", from_cpl=c, via="syscall") for c in (1, 2)), until_read=True),
            replace(cpuid[0], then=cpuid[1].location),
            replace(cpuid[1], armed=False, then=cpuid[2].location),
            replace(cpuid[2], armed=False),
        ]
    elif "host" in scopes:
        outcomes = [_cid("priv-insn", insn=i, cpl=c) for c in HOST_RINGS for i in PRIV_INSNS]
        outcomes += [_cid(insn, tsd=t, cpl=c) for insn in ("rdtsc", "rdtscp") for t in (0, 1) for c in HOST_RINGS]
        returns = [_cid("cpl-return", from_cpl=c, via="ud2") for c in HOST_RINGS]
        watches += [
            Watch("exc_dispatch", "exception", tuple(returns + outcomes)),
            Watch("ring_entry", "ring-entry", tuple(_cid("cpl-enter", cpl=c, via="iretq") for c in HOST_RINGS),
                  during=CPL_PROBES),
            Watch("ring_entry_sysret", "ring-entry", (_cid("cpl-enter", cpl=3, via="sysret"),), during=CPL_PROBES),
            Watch("syscall_entry", "syscall-entry",
                  tuple(_cid("cpl-return", from_cpl=c, via="syscall") for c in HOST_RINGS), during=CPL_PROBES),
            *cpuid,
        ]
    if "guest-svm" in scopes and accel == "tcg":
        watches.append(Watch("guest_start", "guest-entry",
                             (check_id("guest-svm", "cpl-enter", {"cpl": 0, "via": "vmrun"}),),
                             once=True, guest=True))
    plan = WitnessPlan(accel, scopes, tuple(watches))
    plan.validate()
    return plan


def probe_check_id(cp: dict, scope: str = "host") -> str | None:
    """The check a firmware `current_probe` stands for, or None (e.g. `hv_main`)."""
    name = _PROBE_NAMES.get(cp["name"], cp["name"])
    params = _PARAMS.get(name)
    return check_id(scope, name, params(cp)) if params else None


class GdbWitness:
    """One GDB session against one paused QEMU; stops are served in a background thread."""

    def __init__(
        self,
        run_dir: Path | str,
        host_elf: Path | str,
        guest_elf: Path | str | None,
        gdb_addr: str,
        accel: str,
        *,
        scopes: Iterable[str] = ("host",),
        plan: WitnessPlan | None = None,
        gdb: str = "gdb",
        command_timeout: float = 5.0,
    ):
        self.run_dir = Path(run_dir)
        self.host_elf = Path(host_elf)
        self.guest_elf = Path(guest_elf) if guest_elf else None
        self.gdb_addr = gdb_addr
        self.accel = accel
        self._fixed_plan = plan is not None
        self.plan = plan or witness_plan(accel, scopes)
        self.transcript = self.run_dir / "gdb.mi.log"
        self.error: str | None = None  # why the session ended early, if it did
        self.stops = 0
        self.seconds = 0.0  # attach to the end of the session
        self._gdb = Gdb(self.transcript, accel=accel, gdb=gdb, timeout=command_timeout)
        self._numbers: dict[str, Watch] = {}  # armed breakpoint number -> its watch
        self._schedule: BreakpointSchedule | None = None
        self._missing: dict[str, str] = {}  # location -> why it has no breakpoint
        self._readings: dict[str, Reading] = {}
        self._faulted: set[int] = set()  # current_probe ids that took an exception
        self._symbols: dict[str, int] = {}
        self._cp: dict | None = None  # current_probe, read at most once per stop
        self._exc_reader = False  # _GDB_EXC_READER is loaded
        self._insn: bytes | None = None  # bytes at the saved RIP, when the stop's reader got them
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self._prepared = False
        self._t0 = 0.0

    # -- runner API ----------------------------------------------------------------------
    def prepare(self) -> None:
        """Start GDB and load the symbols (~0.05 s; under KVM ~0.09 s with the GDB-side
        exception reader). Optional: call it before starting QEMU so this overlaps QEMU's
        own start; start() does it otherwise."""
        if self._prepared:
            return
        self._t0 = time.monotonic()
        try:
            self._gdb.start()
            self._gdb.load_symbols(self.host_elf)
            if self.guest_elf:
                self._gdb.add_symbols(self.guest_elf)  # linked at its load address
            for name in ("ring_return_ud2", "syscall_entry_ud2", "current_probe"):
                addr = self._gdb.symbol_address(name)
                if addr is not None:
                    self._symbols[name] = addr
            if self.accel == "kvm":  # TCG keeps its MI reads
                try:
                    self._gdb.console("python exec(" + repr(_GDB_EXC_READER) + ")")
                    self._exc_reader = True
                except GdbError:
                    pass  # no Python in this GDB: MI reads
        except BaseException:
            self._gdb.close()
            raise
        self._prepared = True

    def start(self, scopes: Iterable[str] | None = None) -> None:
        """Attach to the paused QEMU, set the plan's breakpoints and let the CPU run.
        `scopes` re-plans for scopes known only now (e.g. from QEMU's CPU facts).
        Raises GdbError or GdbTimeout if GDB cannot attach (GDB is then already gone)."""
        if scopes is not None and not self._fixed_plan:
            self.plan = witness_plan(self.accel, scopes)
        self.prepare()
        try:
            self._gdb.connect(self.gdb_addr)
            self._schedule = BreakpointSchedule(self.plan)
            for watch in self._schedule.start():
                self._arm(watch)
            # A watch that must be disarmed around some probes is never armed without its guard.
            for watch in self._schedule.unguarded():
                self._schedule.drop(watch.location)
                self._disarm(watch.location)
                self._missing[watch.location] = "the breakpoint that guards or ends it could not be set"
            self._gdb.cont()
        except BaseException:
            self._gdb.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="gdb-witness", daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 10.0) -> list[Reading]:
        """Wait up to `timeout` s for the session to end (QEMU exits, the remote end
        closes); then end GDB (detaching if QEMU still runs) and return the readings, with
        `unreached` for every planned check that no stop produced."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.error = self.error or f"QEMU still running {timeout:g} s after finish() was called"
                self._quit.set()
                # A hung GDB keeps its thread in a read: give it a moment, then close()
                # below kills GDB, which ends the read.
                self._thread.join(0.5)
                if self._thread.is_alive():
                    self._gdb.mark_unresponsive()
        self._gdb.close()
        readings = self.readings()
        self._write(readings)
        return readings

    def readings(self) -> list[Reading]:
        out = list(self._readings.values())
        for watch in self.plan.watches:
            for cid in watch.expects:
                if cid not in self._readings:
                    detail = {"location": watch.location}
                    if watch.location in self._missing:
                        detail["error"] = self._missing[watch.location]
                    elif self.error:
                        detail["error"] = self.error
                    out.append(Reading(cid, UNREACHED, detail))
        return out

    # -- session -------------------------------------------------------------------------
    def _arm(self, watch: Watch) -> None:
        if watch.guest and not self.guest_elf:
            self._missing[watch.location] = "no guest symbols given"
            self._schedule.drop(watch.location)
            return
        try:
            number = self._gdb.breakpoint(f"*{watch.location}", temporary=watch.once)
        except GdbError as exc:
            # A missing symbol is a lab bug: its checks become `unreached` with the reason.
            self._missing[watch.location] = exc.message
            self._schedule.drop(watch.location)
            return
        self._numbers[number] = watch

    def _disarm(self, *locations: str) -> None:
        """Delete the breakpoints at these locations (the schedule already knows)."""
        numbers = [n for n, w in self._numbers.items() if w.location in locations]
        for n in numbers:
            del self._numbers[n]
        self._gdb.delete(*numbers)

    def _serve(self) -> None:
        gdb = self._gdb
        try:
            while not self._quit.is_set():
                try:
                    stop = gdb.wait_stopped(0.25)
                except GdbTimeout:
                    continue  # still running; look at the quit flag again
                reason = stop.get("reason")
                if reason == TARGET_CLOSED:
                    break
                self.stops += 1
                self._cp = None
                watch = self._numbers.get(str(stop.get("bkptno")))
                if reason == "signal-received" and stop.get("signal-name") == "SIGABRT":
                    # QEMU reports a KVM internal error this way: the CPU cannot go on.
                    self.error = "QEMU stopped the CPU (SIGABRT: KVM internal error?)"
                    break
                if reason != "breakpoint-hit" or watch is None:
                    self.error = f"unexpected stop: {reason} {stop.get('signal-name', '')}".strip()
                else:
                    if watch.once:
                        self._numbers.pop(str(stop.get("bkptno")), None)  # GDB deleted it
                    probe = getattr(self, "_read_" + watch.reader.replace("-", "_"))(watch)
                    self._reschedule(watch, probe)
                    self._retire()
                gdb.cont()
        except Exception as exc:  # noqa: BLE001 - a failing witness must not stop the run
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.seconds = time.monotonic() - self._t0
            gdb.close()  # detaches if QEMU still runs, so the boot goes on without us

    def _reschedule(self, watch: Watch, probe: ProbeKey | None) -> None:
        """Delete, then insert, what the schedule says after this stop (deletions first:
        the hardware slots never overflow)."""
        delete, insert = self._schedule.hit(watch.location, self._readings.keys(), probe)
        if delete:
            self._disarm(*delete)
        for w in insert:
            self._arm(w)

    def _retire(self) -> None:
        """Delete `during` watches once a probe outside their window is running."""
        if self._cp is None or not self._cp["valid"]:
            return
        name = self._cp["name"]
        done = [n for n, w in self._numbers.items() if w.during and name not in w.during]
        if done:
            self._gdb.delete(*done)
            for n in done:
                self._schedule.drop(self._numbers.pop(n).location)

    def _put(self, cid: str | None, value: str, detail: dict) -> None:
        if cid is None:
            return
        if cid in self._readings:  # the first reading wins; a different later one is kept beside it
            prev = self._readings[cid]
            if value != prev.value:
                prev.detail.setdefault("other_readings", []).append(f"{value} ({detail.get('source', '?')})")
            return
        self._readings[cid] = Reading(cid, value, detail)

    def _current_probe(self) -> dict:
        if self._cp is None:
            addr = self._symbols.get("current_probe")
            raw = self._gdb.read_memory(addr, x86.CURRENT_PROBE_SIZE) if addr is not None else bytes(48)
            self._cp = x86.decode_current_probe(raw)
        return self._cp

    # -- readers: one per watch kind -------------------------------------------------------
    def _exc_snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """Registers (rdi, cs, cr4) and the frame at exc_dispatch; current_probe and the
        bytes at the saved RIP come along when the GDB-side reader is loaded."""
        self._insn = None
        if self._exc_reader:
            cp_addr = self._symbols.get("current_probe", 0)
            rip_off = 8 * x86.EXC_FRAME_FIELDS.index("rip")
            try:
                out = self._gdb.console(f"python lab_witness_exc({cp_addr}, {x86.EXC_FRAME_SIZE}, {rip_off})")
                line = next(ln for ln in out.splitlines() if ln.startswith("LABW "))
                snap = json.loads(line[5:])
            except (GdbError, StopIteration, ValueError):
                self._exc_reader = False  # MI reads from now on
            else:
                if snap["cp"]:
                    self._cp = x86.decode_current_probe(bytes.fromhex(snap["cp"]))
                if snap["insn"]:
                    self._insn = bytes.fromhex(snap["insn"])
                regs = {r: snap[r] for r in ("rdi", "cs", "cr4")}
                return regs, x86.decode_exc_frame(bytes.fromhex(snap["frame"]))
        gdb = self._gdb
        regs = gdb.read_registers("rdi", "cs", "cr4")
        return regs, x86.decode_exc_frame(gdb.read_memory(regs["rdi"], x86.EXC_FRAME_SIZE))

    def _read_exception(self, watch: Watch) -> None:
        regs, frame = self._exc_snapshot()
        cp = self._current_probe()
        vector, rip = frame["vector"], frame["rip"]
        detail = {
            "rip": f"{rip:#x}",
            "frame.cs": f"{frame['cs']:#x}",
            "cs": f"{regs['cs']:#x}",
            "cr4.tsd": regs["cr4"] >> 2 & 1,
            "probe": f"{cp['name']} {cp['param']}".strip(),
        }
        if vector == 6 and rip == self._symbols.get("ring_return_ud2"):
            self._ring_return(cp, frame, regs, detail)
        elif vector == 6 and rip == self._symbols.get("syscall_entry_ud2"):
            # SYSCALL reached LSTAR without reaching CPL0 (kvm_pvm from CPL3): the frame's CS.
            self._put(probe_check_id(cp), str(frame["cs"] & 3), {**detail, "source": "frame at syscall_entry_ud2"})
        else:
            self._fault(cp, frame, detail)

    def _ring_return(self, cp: dict, frame: dict, regs: dict, detail: dict) -> None:
        """Back from ring n: the frame's CS is ring n's, $cs is the CPL after the return."""
        name = _PROBE_NAMES.get(cp["name"], cp["name"])
        if name == "cpl-enter":
            # Under TCG `ring_entry` read it first; under KVM this is the only way to see CPL3.
            self._put(probe_check_id(cp), str(frame["cs"] & 3), {**detail, "source": "exception frame"})
            if cp["param"] == "iretq":
                cid = check_id("host", "cpl-return", {"from_cpl": cp["cpl"], "via": "ud2"})
                self._put(cid, str(regs["cs"] & 3), {**detail, "source": "$cs at exc_dispatch"})
        elif name in OUTCOME_PROBES and cp["id"] not in self._faulted:
            self._put(probe_check_id(cp), "ok", {**detail, "note": "ring trip ended with no exception"})

    def _fault(self, cp: dict, frame: dict, detail: dict) -> None:
        insn = self._insn if self._insn is not None else self._gdb.read_memory(frame["rip"], 4)
        detail["insn"] = insn.hex(" ")
        value = x86.exception_value(frame["vector"], frame["error_code"])
        name = _PROBE_NAMES.get(cp["name"], cp["name"])
        probed = PROBE_INSN_BYTES.get(cp["param"] if name == "priv-insn" else name)
        if probed is not None and not insn.startswith(probed):
            value = f"{value}@{insn[:len(probed)].hex()}"  # not at the probed instruction
        if name in OUTCOME_PROBES and cp["id"] not in self._faulted:
            self._faulted.add(cp["id"])
            self._put(probe_check_id(cp), value, detail)
        elif name == "cpl-enter" and frame["cs"] & 3:
            # A fault inside the ring: its frame shows the ring's CS too (the first reading
            # wins; under TCG `ring_entry` came first).
            self._put(probe_check_id(cp), str(frame["cs"] & 3), {**detail, "source": "exception frame (fault)"})

    def _regs_detail(self, watch: Watch, *names: str) -> tuple[dict[str, int], dict]:
        regs = self._gdb.read_registers(*names)
        return regs, {"cs": f"{regs['cs']:#x}", "rip": f"{regs['rip']:#x}", "source": watch.location}

    def _read_ring_entry(self, watch: Watch) -> None:
        regs, detail = self._regs_detail(watch, "cs", "rip")
        cp = self._current_probe()
        if cp["name"] == "cpl-enter":
            self._put(probe_check_id(cp), str(regs["cs"] & 3), detail)

    def _read_syscall_entry(self, watch: Watch) -> None:
        regs, detail = self._regs_detail(watch, "cs", "rip")
        cp = self._current_probe()
        if cp["name"] == "cpl-return" and cp["param"] == "syscall":
            self._put(probe_check_id(cp), str(regs["cs"] & 3), detail)

    def _read_cpuid(self, watch: Watch, order: tuple[str, ...]) -> None:
        regs = self._gdb.read_registers("rax", *order)
        raw = b"".join((regs[r] & 0xFFFFFFFF).to_bytes(4, "little") for r in order)
        self._put(watch.expects[0], raw.decode("latin-1"),
                  {"eax": f"{regs['rax'] & 0xFFFFFFFF:#x}", "source": watch.location})

    def _read_cpuid_vendor(self, watch: Watch) -> None:
        self._read_cpuid(watch, ("rbx", "rdx", "rcx"))  # leaf 0: EBX, EDX, ECX

    def _read_cpuid_hv_signature(self, watch: Watch) -> None:
        self._read_cpuid(watch, ("rbx", "rcx", "rdx"))  # 0x40000000: EBX, ECX, EDX

    def _read_cpuid_hv_bit(self, watch: Watch) -> None:
        ecx = self._gdb.read_register("rcx") & 0xFFFFFFFF
        self._put(watch.expects[0], str(ecx >> 31 & 1), {"ecx": f"{ecx:#x}", "source": watch.location})

    def _read_priv_entry(self, watch: Watch) -> ProbeKey | None:
        """Guard at `probe_priv(const char *insn, probe_fn fn, int cpl)`, first instruction:
        the probe about to run, from the arguments (current_probe is not set yet).
        None when unreadable: the schedule then treats it as unsafe."""
        try:
            regs = self._gdb.read_registers("rdi", "rdx")
            insn = self._gdb.read_memory(regs["rdi"], 16).split(b"\0", 1)[0].decode("ascii")
        except (GdbError, UnicodeDecodeError):
            return None
        return ("priv-insn", insn, regs["rdx"] & 0xFFFFFFFF)

    def _read_guest_entry(self, watch: Watch) -> None:
        regs, detail = self._regs_detail(watch, "cs", "rip", "efer")
        self._put(watch.expects[0], str(regs["cs"] & 3), {**detail, "efer.svme": regs["efer"] >> 12 & 1})

    # -- output --------------------------------------------------------------------------
    def _write(self, readings: list[Reading]) -> None:
        out = {
            "accel": self.accel,
            "watches": [asdict(w) for w in self.plan.watches],
            "missing": self._missing,
            "error": self.error,
            "stops": self.stops,
            "seconds": round(self.seconds, 4),
            "readings": [asdict(r) for r in readings],
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "gdb.readings.json").write_text(json.dumps(out, indent=2) + "\n")
