"""Configuration validation and the QEMU command line builder."""

import re
from pathlib import Path

import pytest

from lab.build import ROOT
from lab.config import KERNEL_ARGS, OWN_OPTION, ConfigError, Module, RunConfig, check_kernel_arg, check_signature
from lab.qemu import build_command, repro_command


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name in ("k.elf32", "k.elf64", "guest.bin"):
        p = tmp_path / name
        p.write_bytes(b"x")
        paths[name] = p
    return paths


def cfg(files, **kw):
    base = dict(accel="tcg", qemu="/usr/bin/qemu-system-x86_64", kernel=files["k.elf32"], symbols=files["k.elf64"])
    base.update(kw)
    return RunConfig(**base)


def opt(cmd, flag):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_default_cpu_per_accelerator(files):
    assert cfg(files).cpu == "qemu64,+svm"
    assert cfg(files, accel="kvm").cpu == "qemu64"
    assert cfg(files, cpu="max").cpu == "max"


def test_command_is_private_and_minimal(files):
    c = cfg(files, modules=(Module(files["guest.bin"], "a=1"),), kernel_args=("fault=hang",))
    cmd = build_command(c, serial="/tmp/d/serial.sock", qmp="/tmp/d/qmp.sock", gdb="tcp:127.0.0.1:1234")
    assert cmd[0] == "/usr/bin/qemu-system-x86_64"
    assert opt(cmd, "-accel") == ["tcg"] and opt(cmd, "-cpu") == ["qemu64,+svm"]
    assert opt(cmd, "-M")[0].startswith("microvm")
    assert "-nodefaults" in cmd and opt(cmd, "-nic") == ["none"] and "-no-reboot" in cmd
    assert "-S" in cmd  # paused until the console (and GDB) are attached
    assert opt(cmd, "-gdb") == ["tcp:127.0.0.1:1234"]  # loopback only, never -s
    assert "-s" not in cmd
    assert opt(cmd, "-qmp") == ["unix:/tmp/d/qmp.sock,server=on,wait=off"]
    assert opt(cmd, "-kernel") == [str(files["k.elf32"])]
    assert opt(cmd, "-initrd") == [f"{files['guest.bin']} a=1"]
    append = opt(cmd, "-append")[0]
    assert "fault=hang" in append and "hv-signature=LabRingMinus" in append


def test_module_commas_are_escaped(files):
    c = cfg(files, modules=(Module(files["guest.bin"], "x=a,b"), Module(files["guest.bin"])))
    cmd = build_command(c, serial=None, qmp=None)
    assert opt(cmd, "-initrd") == [f"{files['guest.bin']} x=a,,b,{files['guest.bin']}"]


