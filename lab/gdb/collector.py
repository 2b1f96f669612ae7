"""GDB-side evidence collector for the lab's witness (runs inside GDB's Python).

It only records what the CPU shows at each stop, as one JSON line per stop, and lets the CPU
go on (a breakpoint whose stop() returns False costs no GDB/MI round trip). It decides
nothing: lab/witness.py turns the stops into readings. Loaded by `source`, started by
`python lab_collect_start(CONFIG_JSON)`.

Watch kinds:
  insn  a probe's entry no-op (probe_pre_<stub>), before the probed instruction: records the CPU
        there (registers incl. CS, SS, RFLAGS, CR4; the live bytes from probe_insn_<stub> to its
        return trap and GDB's own disassembly of them; from QEMU's `info registers` the CPL,
        IDTR, GDTR and TR; the IDT's exception gates and the TSS the CPU would use; the TSS I/O
        bitmap bytes of the ports `io` names, read through TR.base and the TSS's I/O map base),
        then makes the CPU execute exactly the probed instruction: RIP to probe_insn_<stub> and
        one single step, recording the state after it. Where that step ends at a trap watch (the
        CPU delivered an exception to an IDT stub), that watch's record is written from there.
  trap  an IDT stub: the CPU just delivered `vector`. Records the registers and the stack
        the CPU pushed (error code if any, RIP, CS, RFLAGS, RSP, SS) and the bytes at RIP.
        `sys`: also the IDTR/TR the CPU has (QEMU's `info registers`), its gate for `vector`,
        the TSS and the I/O bitmap bytes of `io` where the trapping RIP is in a probe stub
        (accelerators without insn watches: their strongest evidence).
        `skip`: the stub starts with a no-op of that many bytes; the CPU resumes past it.
  regs  a code label: records the registers there; `arm`: enables (a leading "-": disables) the
        watch at that location, so it stops only between two labels.
  vmexit  the host's first instruction after #VMEXIT: the registers and the exit fields the CPU
        just wrote to the VMCB at `vmcb` (exit code, EXITINFO1, the guest's CPL, RIP and RAX).
  end   a real stop (the lab's MI session deletes the `ends` watches, then continues).

With `"record": false` in the config every watch writes only {"at", "kind": "stop"} and lets
the CPU go on (an `end` still stops for the MI session): the same stops, nothing read.
lab/bench.py times that against the recording session to split a stop's cost into the stop
itself and the reading.

A trap watch with `msr` entries [MSR, first RIP, last RIP] also reads a control QEMU's gdbstub
does not show (an MSR) where the trapping RIP is in that range: the CPU itself runs the
firmware's `witness_rdmsr` (RDMSR at CPL0, its bytes 0f 32 checked first) as one single step
with ECX = the MSR. The step and the register writes around it are raw remote-protocol
packets: GDB's own idea of the registers, and of where it stopped, never changes, and every
register the step touched is put back before the CPU goes on. The insn watch's step is a raw
packet too, but the CPU is meant to stay where the step left it: GDB's register cache is
flushed after it, so GDB resumes from there.
"""

import json
import os
import sys
import time

import gdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import x86  # noqa: E402  (beside this file: the IDT gate decoding the lab's reader uses too)

_REGS = ("cs", "ss", "rip", "rsp", "eflags", "cr0", "cr4", "efer", "rax", "rbx", "rcx", "rdx")
_MASK = (1 << 64) - 1
# word: the frame's word size (4: 32-bit host); traps: trap watches by address; idt/tr: the
# IDTR and TR of the last `info registers` (insn watch); stubs: [first, last RIP] of each probe stub
# faults: what a trap record needs where no watch is (the MSRs to read there)
_state = {"out": None, "watches": {}, "word": 8, "traps": {}, "stubs": (), "faults": {}, "record": True}
RDMSR = bytes.fromhex("0f32")
# QEMU's x86-64 gdbstub registers (the 'g' packet's layout): number -> (byte offset, size).
# RAX..R15 are 8 bytes each (0-15), RIP 8 (16), EFLAGS 4 (17), then CS, SS, ... 4 each.
_RAW = {"rax": (0, 0, 8), "rbx": (1, 8, 8), "rcx": (2, 16, 8), "rdx": (3, 24, 8), "rsp": (7, 56, 8),
        "rip": (16, 128, 8), "eflags": (17, 136, 4), "cs": (18, 140, 4), "ss": (19, 144, 4)}
