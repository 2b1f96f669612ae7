"""Lab commands for an interactive (or scripted) GDB session on the lab's QEMU.

Load with `source lab/gdb/lab_gdb.py` (lab.debug does it for you). Commands (they are
listed by `help user-defined`):
  lab-cpl            current CPL ($cs & 3) and whether the CPU is in host or guest code
  lab-cr4            CR4 with its bits named (TSD, PAE, ...), plus CR0 and EFER
  lab-vmcb [ADDR]    decode the VMCB (default: the host's VMCB symbol): intercepts, last
                     exit code with its APM name, exit_info1/2, guest RIP and CPL
  lab-probes         the probed instructions (ELF labels probe_insn_<name>) and the named
                     points of the firmware, from the symbol files, not from firmware memory
  lab-kvm MODULE     the session runs under KVM (lab.debug says so): `break`/`tbreak`
                     become hardware breakpoints; commands that plant a hidden software
                     breakpoint (finish, until, advance) are refused with the reason

Runs in GDB's own Python (standard library only); decoders live in x86.py beside it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import x86  # noqa: E402  (beside this file; GDB has no notion of the lab package)

try:
    import gdb  # only inside GDB
except ImportError:  # imported for its tables by tests
    gdb = None

# The guest's fixed physical window (guests/include/lab_guest_abi.h: LABG_WINDOW_*).
GUEST_WINDOW = (0x01000000, 0x01000000 + 0x00200000)
# Host symbols that hold (or point to) the VMCB, tried in order (firmware/svm.c).
VMCB_SYMBOLS = ("svm_vmcb",)
# x86 has four breakpoint address registers, DR0-DR3 (SDM Vol. 3B 18.2).
HW_SLOTS = 4
PROBE_INSN, PROBE_DONE = "probe_insn_", "probe_done_"

# Named points: symbol -> what to look at there (docs/gdb.md). Shown when the ELF has them.
PROBE_POINTS = (
    ("exc_dispatch", "every exception (CPL0): f->vector, f->error_code, f->rip, f->cs (CPL = f->cs & 3)"),
    ("probe_run", "runs one probe stub at one CPL"),
    ("probe_iretq", "the IRETQ from CPL0 into the probe's ring: stepi across it (TCG)"),
    ("ring_iretq", "the IRETQ of a ring trip: stepi across it (TCG)"),
    ("syscall_entry", "LSTAR target, first instruction after SYSCALL"),
    ("svm_vmrun_insn", "the host's VMRUN"),
    ("svm_vmexit_return", "first host instruction after #VMEXIT: lab-vmcb shows the exit"),
    ("soft_trap", "the software host's handler for every guest trap (CPL0): f->rip, f->cs (TCG)"),
    ("soft_enter_iretq", "the software host's last instruction before the guest: its IRETQ frame at $rsp"),
    ("guest_start", "the guest's first instruction (guest symbols)"),
)

# Commands that plant a momentary software breakpoint of their own (GDB manual, "Continuing
# and Stepping"): under KVM that is the breakpoint kind QEMU cannot honour.
SOFTWARE_STOPPERS = ("finish", "until", "advance")

_state = {"kvm": None, "symbols": None}  # the session's KVM module (lab-kvm); ELF symbols


def probe_stubs(symbols: dict[str, int]) -> list[tuple[str, int, int | None]]:
    """(name, address of the probed instruction, address of its return trap) by address."""
    out = []
    for sym, addr in symbols.items():
        if sym.startswith(PROBE_INSN):
            name = sym[len(PROBE_INSN):]
            out.append((name, addr, symbols.get(PROBE_DONE + name)))
    return sorted(out, key=lambda s: (s[1], s[0]))


def in_guest_window(addr: int) -> bool:
    return GUEST_WINDOW[0] <= addr < GUEST_WINDOW[1]


# The software host's trap path (firmware/soft_trap.c, soft_run.S): CPL0 code, but entered
# from the CPL1 guest's traps.
SOFT_TRAP_PATH = ("soft_trap", "soft_exit_tramp")


def break_refusal(module: str | None, addr: int | None, symbols: dict[str, int] | None = None) -> str | None:
    """Why a breakpoint at `addr` cannot work under this KVM, or None. Measured under
    kvm_pvm (docs/gdb.md): GDB stops on CPL0 code only, and the guest's code runs at CPL1/CPL3
    under KVM (no SVM: the software host deprivileges it), so the CPU takes a #DB instead; a
    hardware breakpoint in the software host's trap path also hands the CPU a #DB (an
    unexpected #DB at soft_exit_tramp, nested exceptions at soft_trap) and ends the run."""
    if module != "kvm_pvm" or addr is None:
        return None
    if in_guest_window(addr):
        return ("guest code runs at CPL1/CPL3 under KVM (the software host runs the guest) and kvm_pvm "
                "stops GDB on CPL0 code only: a breakpoint there hands the guest a #DB. Stop at "
                "`soft_enter_iretq` (the guest's entry: its RIP and CS are in the IRETQ frame at $rsp)")
    trap_path = {symbols[n]: n for n in SOFT_TRAP_PATH if symbols and n in symbols}
    if addr in trap_path:
        return (f"`{trap_path[addr]}` is the software host's trap path: under kvm_pvm a hardware breakpoint "
                "there hands the CPU a #DB and ends the run. Stop at `soft_enter_iretq` instead")
    return None


