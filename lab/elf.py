"""What the build produced: symbols and bytes of an ELF64 image (pyelftools), so the GDB
witness can name a RIP by its label and compare what the CPU executed with the binary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile


@dataclass
class Image:
    path: Path
    symbols: dict[str, int] = field(default_factory=dict)  # global and local, name -> address
    bits: int = 64  # ELFCLASS: 32 for the 32-bit host kernel (its exception frames are 4-byte words)
    _segments: list[tuple[int, bytes]] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> "Image":
        img = cls(Path(path))
        with open(img.path, "rb") as fh:
            elf = ELFFile(fh)
            img.bits = elf.elfclass
            symtab = elf.get_section_by_name(".symtab")
            for sym in symtab.iter_symbols() if symtab else ():
                if sym.name and sym["st_info"]["type"] in ("STT_NOTYPE", "STT_FUNC", "STT_OBJECT"):
                    img.symbols.setdefault(sym.name, sym["st_value"])
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    img._segments.append((seg["p_vaddr"], seg.data()))
        return img

    def read(self, address: int, size: int) -> bytes:
        """Bytes of the file image at a virtual address (b"" where nothing is loaded)."""
        for base, data in self._segments:
            if base <= address < base + len(data):
                off = address - base
                return data[off:off + size]
        return b""

    def with_prefix(self, prefix: str) -> dict[str, int]:
        return {n: a for n, a in self.symbols.items() if n.startswith(prefix)}