SAVED = ("rax", "rcx", "rdx", "rsp", "rip", "eflags")  # what witness_rdmsr's step may change
IDT_GATES = 32  # the exception vectors (SDM Vol. 3A 6.3.1)
TSS_SIZE = 0x68  # the 64-bit TSS (SDM Vol. 3A 8.7); the 32-bit one (7.2.1) is as long


def _registers():
    frame = gdb.selected_frame()
    return {r: int(frame.read_register(r)) & _MASK for r in _REGS}


def _memory(address, size):
    try:
        return bytes(gdb.selected_inferior().read_memory(address, size)).hex()
    except gdb.MemoryError:
        return None


class _Watch(gdb.Breakpoint):
    def __init__(self, spec):
        kind = gdb.BP_HARDWARE_BREAKPOINT if spec.get("hw") else gdb.BP_BREAKPOINT
        # By the address the lab read from the ELF where it has one (absolute symbols such as the
        # real-mode copy's have no type GDB can take the address of), else by name (guest symbols).
        where = "*%#x" % spec["addr"] if spec.get("addr") is not None else "*" + spec["location"]
        super().__init__(where, type=kind, internal=False)
        self.spec = spec

    def stop(self):
        spec = self.spec
        if not _state["record"]:  # the bench's baseline: the stop alone
            _write({"at": spec["location"], "kind": "stop"})
            return spec["kind"] == "end"
        if spec["kind"] == "end":
            return True
        if spec["kind"] == "insn":
            _insn(spec)
            return False
        regs = _registers()
        if spec["kind"] == "trap":
            _trap(spec, regs)
            return False
        stop = {"at": spec["location"], "kind": spec["kind"], "regs": regs, "t": round(time.monotonic(), 6)}
        if spec["kind"] == "vmexit" and spec.get("vmcb"):
            stop["vmcb"] = {name: _read_int(spec["vmcb"] + off, size) for name, off, size in VMCB_EXIT}
        _write(stop)
        arm = spec.get("arm")
        if arm:  # a watch that runs only between two points (the guest's CPUID and its return)
            bp = _state["watches"].get(arm.lstrip("-"))
            if bp is not None:
                bp.enabled = not arm.startswith("-")
        return False


# The VMCB fields the CPU writes at #VMEXIT (APM Vol. 2 App. B): name, offset, size.
VMCB_EXIT = (("exit_code", 0x070, 8), ("exit_info1", 0x078, 8), ("cpl", 0x4CB, 1), ("rip", 0x578, 8),
             ("rax", 0x5F8, 8))


def _read_int(address, size):
    raw = _memory(address, size)
    return None if raw is None else int.from_bytes(bytes.fromhex(raw), "little")


def _write(stop):
    out = _state["out"]
    out.write(json.dumps(stop) + "\n")
    out.flush()


def _trap(spec, regs, via=None):
    """The record of a trap watch: the CPU has just entered its IDT stub with `regs`."""
    stop = {"at": spec["location"], "kind": "trap", "regs": regs, "t": round(time.monotonic(), 6),
            "vector": spec["vector"]}
    if via:
        stop["via"] = via
    stack = _memory(regs["rsp"], 48)
    stop["stack"] = stack
    if stack is not None:
        word = _state["word"]
        off = word if spec.get("error_code") else 0
        rip = int.from_bytes(bytes.fromhex(stack)[off:off + word], "little")
        stop["at_rip"] = _memory(rip, 16)
        if spec.get("sys") and any(lo <= rip <= hi for lo, hi in _state["stubs"]):
            # No stop before the instruction here: what the CPU used to deliver it. IDTR and TR
            # are read at the first such trap and again at the end of the host's probes (QEMU's
            # `info registers` costs ~4 ms a stop under kvm_pvm); the gate and TSS every time.
            sysregs = _state.get("sys") or _sysregs()
            stop["sys"] = sysregs
            stop["gate"] = _gate(sysregs, spec["vector"])
            cs = int.from_bytes(bytes.fromhex(stack)[off + word:off + 2 * word], "little")
            if cs & 3:  # a privilege change: the CPU took its new stack from the TSS (else none read)
                stop["tss"] = _tss(sysregs)
            ports = _for_stub(spec, "io", rip)
            if ports:
                stop["io"] = _iomap(sysregs, ports)
        msrs = _for_stub(spec, "msr", rip)
        if msrs:  # controls in an MSR: the CPU reads them
            stop["msr"] = {"%#x" % m: _rdmsr(m, spec.get("rdmsr_at")) for m in msrs}
    _write(stop)
    if spec.get("skip"):
        # The watch sits on a no-op the lab put there for it (its bytes checked against the
        # ELF): resuming past it is executing it, and needs no single step over the
        # breakpoint (which under TCG flushes all of QEMU's translations).
        gdb.execute("set $pc = %d" % (regs["rip"] + spec["skip"]), to_string=True)


