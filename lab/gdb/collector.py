"""GDB-side evidence collector for the lab's witness (runs inside GDB's Python).

It only records what the CPU shows at each stop, as one JSON line per stop, and lets the CPU
go on (a breakpoint whose stop() returns False costs no GDB/MI round trip). It decides
nothing: lab/witness.py turns the stops into readings. Loaded by `source`, started by
`python lab_collect_start(CONFIG_JSON)`.

Watch kinds:
  trap  an IDT stub: the CPU just delivered `vector`. Records the registers and the stack
        the CPU pushed (error code if any, RIP, CS, RFLAGS, RSP, SS) and the bytes at RIP;
        `mem` [address, first RIP, last RIP]: a byte to read where the trapping RIP is in range.
        `skip`: the stub starts with a no-op of that many bytes; the CPU resumes past it.
  regs  a code label: records the registers there.
  end   a real stop (the lab's MI session deletes the `ends` watches, then continues).

A trap watch with `msr` entries [MSR, first RIP, last RIP] also reads a control QEMU's gdbstub
does not show (an MSR) where the trapping RIP is in that range: the CPU itself runs the
firmware's `witness_rdmsr` (RDMSR at CPL0, its bytes 0f 32 checked first) as one single step
with ECX = the MSR. The step and the register writes around it are raw remote-protocol
packets: GDB's own idea of the registers, and of where it stopped, never changes, and every
register the step touched is put back before the CPU goes on.
"""

import json
import time

import gdb

_REGS = ("cs", "rip", "rsp", "cr4", "efer", "rax", "rbx", "rcx", "rdx")
_MASK = (1 << 64) - 1
_state = {"out": None, "watches": {}, "word": 8}  # word: the frame's word size (4: 32-bit host)
RDMSR = bytes.fromhex("0f32")
# QEMU's x86-64 gdbstub register numbers and sizes (the 'g' packet's layout): RAX, RCX, RDX, RSP,
# RIP (8 bytes each), EFLAGS (4 bytes).
_RAW = {"rax": (0, 8), "rcx": (2, 8), "rdx": (3, 8), "rsp": (7, 8), "rip": (16, 8), "eflags": (17, 4)}


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
        super().__init__("*" + spec["location"], type=kind, internal=False)
        self.spec = spec

    def stop(self):
        spec = self.spec
        if spec["kind"] == "end":
            return True
        regs = _registers()
        stop = {"at": spec["location"], "kind": spec["kind"], "regs": regs, "t": round(time.monotonic(), 6)}
        if spec["kind"] == "trap":
            stop["vector"] = spec["vector"]
            stack = _memory(regs["rsp"], 48)
            stop["stack"] = stack
            if stack is not None:
                word = _state["word"]
                off = word if spec.get("error_code") else 0
                rip = int.from_bytes(bytes.fromhex(stack)[off:off + word], "little")
                stop["at_rip"] = _memory(rip, 16)
                mem = _for_stub(spec, "mem", rip)
                if mem:  # controls the CPU reads from memory (the TSS I/O bitmap)
                    stop["mem"] = {str(a): _memory(a, 1) for a in mem}
                msrs = _for_stub(spec, "msr", rip)
                if msrs:  # controls in an MSR: the CPU reads them
                    stop["msr"] = {"%#x" % m: _rdmsr(m, spec.get("rdmsr_at")) for m in msrs}
        out = _state["out"]
        out.write(json.dumps(stop) + "\n")
        out.flush()
        if spec.get("skip"):
            # The watch sits on a no-op the lab put there for it (its bytes checked against the
            # ELF): resuming past it is executing it, and needs no single step over the
            # breakpoint (which under TCG flushes all of QEMU's translations).
            gdb.execute("set $pc = %d" % (regs["rip"] + spec["skip"]), to_string=True)
        return False


def _for_stub(spec, key, rip):
    """The values of spec[key] ([value, first RIP, last RIP] each) whose stub holds `rip`."""
    return [value for value, lo, hi in spec.get(key, ()) if lo <= rip <= hi]


def _packet(text):
    """Send one remote-protocol packet; its reply."""
    out = gdb.execute("maint packet " + text, to_string=True)
    return out.split("received: ", 1)[1].strip().strip('"') if "received: " in out else ""


def _raw_registers():
    g = bytes.fromhex(_packet("g"))
    return {r: int.from_bytes(g[n * 8:n * 8 + size], "little") for r, (n, size) in _RAW.items()}


def _raw_set(regs):
    for r, value in regs.items():
        n, size = _RAW[r]
        _packet("P%x=%s" % (n, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little").hex()))


def _rdmsr(msr, at):
    """EDX:EAX after the CPU ran the RDMSR at `at` with ECX = msr, or None if it did not
    complete there (no RDMSR at `at`, or it faulted). The CPU's registers are as before."""
    if at is None or _memory(at, len(RDMSR)) != RDMSR.hex():
        return None
    saved = _raw_registers()
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
    for spec in config["watches"]:
        try:
            _state["watches"][spec["location"]] = _Watch(spec)
        except gdb.error as exc:  # a missing symbol: the lab reports it per check
            _state["out"].write(json.dumps({"error": str(exc), "at": spec["location"]}) + "\n")
    gdb.write("LABC armed %d\n" % len(_state["watches"]))


def lab_collect_end(location):
    """After a stop at an `end` watch: delete the watches it ends, and itself."""
    spec = _state["watches"][location].spec
    for loc in list(spec.get("ends", ())) + [location]:
        bp = _state["watches"].pop(loc, None)
        if bp is not None:
            bp.delete()
    gdb.write("LABC ended %s\n" % location)
