"""Shared fixtures: the built kernel (once per session), KVM availability, leftover checks."""

from __future__ import annotations

import os
import subprocess

import pytest

from lab import build
from lab.hostinfo import kvm_status, qemu_binary

KVM = kvm_status()


def pytest_collection_modifyitems(config, items):
    skip_kvm = pytest.mark.skip(reason=f"KVM not usable: {KVM.reason}")
    for item in items:
        if "kvm" in item.keywords and not KVM.usable:
            item.add_marker(skip_kvm)


@pytest.fixture(scope="session")
def artifacts():
    return build.build("normal")


@pytest.fixture(scope="session")
def lie_artifacts():
    return build.build("lie")


@pytest.fixture(scope="session")
def qemu():
    return qemu_binary()


@pytest.fixture(scope="session")
def kvm():
    return KVM


def lab_processes() -> list[str]:
    """QEMU and GDB processes started by this test process (children and their groups)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,pgid,args"], capture_output=True, text=True).stdout
    me = str(os.getpid())
    found = []
    for row in out.splitlines()[1:]:
        fields = row.split(None, 3)
        if len(fields) < 4:  # a process with an empty command line
            continue
        _pid, ppid, _pgid, args = fields
        prog = os.path.basename(args.split()[0])
        mine = ppid == me or f"ringlab-{me}-" in args
        if mine and (prog.startswith("qemu-system") or prog == "gdb"):
            found.append(row)
    return found


@pytest.fixture
def no_leftovers():
    """Asserts that the test left no QEMU or GDB of the lab behind."""
    yield
    left = lab_processes()
    assert not left, f"left running: {left}"
