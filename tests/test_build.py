"""The build step (lab/build.py): firmware and guest through Make, and the lab's own Python
byte-compiled, so a run does not compile its modules each time (also where the interpreter
writes no bytecode itself)."""
from __future__ import annotations

import importlib.util
import os
import pickle
import shutil

from lab import build
from lab.elf import CACHE_SUFFIX, Image


def _current(path) -> bool:
    """The pyc records this source's mtime and size (PEP 552 timestamp pyc: bytes 8-16)."""
    pyc = importlib.util.cache_from_source(str(path))
    if not os.path.exists(pyc):
        return False
    with open(pyc, "rb") as f:
        header = f.read(16)
    st = os.stat(path)
    return (int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF)


def test_build_leaves_every_lab_module_byte_compiled_and_current():
    build.build()
    assert not [p.name for p in (build.ROOT / "lab").rglob("*.py") if not _current(p)]


def test_a_module_changed_after_a_build_is_compiled_by_the_next():
    path = build.ROOT / "lab" / "report.py"  # no Make dependency: nothing else rebuilds
    build.build()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # as if edited after the build
    assert not _current(path)  # the control: stale now
    build.build()
    assert _current(path)


def test_an_elfs_image_is_read_from_its_cache_only_while_the_elf_is_unchanged(tmp_path):
    elf = tmp_path / "host.elf64"
    shutil.copy2(build.artifacts().symbols, elf)
    first = Image.load(elf)
    cache = tmp_path / ("host.elf64" + CACHE_SUFFIX)
    assert cache.exists() and first.symbols == Image.parse(elf).symbols
    # The cache is what a second load returns: one with a planted symbol proves it is read...
    key, symbols, bits, segments = pickle.loads(cache.read_bytes())
    cache.write_bytes(pickle.dumps((key, {**symbols, "planted": 1}, bits, segments)))
    assert "planted" in Image.load(elf).symbols
    # ...and an ELF changed since (another mtime) is parsed again, never taken from it.
    st = os.stat(elf)
    os.utime(elf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = Image.load(elf)
    assert "planted" not in again.symbols and again.read(again.symbols["witness_rdmsr"], 2) == b"\x0f\x32"


def test_an_edit_within_the_second_of_the_last_compile_is_compiled_too(tmp_path, monkeypatch):
    """compileall keys a pyc on the source's mtime in whole seconds; a module rewritten in the same
    second (another size) kept the old bytecode. The build compares the size too."""
    (tmp_path / "lab").mkdir()
    src = tmp_path / "lab" / "m.py"
    src.write_text("X = 1\n")
    monkeypatch.setattr(build, "ROOT", tmp_path)
    build.compile_lab()
    st = os.stat(src)
    src.write_text("X = 1234567\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same mtime: only the size differs
    assert not _current(src)  # the control
    build.compile_lab()
    assert _current(src)
