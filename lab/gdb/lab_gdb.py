"""Lab commands for an interactive (or scripted) GDB session on the lab's QEMU.

Load with `source lab/gdb/lab_gdb.py` (lab.debug does it for you). Commands:
  lab-cpl            current CPL ($cs & 3) and whether the CPU is in host or guest code
  lab-cr4            CR4 with its bits named (TSD, PAE, ...), plus CR0 and EFER
  lab-vmcb [ADDR]    decode the VMCB (default: the host's VMCB symbol): intercepts, last
                     exit code with its APM name, exit_info1/2, guest RIP and CPL
  lab-probes         the named probe points in the loaded symbols and the firmware's
                     current probe

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

# Named probe points: symbol -> what the witness reads there (docs/gdb.md).
PROBE_POINTS = (
    ("exc_dispatch", "every exception (CPL0): frame in RDI -> vector, error code, saved RIP/CS"),
    ("ring_iretq", "the IRETQ from CPL0 into ring n: stepi across it"),
    ("ring_entry", "first instruction at CPL1/2/3 after IRETQ: $cs"),
    ("ring_entry_sysret", "first instruction at CPL3 after SYSRETQ: $cs"),
    ("ring_return_ud2", "the ud2 that takes ring code back to CPL0 (#UD)"),
    ("syscall_entry", "LSTAR target, first instruction after SYSCALL: $cs"),
    ("ring_back_cpl0", "kernel context restored after a ring trip: $cs"),
    ("cpuid_vendor_done", "right after CPUID leaf 0: ebx/edx/ecx = vendor"),
    ("cpuid_hvbit_done", "right after CPUID leaf 1: ecx bit 31"),
    ("cpuid_hvsig_done", "right after CPUID 0x40000000: ebx/ecx/edx = signature"),
    ("current_probe", "struct current_probe: which probe runs now"),
    ("svm_vmrun_insn", "the host's VMRUN"),
    ("svm_vmexit_return", "first host instruction after #VMEXIT: lab-vmcb shows the exit"),
    ("guest_start", "the guest's first instruction (guest symbols)"),
)


def _read(addr: int, n: int) -> bytes:
    return bytes(gdb.selected_inferior().read_memory(addr, n))


def _reg(name: str) -> int:
    # Flag-typed registers (cr0, cr4, efer, eflags) print as [ ... ]; cast gives the number.
    return int(gdb.parse_and_eval(f"(unsigned long)${name}")) & (2**64 - 1)


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


def context_of(rip: int, cr3: int, vmcb_cr3: int | None, host_cr3: int | None) -> str:
    """Guest when RIP is in the guest's window, or CR3 is the guest's (from the VMCB)."""
    if GUEST_WINDOW[0] <= rip < GUEST_WINDOW[1]:
        return "guest"
    if vmcb_cr3 and cr3 == vmcb_cr3 and cr3 != host_cr3:
        return "guest"
    return "host"


if gdb is not None:

    class LabCpl(gdb.Command):
        """Current CPL ($cs & 3) and the context (host or guest)."""

        def __init__(self):
            super().__init__("lab-cpl", gdb.COMMAND_STATUS)

        def invoke(self, arg, from_tty):
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
        """CR4 with its bits named; CR0 and EFER too."""

        def __init__(self):
            super().__init__("lab-cr4", gdb.COMMAND_STATUS)

        def invoke(self, arg, from_tty):
            cr4, cr0, efer = _reg("cr4"), _reg("cr0"), _reg("efer")
            gdb.write(f"CR4 {cr4:#x} [{' '.join(x86.decode_bits(cr4, x86.CR4_BITS))}] TSD={cr4 >> 2 & 1}\n")
            gdb.write(f"CR0 {cr0:#x} [{' '.join(x86.decode_bits(cr0, x86.CR0_BITS))}]\n")
            gdb.write(f"EFER {efer:#x} [{' '.join(x86.decode_bits(efer, x86.EFER_BITS))}]\n")

    class LabVmcb(gdb.Command):
        """Decode a VMCB: lab-vmcb [ADDRESS-EXPRESSION]; default: the host's VMCB symbol."""

        def __init__(self):
            super().__init__("lab-vmcb", gdb.COMMAND_DATA)

        def invoke(self, arg, from_tty):
            addr = _vmcb_address(arg)
            if addr is None:
                raise gdb.GdbError(f"no VMCB symbol ({', '.join(VMCB_SYMBOLS)}) in the loaded symbols; "
                                   "give an address: lab-vmcb 0x...")
            gdb.write(x86.format_vmcb(x86.decode_vmcb(_read(addr, x86.VMCB_SIZE)), addr) + "\n")

    class LabProbes(gdb.Command):
        """Named probe points in the loaded symbols, and the firmware's current probe."""

        def __init__(self):
            super().__init__("lab-probes", gdb.COMMAND_STATUS)

        def invoke(self, arg, from_tty):
            for name, what in PROBE_POINTS:
                addr = _symbol(name)
                where = f"{addr:#018x}" if addr is not None else "(absent)".ljust(18)
                gdb.write(f"{where} {name:20} {what}\n")
            addr = _symbol("current_probe")
            if addr is not None:
                try:
                    cp = x86.decode_current_probe(_read(addr, x86.CURRENT_PROBE_SIZE))
                except gdb.MemoryError:
                    return
                if cp["valid"]:
                    gdb.write(f"current probe: #{cp['id']} {cp['name']} param={cp['param'] or '-'}"
                              f" cpl={cp['cpl']} tsd={cp['tsd']}\n")
                else:
                    gdb.write("current probe: none yet (magic not set)\n")

    for _cmd in (LabCpl, LabCr4, LabVmcb, LabProbes):
        _cmd()