def test_repro_command_uses_stdio_and_runs_unpaused(files):
    r = repro_command(cfg(files))
    assert "-serial stdio" in r and " -S" not in r and "-qmp" not in r


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(accel="xen"), "unknown accelerator"),
        (dict(cpu="qemu64;rm -rf /"), "not a QEMU CPU model"),
        (dict(machine="isapc"), "unknown machine"),
        (dict(hv_signature="short"), "exactly 12"),
        (dict(hv_signature="has spaces!!"), "exactly 12"),
        (dict(host_mode="ring-1"), "host-mode"),
        (dict(kernel_args=("novalue",)), "key=value"),
        (dict(timeout_s=0), "positive"),
        (dict(kernel_args=("fault=nonsense",)), "choose one of hang"),
    ],
)
def test_bad_input_is_a_clear_error(files, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(files, **kw)


def test_missing_kernel_says_build_first(files):
    with pytest.raises(ConfigError, match="invoke build"):
        cfg(files, kernel=Path("/nonexistent/k.elf32"))


# -- the kernel command line keys: one table, documented, and what the firmware reads ---------
def documented_keys() -> set[str]:
    text = (ROOT / "firmware" / "README.md").read_text() + (ROOT / "docs" / "records.md").read_text()
    return set(re.findall(r"^\| `([a-z-]+)=", text, re.M)) | set(re.findall(r"`([a-z]+-fault)=", text))


def firmware_keys() -> set[str]:
    keys = set()
    for src in list((ROOT / "firmware").glob("*.c")) + list((ROOT / "guests").rglob("*.c")):
        keys |= set(re.findall(r'cmdline_(?:get|list_has)\("([a-z-]+)"', src.read_text()))
    return keys


def test_kernel_args_table_matches_the_docs_and_the_firmware():
    accepted = set(KERNEL_ARGS) | set(OWN_OPTION)
    assert documented_keys() == accepted, "firmware/README.md / docs/records.md and lab/config.py KERNEL_ARGS differ"
    assert firmware_keys() <= accepted, "the firmware reads a key the lab does not accept"
    assert "nosuch" not in documented_keys() | firmware_keys()  # the scans find only real keys


@pytest.mark.parametrize(
    "word,msg",
    [("nosuchkey=1", "unknown key 'nosuchkey'"), ("skip=rdtscp,bogus", "skip='bogus'"),
     ("realmode=2", "choose one of 0, 1"), ("hv-signature=x", "use --hv-signature"),
     ("soft-fault=whatever", "choose one of no-emulate-rdtsc")],
)
def test_kernel_arg_outside_the_table_is_refused(word, msg):
    with pytest.raises(ConfigError, match=msg):
        check_kernel_arg(word)


def test_kernel_arg_inside_the_table_is_accepted():
    for word in ("skip=rdtscp,syscall", "realmode=0", "fault=hang", "hv-fault=unknown-exit", "hv-npt=0"):
        check_kernel_arg(word)


@pytest.mark.parametrize("sig,nbytes", [("ÄbcdefghijK", 12), ("abcdefghijkü", 13), ("short", 5)])
def test_signature_counts_bytes(sig, nbytes):
    with pytest.raises(ConfigError, match=rf"\({nbytes} bytes"):
        check_signature(sig)
    check_signature("LabRingMinus")  # negative control


# -- runs/ keeps the last N runs ----------------------------------------------------------------
def test_runs_folder_keeps_the_newest(tmp_path, monkeypatch):
    from lab import runner

    base = tmp_path / "runs"
    base.mkdir()
    for i in range(5):
        (base / f"20260101-00000{i}-1{i}").mkdir()
    (base / "sweep-keep-me").mkdir()  # not a run folder: never touched
    gone = runner.prune_runs(base, 2)
    assert [p.name for p in gone] == [f"20260101-00000{i}-1{i}" for i in range(3)]
    assert sorted(p.name for p in base.iterdir()) == ["20260101-000003-13", "20260101-000004-14", "sweep-keep-me"]
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    root = runner.new_run_root(keep=1)  # the default folder is pruned as a run starts
    assert sorted(p.name for p in base.iterdir()) == sorted([root.name, "sweep-keep-me"])
    named = runner.new_run_root(base, keep=1)  # a folder the user named is never pruned
    assert root.exists() and named.exists()


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_keep_runs_must_be_a_positive_number(monkeypatch, value):
    from lab import runner

    monkeypatch.setenv("LAB_KEEP_RUNS", value)
    with pytest.raises(ConfigError, match="LAB_KEEP_RUNS"):
        runner.keep_runs()
    monkeypatch.setenv("LAB_KEEP_RUNS", "7")
    assert runner.keep_runs() == 7


def test_clean_empties_the_runs_folder(tmp_path):
    from lab import runner

    base = tmp_path / "runs"
    (base / "20260101-000000-1").mkdir(parents=True)
    (base / "20260101-000000-1" / "serial.log").write_bytes(b"x" * 1000)
    (base / "sweep-x").mkdir()
    assert runner.clean_runs(base) == (2, 1000)
    assert list(base.iterdir()) == []
    assert runner.clean_runs(tmp_path / "missing") == (0, 0)


def test_every_kind_of_run_folder_is_kept_to_its_newest(tmp_path, monkeypatch):
    """debug-, sweep- and bench- folders are pruned like lab.run's, each kind to its own newest N
    (a sweep never pushes out the runs); a folder of another name is never touched."""
    from lab import runner

    base = tmp_path / "runs"
    base.mkdir()
    for kind in ("", "debug-", "sweep-", "bench-"):
        for i in range(4):
            (base / f"{kind}20260101-00000{i}-1{i}").mkdir()
    (base / "mine").mkdir()
    runner.prune_runs(base, 2)
    left = sorted(p.name for p in base.iterdir())
    assert left == sorted(["mine"] + [f"{k}20260101-00000{i}-1{i}" for k in ("", "debug-", "sweep-", "bench-")
                                      for i in (2, 3)])
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setenv("LAB_KEEP_RUNS", "1")
    new = runner.new_kind_folder("bench")  # a bench's folder is pruned as it is made
    assert new.exists() and sorted(p.name for p in base.glob("bench-*")) == [new.name]
    assert len(list(base.glob("debug-*"))) == 1 and (base / "mine").exists()  # each kind to its newest 1