def _insn(spec):
    """At a probe's entry no-op: the CPU before the instruction, the instruction, the CPU after."""
    regs = _registers()
    insn, done = spec["insn"], spec["done"]
    stop = {"at": spec["location"], "kind": "insn", "stub": spec["stub"], "regs": regs,
            "t": round(time.monotonic(), 6)}
    code = _memory(insn, done - insn + 2)
    stop["bytes"] = code
    if code is not None:  # GDB's own decoder, on the bytes the CPU is about to execute
        arch = gdb.selected_frame().architecture()
        stop["asm"] = [[d["addr"], d["length"], d["asm"]] for d in arch.disassemble(insn, end_pc=done)]
    sysregs = _sysregs()
    stop["sys"] = sysregs
    stop["idt"] = _idt(sysregs)
    stop["tss"] = _tss(sysregs)
    if spec.get("io"):
        stop["io"] = _iomap(sysregs, spec["io"])
    # Exactly one instruction: RIP to the probed instruction (past the no-op, which does nothing
    # else), one single step. Raw packets: GDB does not step over anything of its own here.
    _raw_set({"rip": insn})
    _packet("s")
    gdb.execute("maint flush register-cache", to_string=True)  # the CPU stays where the step left it
    after = _registers()
    stop["after"] = after
    stop["after_stack"] = _memory(after["rsp"], 48)
    _write(stop)
    if after["rip"] == done and done != insn and code is not None and code[-4:] == "0f0b":
        # It completed: the CPU is at the return trap. One more step runs that ud2 and delivers
        # its #UD here, instead of a stop of the #UD watch of its own (each real stop makes QEMU
        # translate again all it runs next).
        _packet("s")
        gdb.execute("maint flush register-cache", to_string=True)
        after = _registers()
    # The step ended in an exception handler: its trap record, from here (the plan's watch there
    # if it has one, which the CPU then resumes past; else the handler its IDT gate names).
    trap = _state["traps"].get(after["rip"]) or _handler_spec(stop.get("idt"), after["rip"])
    if trap is not None:
        _trap(trap, after, via=spec["location"])


def _handler_spec(idt_hex, rip):
    """A trap spec for the exception vector whose IDT gate sends the CPU to `rip`, or None."""
    v = x86.vector_at(idt_hex, rip, _state["word"])
    if v is None:
        return None
    return dict(_state["faults"], location="vector_%d" % v, kind="trap", vector=v,
                error_code=v in x86.EXC_WITH_ERROR_CODE)


def _sysregs():
    """CPL, IDTR, GDTR and TR as QEMU's `info registers` shows them (the gdbstub has no such
    registers): {"cpl": n, "idt": [base, limit], "gdt": [...], "tr": [selector, base, limit]}."""
    text = gdb.execute("monitor info registers", to_string=True)
    out = {}
    for line in text.splitlines():
        head, _, rest = line.partition("=")
        words = rest.split()
        key = head.strip()
        if key in ("IDT", "GDT") and len(words) >= 2:
            out[key.lower()] = [int(words[0], 16), int(words[1], 16)]
        elif key == "TR" and len(words) >= 3:
            out["tr"] = [int(words[0], 16), int(words[1], 16), int(words[2], 16)]
        if "CPL=" in line:
            out["cpl"] = int(line.split("CPL=", 1)[1].split()[0])
    _state["sys"] = out
    return out


def _gate_size():
    return 16 if _state["word"] == 8 else 8  # SDM Vol. 3A 6.14.1 (64-bit) / 6.11 (32-bit)


def _idt(sysregs):
    """The exception gates (vectors 0-31) of the IDT the CPU uses, hex."""
    if "idt" not in sysregs:
        return None
    return _memory(sysregs["idt"][0], IDT_GATES * _gate_size())


