"""The GDB witness: a second, independent observer of the probes the firmware reports.

The firmware prints what it saw; this module stops the CPU at a few named points and reads
the machine state itself (CS, CR4, the exception frame, the faulting instruction's bytes,
the CPUID output registers). Its readings are compared with the serial records by the
judge; it never decides pass or fail.

    plan = witness_plan("tcg", ["host", "guest-svm"])
    w = GdbWitness(run_dir, host_elf, guest_elf, "127.0.0.1:1234", "tcg", plan=plan)
    w.start()              # attach to the paused QEMU, set breakpoints, continue
    ...                    # the runner reads the serial console meanwhile
    readings = w.finish(timeout=10)   # list[Reading], after QEMU exited

Where it looks (names from firmware/README.md; details in docs/gdb.md):
- `exc_dispatch` (CPL0, every exception; the frame pointer is in RDI): vector, error code,
  saved RIP and CS, CR4, the bytes at the saved RIP. A #UD at `ring_return_ud2` is the way
  back from ring code: the frame's CS is the ring's CPL (how CPL1-3 are witnessed under
  KVM, where breakpoints on CPL>0 code never stop) and $cs there is the CPL after the return.
- `probe_set` (CPL0): a probe boundary. When a probe ends with no exception seen, its
  instruction completed: `ok`.
- `ring_entry`, `ring_entry_sysret`, `syscall_entry` (TCG only): $cs at the first
  instruction in the ring / after SYSCALL.
- `cpuid_*_done` (CPL0): EBX/ECX/EDX right after CPUID.
- guest code (TCG only, guest symbols): $cs and EFER while the SVM guest runs.

KVM gives 4 hardware breakpoints, on CPL0 code only; the plan for KVM uses exactly those.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .expectations import HOST_RINGS, PRIV_INSNS, TSC_CPLS
from .gdb import x86
from .gdbmi import HW_BREAKPOINT_SLOTS, TARGET_CLOSED, Gdb, GdbError, GdbTimeout
from .ids import check_id

UNREACHED = "unreached"  # the judge turns it into `error`

# Instruction bytes of each probed instruction: a fault counts for the probe only if it
# happened at that instruction (otherwise the reading says where it happened instead).
PROBE_INSN_BYTES = {
    "rdtsc": bytes.fromhex("0f31"),
    "rdtscp": bytes.fromhex("0f01f9"),
    "hlt": bytes.fromhex("f4"),
    "cli": bytes.fromhex("fa"),
    "mov-cr4": bytes.fromhex("0f22e0"),  # mov %rax, %cr4
}
# current_probe.name (15 chars at most) -> record probe name.
_PROBE_NAMES = {"cpuid-hv-sig": "cpuid-hv-signature"}
# current_probe -> check params, in record order (firmware/kmain.c; docs/records.md).
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
# Probes whose outcome is "which exception, or ok".
_OUTCOME_PROBES = ("priv-insn", "rdtsc", "rdtscp")


@dataclass(frozen=True)
class Reading:
    check_id: str
    value: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Watch:
    """One breakpoint: where, what to read there, and which checks it should produce."""

    location: str  # a symbol; the breakpoint goes on its exact address
    reader: str  # exception | boundary | ring-entry | syscall-entry | cpuid-vendor | ...
    expects: tuple[str, ...] = ()  # check ids; any left without a reading -> `unreached`
    guest: bool = False  # the symbol comes from the guest's ELF


@dataclass(frozen=True)
class WitnessPlan:
    accel: str
    scopes: tuple[str, ...]
    watches: tuple[Watch, ...]

    @property
    def hardware(self) -> bool:
        """KVM: software breakpoints never fire under kvm_pvm; only the 4 debug registers."""
        return self.accel == "kvm"

    @property
    def check_ids(self) -> list[str]:
        return [cid for w in self.watches for cid in w.expects]


def _host_ids() -> dict[str, list[str]]:
    h = "host"
    return {
        "enter-iretq": [check_id(h, "cpl-enter", {"cpl": c, "via": "iretq"}) for c in HOST_RINGS],
        "enter-sysret": [check_id(h, "cpl-enter", {"cpl": 3, "via": "sysret"})],
        "return-ud2": [check_id(h, "cpl-return", {"from_cpl": c, "via": "ud2"}) for c in HOST_RINGS],
        "return-syscall": [check_id(h, "cpl-return", {"from_cpl": c, "via": "syscall"}) for c in HOST_RINGS],
        "outcomes": [check_id(h, "priv-insn", {"insn": i, "cpl": c}) for c in HOST_RINGS for i in PRIV_INSNS]
        + [check_id(h, insn, {"tsd": t, "cpl": c}) for insn in ("rdtsc", "rdtscp") for t in (0, 1) for c in TSC_CPLS],
    }


def witness_plan(accel: str, scopes: Iterable[str] = ("host",)) -> WitnessPlan:
    """Where the witness stops the CPU for this accelerator and these check scopes.

    TCG: software breakpoints (QEMU checks them at translation time, memory is untouched,
    no slot limit), also on CPL>0 code and in the running SVM guest.
    KVM: the four hardware breakpoints, all on CPL0 code; CPL1-3 are read from the
    exception frame; no SVM guest exists under this KVM, so guest scopes get no watches.
    """
    scopes = tuple(scopes)
    ids = _host_ids()
    watches: list[Watch] = []
    if "host" in scopes:
        if accel == "kvm":
            watches += [
                Watch("exc_dispatch", "exception", tuple(ids["return-ud2"] + ids["enter-iretq"] + ids["enter-sysret"])),
                Watch("probe_set", "boundary", tuple(ids["outcomes"])),
                Watch("cpuid_vendor_done", "cpuid-vendor", (check_id("host", "cpuid-vendor", {"leaf": 0}),)),
                Watch("cpuid_hvsig_done", "cpuid-hv-signature", (check_id("host", "cpuid-hv-signature", {}),)),
            ]
        else:
            watches += [
                Watch("exc_dispatch", "exception", tuple(ids["return-ud2"])),
                Watch("probe_set", "boundary", tuple(ids["outcomes"])),
                Watch("ring_entry", "ring-entry", tuple(ids["enter-iretq"])),
                Watch("ring_entry_sysret", "ring-entry", tuple(ids["enter-sysret"])),
                Watch("syscall_entry", "syscall-entry", tuple(ids["return-syscall"])),
                Watch("cpuid_vendor_done", "cpuid-vendor", (check_id("host", "cpuid-vendor", {"leaf": 0}),)),
                Watch("cpuid_hvbit_done", "cpuid-hv-bit", (check_id("host", "cpuid-hv-bit", {}),)),
                Watch("cpuid_hvsig_done", "cpuid-hv-signature", (check_id("host", "cpuid-hv-signature", {}),)),
            ]
    if "guest-svm" in scopes and accel == "tcg":
        watches.append(Watch("guest_start", "guest-entry",
                             (check_id("guest-svm", "cpl-enter", {"cpl": 0, "via": "vmrun"}),), guest=True))
    if accel == "kvm" and len(watches) > HW_BREAKPOINT_SLOTS:
        raise ValueError(f"KVM plan needs {len(watches)} hardware breakpoints; there are {HW_BREAKPOINT_SLOTS}")
    return WitnessPlan(accel, scopes, tuple(watches))


def probe_check_id(cp: dict, scope: str = "host") -> str | None:
    """The check a firmware `current_probe` stands for, or None (e.g. `hv_main`)."""
    name = _PROBE_NAMES.get(cp["name"], cp["name"])
    params = _PARAMS.get(name)
    return check_id(scope, name, params(cp)) if params else None


@dataclass
class _Fault:
    probe: dict  # current_probe when it happened
    value: str
    detail: dict


class GdbWitness:
    """Runs one GDB session against one paused QEMU, in a background thread."""

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
        self.plan = plan or witness_plan(accel, scopes)
        self.transcript = self.run_dir / "gdb.mi.log"
        self.error: str | None = None  # why the session ended early, if it did
        self.stops = 0
        self.seconds = 0.0  # attach to the end of the session
        self._gdb = Gdb(self.transcript, accel=accel, gdb=gdb, timeout=command_timeout)
        self._by_number: dict[str, Watch] = {}
        self._missing: dict[str, str] = {}  # location -> why it has no breakpoint
        self._readings: dict[str, Reading] = {}
        self._faults: dict[int, _Fault] = {}  # probe id -> first fault seen in it
        self._symbols: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self._t0 = 0.0

    # -- runner API ----------------------------------------------------------------------
    def start(self) -> None:
        """Attach, set the plan's breakpoints and let the CPU run. Raises GdbError or
        GdbTimeout if GDB cannot attach (GDB is then already gone)."""
        self._t0 = time.monotonic()
        try:
            self._gdb.start()
            self._gdb.connect(self.gdb_addr, self.host_elf)
            if self.guest_elf and any(w.guest for w in self.plan.watches):
                self._gdb.add_symbols(self.guest_elf)  # linked at its load address
            for name in ("ring_return_ud2", "syscall_entry_ud2", "current_probe"):
                addr = self._gdb.symbol_address(name)
                if addr is not None:
                    self._symbols[name] = addr
            for watch in self.plan.watches:
                self._arm(watch)
            self._gdb.cont()
        except BaseException:
            self._gdb.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="gdb-witness", daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 10.0) -> list[Reading]:
        """Wait for the session to end (QEMU exits: the remote end closes), at most
        `timeout` seconds; then end GDB (detaching if QEMU still runs) and return the
        readings, with `unreached` for every planned check no stop produced."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.error = self.error or f"QEMU still running {timeout:g} s after finish() was called"
                self._quit.set()
                self._thread.join(self._gdb.timeout + 2)
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
            return
        try:
            number = self._gdb.breakpoint(f"*{watch.location}")
        except GdbError as exc:
            # A missing symbol is a lab bug: its checks become `unreached` with the reason.
            self._missing[watch.location] = exc.message
            return
        self._by_number[number] = watch

    def _serve(self) -> None:
        gdb = self._gdb
        try:
            while not self._quit.is_set():
                try:
                    stop = gdb.wait_stopped(0.25)
                except GdbTimeout:
                    continue  # still running; look at the quit flag
                if stop.get("reason") == TARGET_CLOSED:
                    break
                self.stops += 1
                watch = self._by_number.get(str(stop.get("bkptno")))
                if stop.get("reason") != "breakpoint-hit" or watch is None:
                    # Not ours (e.g. a signal): note it and let the CPU go on.
                    self.error = f"unexpected stop: {stop.get('reason')} {stop.get('signal-name', '')}".strip()
                else:
                    getattr(self, "_read_" + watch.reader.replace("-", "_"))(watch)
                gdb.cont()
        except Exception as exc:  # noqa: BLE001 - any failure ends the witness, not the run
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            # A probe cut short (e.g. the firmware stopped): its fault still counts.
            for fault in list(self._faults.values()):
                self._close_probe(fault.probe)
            self.seconds = time.monotonic() - self._t0
            gdb.close()  # detaches if QEMU still runs, so the boot goes on without us

    def _put(self, cid: str | None, value: str, detail: dict) -> None:
        if cid is None:
            return
        if cid in self._readings:  # first reading wins; keep count of repeats
            prev = self._readings[cid]
            prev.detail["seen"] = prev.detail.get("seen", 1) + 1
            return
        self._readings[cid] = Reading(cid, value, detail)

    def _current_probe(self) -> dict:
        addr = self._symbols.get("current_probe")
        if addr is None:
            return {"valid": False, "id": 0, "cpl": 0, "tsd": 0, "name": "", "param": ""}
        return x86.decode_current_probe(self._gdb.read_memory(addr, x86.CURRENT_PROBE_SIZE))

    # -- readers: one per watch kind -------------------------------------------------------
    def _read_exception(self, watch: Watch) -> None:
        gdb = self._gdb
        regs = gdb.read_registers("rdi", "cs", "cr4")
        frame = x86.decode_exc_frame(gdb.read_memory(regs["rdi"], x86.EXC_FRAME_SIZE))
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
            # Back from ring code: frame CS = the ring's CS, $cs = CPL after the return.
            if cp["name"] == "cpl-enter":
                self._put(probe_check_id(cp), str(frame["cs"] & 3), {**detail, "source": "exception frame"})
                if cp["param"] == "iretq":
                    ret = {"from_cpl": cp["cpl"], "via": "ud2"}
                    self._put(check_id("host", "cpl-return", ret), str(regs["cs"] & 3), detail)
            return
        if vector == 6 and rip == self._symbols.get("syscall_entry_ud2"):
            # SYSCALL reached LSTAR but not CPL0 (kvm_pvm from CPL3): the frame shows the CPL.
            self._put(probe_check_id(cp), str(frame["cs"] & 3), {**detail, "source": "exception frame at LSTAR"})
            return
        insn = gdb.read_memory(rip, 4)
        detail["insn"] = insn.hex(" ")
        value = x86.exception_value(vector, frame["error_code"])
        expected = PROBE_INSN_BYTES.get(cp["param"] if cp["name"] == "priv-insn" else cp["name"])
        if expected is not None and not insn.startswith(expected):
            value = f"{value}@{insn[:len(expected)].hex()}"  # a fault, but not at the probed instruction
        if cp["id"] not in self._faults:
            self._faults[cp["id"]] = _Fault(cp, value, detail)

    def _read_boundary(self, watch: Watch) -> None:
        """probe_set entry: current_probe still holds the probe that just ended."""
        cp = self._current_probe()
        if cp["valid"]:
            self._close_probe(cp)

    def _close_probe(self, cp: dict) -> None:
        name = _PROBE_NAMES.get(cp["name"], cp["name"])
        if name not in _OUTCOME_PROBES:
            return
        fault = self._faults.pop(cp["id"], None)
        if fault:
            self._put(probe_check_id(cp), fault.value, fault.detail)
        else:
            self._put(probe_check_id(cp), "ok", {"probe": f"{cp['name']} {cp['param']}".strip(),
                                                 "note": "no exception between probe_set calls"})

    def _read_ring_entry(self, watch: Watch) -> None:
        regs = self._gdb.read_registers("cs", "rip")
        cp = self._current_probe()
        if cp["name"] == "cpl-enter":
            self._put(probe_check_id(cp), str(regs["cs"] & 3),
                      {"cs": f"{regs['cs']:#x}", "rip": f"{regs['rip']:#x}", "source": watch.location})

    def _read_syscall_entry(self, watch: Watch) -> None:
        regs = self._gdb.read_registers("cs", "rip")
        cp = self._current_probe()
        if cp["name"] == "cpl-return" and cp["param"] == "syscall":
            self._put(probe_check_id(cp), str(regs["cs"] & 3),
                      {"cs": f"{regs['cs']:#x}", "rip": f"{regs['rip']:#x}", "source": watch.location})

    def _read_cpuid(self, cid: str, order: tuple[str, ...], watch: Watch) -> None:
        regs = self._gdb.read_registers("rax", *order)
        raw = b"".join((regs[r] & 0xFFFFFFFF).to_bytes(4, "little") for r in order)
        self._put(cid, raw.decode("latin-1"), {"eax": f"{regs['rax'] & 0xFFFFFFFF:#x}", "source": watch.location})

    def _read_cpuid_vendor(self, watch: Watch) -> None:
        self._read_cpuid(watch.expects[0], ("rbx", "rdx", "rcx"), watch)  # leaf 0: EBX, EDX, ECX

    def _read_cpuid_hv_signature(self, watch: Watch) -> None:
        self._read_cpuid(watch.expects[0], ("rbx", "rcx", "rdx"), watch)  # 0x40000000: EBX, ECX, EDX

    def _read_cpuid_hv_bit(self, watch: Watch) -> None:
        ecx = self._gdb.read_register("rcx")
        self._put(watch.expects[0], str(ecx >> 31 & 1), {"ecx": f"{ecx & 0xFFFFFFFF:#x}", "source": watch.location})

    def _read_guest_entry(self, watch: Watch) -> None:
        regs = self._gdb.read_registers("cs", "rip", "efer")
        self._put(watch.expects[0], str(regs["cs"] & 3), {
            "cs": f"{regs['cs']:#x}", "rip": f"{regs['rip']:#x}",
            "efer.svme": regs["efer"] >> 12 & 1, "source": watch.location,
        })

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
