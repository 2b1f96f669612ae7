"""Configuration validation and the QEMU command line builder."""

from pathlib import Path

import pytest

from lab.config import ConfigError, Module, RunConfig
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
