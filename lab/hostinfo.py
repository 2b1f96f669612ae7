"""What the machine running the lab offers: QEMU, GDB, the compiler, and KVM.

Every missing tool gets one clear message that names the command to install it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

INSTALL_HINT = "sudo apt-get install qemu-system-x86 gcc binutils make gdb   (or: invoke setup)"
KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")


class ToolMissing(RuntimeError):
    """A required program is not installed."""


def qemu_binary(explicit: str | None = None) -> str:
    """The QEMU binary: --qemu, else $LAB_QEMU, else qemu-system-x86_64 on PATH."""
    name = explicit or os.environ.get("LAB_QEMU") or "qemu-system-x86_64"
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"QEMU not found ({name!r}). Install it: {INSTALL_HINT}")
    return path


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} not found. Install it: {INSTALL_HINT}")
    return path


@functools.cache
def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"version (\S+)", out.stdout)
    return m.group(1) if m else "unknown"


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    module: str | None  # which kernel module serves /dev/kvm
    reason: str  # why it is not usable, or "" when it is


def kvm_module(sys_module: str = "/sys/module") -> str | None:
    """Name the module behind /dev/kvm. kvm_pvm is a software KVM with known deviations
    (lab/deviations.py); kvm_intel / kvm_amd are hardware-assisted."""
    for name in KVM_MODULES:
        if os.path.isdir(os.path.join(sys_module, name)):
            return name
    return None


def kvm_status(dev: str = "/dev/kvm", sys_module: str = "/sys/module") -> KvmStatus:
    module = kvm_module(sys_module)
    if not os.path.exists(dev):
        why = "no /dev/kvm (KVM module not loaded, or no virtualization support)"
        return KvmStatus(False, module, why)
    if not os.access(dev, os.R_OK | os.W_OK):
        why = f"{dev} is not readable and writable by this user (add yourself to the kvm group)"
        return KvmStatus(False, module, why)
    return KvmStatus(True, module, "")
