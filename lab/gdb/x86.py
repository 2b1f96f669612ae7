"""Pure decoders for what the GDB side reads: control-register bits, exception values in
the record notation and the AMD VMCB.

Standard library only: this module is imported both by the lab (lab.witness) and by the
script GDB sources (lab_gdb.py runs inside GDB's own Python).
"""
from __future__ import annotations

import struct

# -- control registers ---------------------------------------------------------------------
# SDM Vol. 3A 2.5 (CR4), APM Vol. 2 3.1.3 (CR4), 3.1.7 (EFER).
CR4_BITS = {
    0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE", 8: "PCE",
    9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE", 14: "SMXE",
    16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP", 21: "SMAP", 22: "PKE",
    23: "CET", 24: "PKS", 25: "UINTR",
}
CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM", 29: "NW", 30: "CD", 31: "PG"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR", 15: "TCE"}
CR4_TSD = 1 << 2
EFER_SVME = 1 << 12


def decode_bits(value: int, names: dict[int, str]) -> list[str]:
    """Names of the set bits, low to high; unnamed set bits as `bit<n>`."""
    return [names.get(b, f"bit{b}") for b in range(64) if value >> b & 1]


# -- exceptions, in the record notation (docs/records.md) -----------------------------------
EXC_MNEMONICS = {
    0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF",
    10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC",
    19: "XM", 20: "VE", 21: "CP",
}
# SDM Vol. 3A 6.15: the vectors that push an error code.
EXC_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def idt_gate(raw: bytes, word: int) -> dict:
    """An IDT gate descriptor (SDM Vol. 3A 6.14.1 64-bit: 16 bytes, 6.11 32-bit: 8): where it
    sends the CPU, with which CS, IST, type, DPL and present bit."""
    offset = int.from_bytes(raw[0:2], "little") | int.from_bytes(raw[6:8], "little") << 16
    if word == 8:
        offset |= int.from_bytes(raw[8:12], "little") << 32
    return {"offset": offset, "selector": int.from_bytes(raw[2:4], "little"), "ist": raw[4] & 7 if word == 8 else 0,
            "type": raw[5] & 0xF, "dpl": raw[5] >> 5 & 3, "present": raw[5] >> 7}


