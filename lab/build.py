"""Build the host kernel and the guest with Make (incremental: nothing changed, nothing runs)."""

from __future__ import annotations

import importlib.util
import py_compile
import fcntl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .hostinfo import require_tool

ROOT = Path(__file__).resolve().parent.parent
# Negative controls (firmware/Makefile): `lie` reports wrong values (both witnesses catch it);
# `lie-context` runs probes at another CPL / CR4 / MSR gate than it reports and `lie-skip` reports `ok`
# for probes it never ran (the records look right: only the GDB witness catches these two).
# The rest lie in ways only a witness that sees the CPU execute the probed instruction catches: the
# records say what the rules expect (docs/gdb.md "Negative controls").
VARIANTS = ("normal", "lie", "lie-context", "lie-skip", "lie-insn", "lie-int", "lie-frame", "lie-past", "lie-iomap", "lie-guest-cpuid")


@dataclass(frozen=True)
class Artifacts:
    kernel: Path  # ELF32 copy, booted by QEMU (-kernel takes multiboot ELF32 only)
    symbols: Path  # ELF64 with symbols, for GDB
    guest: Path  # flat guest image, passed as a multiboot module
    guest_symbols: Path  # guest ELF64, for GDB


class BuildError(RuntimeError):
    pass


def build_dir(variant: str) -> Path:
    return ROOT / "firmware" / "build" / ("" if variant == "normal" else variant)


def host32_of(kernel: Path | str) -> tuple[Path, Path]:
    """The 32-bit host kernel built next to a 64-bit one (firmware/Makefile `i386`: booted
    when the CPU model has no long mode): (the ELF QEMU boots, the ELF with symbols)."""
    fw = Path(kernel).parent / "i386"
    return fw / "host.elf32", fw / "host32.elf"


def artifacts(variant: str = "normal") -> Artifacts:
    fw = build_dir(variant)
    gb = ROOT / "guests" / "build"
    return Artifacts(fw / "host.elf32", fw / "host.elf64", gb / "guest.bin", gb / "guest.elf64")


def _make(directory: Path, *args: str) -> None:
    proc = subprocess.run(["make", "-s", "-C", str(directory), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"make -C {directory} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")


def build(variant: str = "normal") -> Artifacts:
    if variant not in VARIANTS:
        raise BuildError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    for tool in ("make", "gcc", "ld", "objcopy"):
        require_tool(tool)
    lock_path = ROOT / "firmware" / ".build.lock"
    # Two lab runs (or pytest -n 2 workers) may build at once: one make at a time.
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _make(ROOT / "guests")
        _make(ROOT / "firmware", f"PYTHON={sys.executable}", *(() if variant == "normal" else (f"VARIANT={variant}",)),
              "all", "i386")  # i386: the 32-bit host for models without long mode
        # The lab's own Python, byte-compiled as an install would (also where the interpreter
        # writes no bytecode, PYTHONDONTWRITEBYTECODE): each run then starts from it (~1 ms
        # when nothing changed).
        compile_lab()
    return artifacts(variant)


def compile_lab() -> None:
    """Byte-compile every lab module whose .pyc is not for it: the pyc records the source's
    mtime (seconds) and size (PEP 552); compileall compares the mtime alone, so an edit within
    the same second as the last compile was left with the old code's bytecode."""
    for path in (ROOT / "lab").rglob("*.py"):
        pyc = importlib.util.cache_from_source(str(path))
        st = path.stat()
        want = (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
        try:
            with open(pyc, "rb") as fh:
                header = fh.read(16)
        except OSError:
            header = b""
        if header[4:8] != b"\0" * 4 or header[8:16] != want:
            py_compile.compile(str(path), cfile=pyc, quiet=1)