def _gate(sysregs, vector):
    if "idt" not in sysregs:
        return None
    return _memory(sysregs["idt"][0] + vector * _gate_size(), _gate_size())


def _tss(sysregs):
    return _memory(sysregs["tr"][1], TSS_SIZE) if "tr" in sysregs else None


def _iomap(sysregs, ports):
    """Port -> the 2 bytes of the TSS I/O permission bitmap the CPU reads for it (SDM Vol. 1
    18.5.2: at TR.base + the I/O map base (TSS offset 0x66) + port/8; past TR.limit: none,
    the access is denied), with that base: {"base": n, "ports": {port: hex or None}}."""
    if "tr" not in sysregs:
        return None
    _sel, base, limit = sysregs["tr"]
    raw = _memory(base + 0x66, 2)
    if raw is None:
        return None
    iobase = int.from_bytes(bytes.fromhex(raw), "little")
    out = {}
    for port in ports:
        off = iobase + port // 8
        out[str(port)] = _memory(base + off, 2) if off + 1 <= limit else None
    return {"base": iobase, "limit": limit, "ports": out}


def _for_stub(spec, key, rip):
    """The values of spec[key] ([value, first RIP, last RIP] each) whose stub holds `rip`."""
    return [value for value, lo, hi in spec.get(key, ()) if lo <= rip <= hi]


def _packet(text):
    """Send one remote-protocol packet; its reply."""
    out = gdb.execute("maint packet " + text, to_string=True)
    return out.split("received: ", 1)[1].strip().strip('"') if "received: " in out else ""


def _raw_registers():
    g = bytes.fromhex(_packet("g"))
    return {r: int.from_bytes(g[off:off + size], "little") for r, (_n, off, size) in _RAW.items()}


def _raw_set(regs):
    for r, value in regs.items():
        n, _off, size = _RAW[r]
        _packet("P%x=%s" % (n, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little").hex()))


def _rdmsr(msr, at):
    """EDX:EAX after the CPU ran the RDMSR at `at` with ECX = msr, or None if it did not
    complete there (no RDMSR at `at`, or it faulted). The CPU's registers are as before."""
    if at is None or _memory(at, len(RDMSR)) != RDMSR.hex():
        return None
    saved = {r: v for r, v in _raw_registers().items() if r in SAVED}
    try:
        _raw_set({"rcx": msr, "rip": at})
        _packet("s")  # one instruction; the reply is the stop after it
        after = _raw_registers()
    finally:
        _raw_set(saved)  # RDMSR wrote EDX:EAX (a fault: RSP, RFLAGS, RIP too)
    if after["rip"] != at + len(RDMSR):
        return None
    return (after["rdx"] & 0xFFFFFFFF) << 32 | after["rax"] & 0xFFFFFFFF


def lab_collect_start(config_json):
    config = json.loads(config_json)
    _state["out"] = open(config["out"], "a", buffering=1)
    _state["word"] = config.get("word", 8)
    _state["stubs"] = [tuple(r) for r in config.get("stubs", ())]
    _state["faults"] = config.get("faults", _state["faults"])
    _state["record"] = config.get("record", True)
    for spec in config["watches"]:
        if spec["kind"] == "trap" and spec.get("addr") is not None:
            _state["traps"][spec["addr"]] = spec
        try:
            _state["watches"][spec["location"]] = _Watch(spec)
            if spec.get("enabled") is False:
                _state["watches"][spec["location"]].enabled = False
        except gdb.error as exc:  # a missing symbol: the lab reports it per check
            _state["out"].write(json.dumps({"error": str(exc), "at": spec["location"]}) + "\n")
    gdb.write("LABC armed %d\n" % len(_state["watches"]))


def lab_collect_end(location):
    """After a stop at an `end` watch: delete the watches it ends, and itself; where traps took
    IDTR/TR from a first reading, record them again (the reader compares the two)."""
    spec = _state["watches"][location].spec
    if _state.get("sys") and any(w.spec.get("sys") for w in _state["watches"].values()):
        _write({"at": location, "kind": "sys-end", "sys": _sysregs()})
    for loc in list(spec.get("ends", ())) + [location]:
        bp = _state["watches"].pop(loc, None)
        if bp is not None:
            bp.delete()
    gdb.write("LABC ended %s\n" % location)