def vector_at(idt_hex: str | None, rip: int, word: int) -> int | None:
    """The vector whose present IDT gate (in `idt_hex`, the IDT's gates from vector 0) sends the CPU to `rip`."""
    if not idt_hex:
        return None
    raw, size = bytes.fromhex(idt_hex), 2 * word
    for v in range(len(raw) // size):
        g = idt_gate(raw[v * size:(v + 1) * size], word)
        if g["present"] and g["offset"] == rip:
            return v
    return None


def exception_value(vector: int, error_code: int = 0) -> str:
    """`#GP(0)`, `#UD`, `#GP(0xd2)`, `#V9`: the same text the firmware prints."""
    name = f"#{EXC_MNEMONICS[vector]}" if vector in EXC_MNEMONICS else f"#V{vector}"
    if vector not in EXC_WITH_ERROR_CODE:
        return name
    return f"{name}({error_code:#x})" if error_code else f"{name}(0)"


# -- AMD SVM VMCB (APM Vol. 2 Appendix B) ---------------------------------------------------
VMCB_SIZE = 0x1000
# (name, offset, struct format): the fields the lab shows.
VMCB_CONTROL = (
    ("intercept_cr", 0x000, "<I"),  # reads 15:0, writes 31:16
    ("intercept_dr", 0x004, "<I"),
    ("intercept_exceptions", 0x008, "<I"),
    ("intercept_misc1", 0x00C, "<I"),
    ("intercept_misc2", 0x010, "<I"),
    ("iopm_base_pa", 0x040, "<Q"),
    ("msrpm_base_pa", 0x048, "<Q"),
    ("tsc_offset", 0x050, "<Q"),
    ("asid", 0x058, "<I"),
    ("tlb_control", 0x05C, "<B"),
    ("exit_code", 0x070, "<Q"),
    ("exit_info1", 0x078, "<Q"),
    ("exit_info2", 0x080, "<Q"),
    ("exit_int_info", 0x088, "<I"),
    ("exit_int_info_err", 0x08C, "<I"),
    ("np_enable", 0x090, "<Q"),
    ("event_inj", 0x0A8, "<Q"),
    ("n_cr3", 0x0B0, "<Q"),
    ("next_rip", 0x0C8, "<Q"),
)
VMCB_SAVE = (
    ("cs_selector", 0x410, "<H"),
    ("cs_attrib", 0x412, "<H"),
    ("ss_selector", 0x420, "<H"),
    ("tr_attrib", 0x492, "<H"),
    ("cpl", 0x4CB, "<B"),
    ("efer", 0x4D0, "<Q"),
    ("cr4", 0x548, "<Q"),
    ("cr3", 0x550, "<Q"),
    ("cr0", 0x558, "<Q"),
    ("rflags", 0x570, "<Q"),
    ("rip", 0x578, "<Q"),
    ("rsp", 0x5D8, "<Q"),
    ("rax", 0x5F8, "<Q"),
)
# Intercept vector at 0x00C (APM Vol. 2 Table B-1), bit -> name.
INTERCEPT_MISC1 = (
    "INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "IDTR_READ", "GDTR_READ",
    "LDTR_READ", "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE", "RDTSC",
    "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "INTn", "INVD", "PAUSE", "HLT",
    "INVLPG", "INVLPGA", "IOIO_PROT", "MSR_PROT", "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN",
)
# Intercept vector at 0x010: bits 0-15; bits 16-31 are CR0-15 write traps.
INTERCEPT_MISC2 = (
    "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP",
    "WBINVD", "MONITOR", "MWAIT", "MWAIT_CONDITIONAL", "XSETBV", "RDPRU", "EFER_WRITE_TRAP",
)

# Exit codes (APM Vol. 2 Appendix C, Table C-1).
_EXIT_NAMES = {
    0x60: "INTR", 0x61: "NMI", 0x62: "SMI", 0x63: "INIT", 0x64: "VINTR", 0x65: "CR0_SEL_WRITE",
    0x66: "IDTR_READ", 0x67: "GDTR_READ", 0x68: "LDTR_READ", 0x69: "TR_READ",
    0x6A: "IDTR_WRITE", 0x6B: "GDTR_WRITE", 0x6C: "LDTR_WRITE", 0x6D: "TR_WRITE",
    0x6E: "RDTSC", 0x6F: "RDPMC", 0x70: "PUSHF", 0x71: "POPF", 0x72: "CPUID", 0x73: "RSM",
    0x74: "IRET", 0x75: "SWINT", 0x76: "INVD", 0x77: "PAUSE", 0x78: "HLT", 0x79: "INVLPG",
    0x7A: "INVLPGA", 0x7B: "IOIO", 0x7C: "MSR", 0x7D: "TASK_SWITCH", 0x7E: "FERR_FREEZE",
    0x7F: "SHUTDOWN", 0x80: "VMRUN", 0x81: "VMMCALL", 0x82: "VMLOAD", 0x83: "VMSAVE",
    0x84: "STGI", 0x85: "CLGI", 0x86: "SKINIT", 0x87: "RDTSCP", 0x88: "ICEBP", 0x89: "WBINVD",
    0x8A: "MONITOR", 0x8B: "MWAIT", 0x8C: "MWAIT_CONDITIONAL", 0x8D: "XSETBV", 0x8E: "RDPRU",
    0x8F: "EFER_WRITE_TRAP", 0xA0: "INVLPGB", 0xA1: "INVLPGB_ILLEGAL", 0xA2: "INVPCID",
    0xA3: "MCOMMIT", 0xA4: "TLBSYNC", 0xA5: "BUSLOCK", 0xA6: "IDLE_HLT",
    0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI", 0x402: "AVIC_NOACCEL", 0x403: "VMGEXIT",
}
VMEXIT_INVALID = (1 << 64) - 1
VMEXIT_BUSY = (1 << 64) - 2


def exit_name(code: int) -> str:
    """The APM name of an exit code; QEMU 7.2 reports VMEXIT_INVALID as 32-bit 0xffffffff."""
    if code in (VMEXIT_INVALID, 0xFFFFFFFF):
        return "INVALID"
    if code == VMEXIT_BUSY:
        return "BUSY"
    if code < 0x10:
        return f"CR{code}_READ"
    if code < 0x20:
        return f"CR{code - 0x10}_WRITE"
    if code < 0x30:
        return f"DR{code - 0x20}_READ"
    if code < 0x40:
        return f"DR{code - 0x30}_WRITE"
    if code < 0x60:
        return f"EXCP{code - 0x40}" + (f"_{EXC_MNEMONICS[code - 0x40]}" if code - 0x40 in EXC_MNEMONICS else "")
    if 0x90 <= code < 0xA0:
        return f"CR{code - 0x90}_WRITE_TRAP"
    return _EXIT_NAMES.get(code, f"UNKNOWN_{code:#x}")


def exit_detail(code: int, info1: int) -> str:
    """What the exit info says, for the exits the lab's guest takes."""
    if code == 0x7B:  # IOIO: APM Vol. 2 15.10.2, Figure 15-2
        size = {0x10: 8, 0x20: 16, 0x40: 32}.get(info1 & 0x70, 0)
        return f"port={info1 >> 16:#x} {'in' if info1 & 1 else 'out'} {size}-bit"
    if 0x40 <= code < 0x60 and (code - 0x40) in EXC_WITH_ERROR_CODE:
        return f"error_code={info1:#x}"
    return ""


def decode_vmcb(raw: bytes) -> dict[str, int]:
    if len(raw) < 0x600:
        raise ValueError(f"a VMCB is 4 KiB; got {len(raw)} bytes")
    out = {}
    for name, offset, fmt in VMCB_CONTROL + VMCB_SAVE:
        out[name] = struct.unpack_from(fmt, raw, offset)[0]
    return out


def vmcb_intercepts(v: dict[str, int]) -> list[str]:
    names = [INTERCEPT_MISC1[b] for b in range(32) if v["intercept_misc1"] >> b & 1]
    names += [INTERCEPT_MISC2[b] if b < 16 else f"CR{b - 16}_WRITE_TRAP"
              for b in range(32) if v["intercept_misc2"] >> b & 1]
    names += [f"CR{b}_READ" if b < 16 else f"CR{b - 16}_WRITE" for b in range(32) if v["intercept_cr"] >> b & 1]
    names += [f"EXC_{exception_value(b).lstrip('#').split('(')[0]}"
              for b in range(32) if v["intercept_exceptions"] >> b & 1]
    return names


def format_vmcb(v: dict[str, int], address: int | None = None) -> str:
    code = v["exit_code"]
    blank = not (v["asid"] or v["intercept_misc2"] or v["rip"])  # VMRUN needs ASID != 0 and its intercept
    lines = [
        f"VMCB{f' at {address:#x}' if address is not None else ''}"
        + ("  (not set up yet: ASID 0, no intercepts, RIP 0)" if blank else ""),
        f"  exit        {code:#x} {exit_name(code)} {exit_detail(code, v['exit_info1'])}".rstrip()
        + f"  info1={v['exit_info1']:#x} info2={v['exit_info2']:#x}"
        f"  int_info={v['exit_int_info']:#x} next_rip={v['next_rip']:#x}",
        f"  intercepts  {' '.join(vmcb_intercepts(v)) or '(none)'}",
        f"  asid={v['asid']} tlb_control={v['tlb_control']} np_enable={v['np_enable']:#x} n_cr3={v['n_cr3']:#x}"
        f" iopm={v['iopm_base_pa']:#x} msrpm={v['msrpm_base_pa']:#x} tsc_offset={v['tsc_offset']:#x}",
        f"  guest       rip={v['rip']:#x} rsp={v['rsp']:#x} rax={v['rax']:#x} rflags={v['rflags']:#x}",
        f"              cpl={v['cpl']} cs={v['cs_selector']:#x} (attr {v['cs_attrib']:#x}) ss={v['ss_selector']:#x}"
        f" tr_attr={v['tr_attrib']:#x}",
        f"              cr0={v['cr0']:#x} [{' '.join(decode_bits(v['cr0'], CR0_BITS))}]"
        f" cr3={v['cr3']:#x} cr4={v['cr4']:#x} [{' '.join(decode_bits(v['cr4'], CR4_BITS))}]",
        f"              efer={v['efer']:#x} [{' '.join(decode_bits(v['efer'], EFER_BITS))}]",
    ]
    return "\n".join(lines)


# -- ELF64 symbols (System V gABI, "Symbol Table"), for names GDB cannot enumerate ----------
def elf_symbols(path: str) -> dict[str, int]:
    """Name -> value of the defined FUNC/OBJECT/NOTYPE symbols in an ELF64 little-endian
    file's .symtab (labels such as `probe_insn_rdtsc` are NOTYPE). Empty if not ELF64."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[str, int] = {}
    for _name, sh_type, _flags, _addr, off, size, link, _info, _align, entsize in sections:
        if sh_type != 2 or not entsize:  # SHT_SYMTAB
            continue
        str_off = sections[link][4]
        for i in range(size // entsize):
            st_name, st_info, _other, st_shndx, st_value, _size = struct.unpack_from("<IBBHQQ", data, off + i * entsize)
            if st_shndx == 0 or (st_info & 0xF) not in (0, 1, 2) or not st_name:  # undefined; NOTYPE/OBJECT/FUNC
                continue
            end = data.index(b"\0", str_off + st_name)
            out.setdefault(data[str_off + st_name:end].decode("latin-1"), st_value)
    return out


def vmcb_exit_state(v: dict[str, int], efer: int) -> str | None:
    """Why a VMCB holds no #VMEXIT to show yet, or None when its exit fields are real: with
    EFER.SVME=0 no VMRUN has run (APM Vol. 2 15.4); an all-zero VMCB was never set up; exit
    code 0 is CR0_READ, which can only be reported if CR0 reads are intercepted (APM Vol. 2
    15.9, Table C-1), so with that intercept clear no exit has happened yet."""
    if not efer & EFER_SVME:
        return "EFER.SVME=0: SVM is off, no VMRUN has run (the VMCB is unused)"
    if not (v["asid"] or v["intercept_misc2"] or v["rip"]):
        return "not set up yet (ASID 0, no intercepts, RIP 0)"
    if v["exit_code"] == 0 and not v["intercept_cr"] & 1:
        return "no #VMEXIT yet (exit code 0 is CR0_READ, which is not intercepted)"
    return None


def elf_bytes(path: str, addr: int, n: int) -> bytes | None:
    """`n` bytes at link address `addr` in an ELF64 little-endian file, from the section
    that holds them (what the image carries, whatever memory holds now); None if none does."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        _name, sh_type, flags, sh_addr, off, size, *_ = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        if sh_type == 1 and flags & 2 and sh_addr <= addr and addr + n <= sh_addr + size:  # PROGBITS, ALLOC
            return data[off + addr - sh_addr:off + addr - sh_addr + n]
    return None
