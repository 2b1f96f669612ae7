"""What the build produced: symbols and bytes of an ELF image (pyelftools), so the GDB
witness can name a RIP by its label and compare what the CPU executed with the binary.

Each run reads the same few ELFs; what it needs of one (symbols, loaded bytes) is kept next
to it (`<elf>.image`), keyed by the ELF's size and mtime, so a run neither imports pyelftools
nor parses the file again while the ELF is unchanged."""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE_SUFFIX = ".image"


@dataclass
class Image:
    path: Path
    symbols: dict[str, int] = field(default_factory=dict)  # global and local, name -> address
    bits: int = 64  # ELFCLASS: 32 for the 32-bit host kernel (its exception frames are 4-byte words)
    _segments: list[tuple[int, bytes]] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> "Image":
        path = Path(path)
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        cache = path.with_name(path.name + CACHE_SUFFIX)
        try:
            with open(cache, "rb") as fh:
                saved_key, symbols, bits, segments = pickle.load(fh)
            if saved_key == key:
                return cls(path, symbols, bits, segments)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError):
            pass  # none yet, or from another ELF: parse it
        img = cls.parse(path)
        try:  # written whole or not at all: two runs may write it at once
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name + ".")
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o644)
                pickle.dump((key, img.symbols, img.bits, img._segments), fh)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only build folder: parse each time
        return img

    @classmethod
    def parse(cls, path: Path | str) -> "Image":
        from elftools.elf.elffile import ELFFile  # only when the ELF changed (~35 ms to import)

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