def context_of(rip: int, cr3: int, vmcb_cr3: int | None, host_cr3: int | None) -> str:
    """Guest when RIP is in the guest's window, or CR3 is the guest's (from the VMCB)."""
    if in_guest_window(rip):
        return "guest"
    if vmcb_cr3 and cr3 == vmcb_cr3 and cr3 != host_cr3:
        return "guest"
    return "host"


NO_TARGET = ("no CPU to read: QEMU is not attached (it has exited, or the session ended); "
             "its serial log is in the run folder. Start a new session: invoke lab.debug")


if gdb is not None:

    def _require_cpu(what: str) -> None:
        """A clear message instead of GDB's `No registers.` once QEMU is gone."""
        if gdb.selected_thread() is None:
            raise gdb.GdbError(f"{what}: {NO_TARGET}")

    def _read(addr: int, n: int) -> bytes:
        return bytes(gdb.selected_inferior().read_memory(addr, n))

    def _reg(name: str) -> int:
        # Flag-typed registers (cr0, cr4, efer, eflags) print as [ ... ]; cast gives the number.
        return int(gdb.parse_and_eval(f"(unsigned long)${name}")) & (2**64 - 1)

    def _elf_symbols() -> dict[str, int]:
        """Every loaded symbol file's ELF symbols (labels included, which GDB cannot list),
        read once: the files GDB loaded, not a later rebuild."""
        if _state["symbols"] is None:
            out: dict[str, int] = {}
            for obj in gdb.objfiles():
                if obj.filename and os.path.isfile(obj.filename):
                    for name, addr in x86.elf_symbols(obj.filename).items():
                        out.setdefault(name, addr)
            _state["symbols"] = out
        return _state["symbols"]

    def _symbol(name: str) -> int | None:
        try:
            sym = gdb.lookup_global_symbol(name) or gdb.lookup_static_symbol(name)
            if sym is not None:
                return int(sym.value().address)
            return int(gdb.parse_and_eval(f"(unsigned long)&{name}"))
        except gdb.error:
            return None

    def _vmcb_address(arg: str) -> int | None:
        if arg.strip():
            return int(gdb.parse_and_eval(arg))
        for name in VMCB_SYMBOLS:
            addr = _symbol(name)
            if addr is not None:
                # A pointer variable holds the VMCB's address; an array/struct is the VMCB.
                sym = gdb.lookup_global_symbol(name)
                if sym is not None and sym.type.strip_typedefs().code == gdb.TYPE_CODE_PTR:
                    return int(sym.value())
                return addr
        return None

    class LabCpl(gdb.Command):
        """Current CPL ($cs & 3) and the context (host or guest): lab-cpl"""

        def __init__(self):
            super().__init__("lab-cpl", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            _require_cpu("lab-cpl")
            cs, rip, cr3 = _reg("cs"), _reg("pc"), _reg("cr3")
            vmcb_cr3 = None
            addr = _vmcb_address("")
            if addr:
                try:
                    vmcb_cr3 = x86.decode_vmcb(_read(addr, 0x600))["cr3"]
                except gdb.MemoryError:
                    pass
            ctx = context_of(rip, cr3, vmcb_cr3, None)
            gdb.write(f"CPL {cs & 3} ({ctx}) cs={cs:#x} rip={rip:#x}\n")

    class LabCr4(gdb.Command):
        """CR4 with its bits named; CR0 and EFER too: lab-cr4"""

        def __init__(self):
            super().__init__("lab-cr4", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            _require_cpu("lab-cr4")
            cr4, cr0, efer = _reg("cr4"), _reg("cr0"), _reg("efer")
            gdb.write(f"CR4 {cr4:#x} [{' '.join(x86.decode_bits(cr4, x86.CR4_BITS))}] TSD={cr4 >> 2 & 1}\n")
            gdb.write(f"CR0 {cr0:#x} [{' '.join(x86.decode_bits(cr0, x86.CR0_BITS))}]\n")
            gdb.write(f"EFER {efer:#x} [{' '.join(x86.decode_bits(efer, x86.EFER_BITS))}]\n")

    class LabVmcb(gdb.Command):
        """Decode the VMCB and its last #VMEXIT: lab-vmcb [ADDRESS-EXPRESSION]
Default: the host's VMCB symbol. Before the first #VMEXIT (or with SVM off) it says so
instead of decoding exit fields that hold nothing yet."""

        def __init__(self):
            super().__init__("lab-vmcb", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            _require_cpu("lab-vmcb")
            addr = _vmcb_address(arg)
            if addr is None:
                raise gdb.GdbError(f"lab-vmcb: no VMCB symbol ({', '.join(VMCB_SYMBOLS)}) in the loaded "
                                   "symbols; give an address: lab-vmcb 0x...")
            v = x86.decode_vmcb(_read(addr, x86.VMCB_SIZE))
            state = x86.vmcb_exit_state(v, _reg("efer"))
            if state is None:
                gdb.write(x86.format_vmcb(v, addr) + "\n")
                return
            gdb.write(f"VMCB at {addr:#x}: {state}\n")
            if state.startswith("EFER.SVME=0"):
                return
            if state.startswith("no #VMEXIT"):  # set up: intercepts and guest state are real
                lines = x86.format_vmcb(v, addr).splitlines()
                gdb.write("\n".join(lines[2:]) + "\n")
            gdb.write("  break at svm_vmexit_return, continue, then lab-vmcb shows each exit\n")

    class LabProbes(gdb.Command):
        """The probed instructions and the firmware's named points: lab-probes
Read from the symbol files (ELF labels probe_insn_<name>, each followed by its return trap
probe_done_<name>) and their bytes as linked, never from firmware memory."""

        def __init__(self):
            super().__init__("lab-probes", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            symbols = _elf_symbols()
            stubs = probe_stubs(symbols)
            files = [o.filename for o in gdb.objfiles() if o.filename and os.path.isfile(o.filename)]
            gdb.write(f"probed instructions ({len(stubs)}): `break` at one by its label, or at exc_dispatch "
                      "with f->rip == &probe_insn_<name>; bytes as linked in the ELF\n")
            for name, insn, done in stubs:
                trap = f"return trap +{done - insn}" if done is not None else "no probe_done_ label"
                raw = b""
                if done is not None and 0 < done - insn <= 15:
                    raw = next((b for f in files if (b := x86.elf_bytes(f, insn, done - insn))), b"")
                # the label itself: the name `break` takes (probe_insn_guest_rdtsc, not guest_rdtsc)
                gdb.write(f"  {insn:#010x}  {PROBE_INSN + name:32} {trap:16} {raw.hex(' ')}".rstrip() + "\n")
            gdb.write("named points:\n")
            for name, what in PROBE_POINTS:
                if name in symbols:
                    gdb.write(f"  {symbols[name]:#010x}  {name:18} {what}\n")

    class LabKvm(gdb.Command):
        """Under KVM: break/tbreak set hardware breakpoints: lab-kvm MODULE
lab.debug runs it before attaching under KVM. `break`/`tbreak` then set hardware breakpoints (QEMU's gdbstub cannot plant software ones
under KVM: kvm_pvm kills the VM, other KVMs may never stop), at most 4 (DR0-DR3), and
finish/until/advance (which plant a hidden software breakpoint) are refused."""

        def __init__(self):
            super().__init__("lab-kvm", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            module = arg.strip() or "kvm"
            _state["kvm"] = module
            for name, hw in (("break", "hbreak"), ("tbreak", "thbreak")):
                HwBreak(name, hw)
            for name in SOFTWARE_STOPPERS:
                Refuse(name)

    def _hw_in_use() -> int:
        kinds = (gdb.BP_HARDWARE_BREAKPOINT, gdb.BP_HARDWARE_WATCHPOINT, gdb.BP_READ_WATCHPOINT,
                 gdb.BP_ACCESS_WATCHPOINT)
        return sum(1 for b in gdb.breakpoints() if b.enabled and b.type in kinds)

    class HwBreak(gdb.Command):
        """Under KVM: a hardware breakpoint (see `help lab-kvm`)."""

        def __init__(self, name: str, hw: str):
            super().__init__(name, gdb.COMMAND_BREAKPOINTS, gdb.COMPLETE_LOCATION)
            self.name, self.hw = name, hw

        def invoke(self, arg, from_tty):
            if _hw_in_use() >= HW_SLOTS:
                raise gdb.GdbError(f"{self.name}: all {HW_SLOTS} hardware breakpoint slots (DR0-DR3) are in "
                                   "use and KVM takes no software breakpoints: delete one first (info breakpoints)")
            where = arg.split(" if ", 1)[0].strip()
            addr = None
            if where:
                try:
                    sals = gdb.decode_line(where)[1]
                    addr = int(sals[0].pc) if sals else None
                except gdb.error as exc:
                    raise gdb.GdbError(f"{self.name} {where}: {exc}") from None
            symbols = _elf_symbols()
            block = gdb.current_progspace().block_for_pc(addr) if addr is not None else None
            func = block.function.name if block is not None and block.function is not None else None
            if func in SOFT_TRAP_PATH and func in symbols:
                addr = symbols[func]  # `break soft_trap` lands after the prologue: same function
            why = break_refusal(_state["kvm"], addr, symbols)
            if why:
                raise gdb.GdbError(f"{self.name} {where}: refused: {why}")
            gdb.write(f"({self.name} -> {self.hw}: KVM takes hardware breakpoints only)\n")
            gdb.execute(f"{self.hw} {arg}", from_tty)

    class Refuse(gdb.Command):
        """Refused under KVM (see `help lab-kvm`)."""

        def __init__(self, name: str):
            super().__init__(name, gdb.COMMAND_RUNNING)
            self.name = name

        def invoke(self, arg, from_tty):
            raise gdb.GdbError(f"{self.name}: refused under KVM: it plants a temporary software breakpoint, "
                               f"which QEMU cannot plant under KVM ({_state['kvm']}: the VM stops or it never fires). "
                               "Use `tbreak *ADDRESS` (hardware here) and `continue`, or `stepi`")

    for _cmd in (LabCpl, LabCr4, LabVmcb, LabProbes, LabKvm):
        _cmd()
