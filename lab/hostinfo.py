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
    """The QEMU binary: --qemu, else $LAB_QEMU, else qemu-system-x86_64 on PATH. A path the
    user typed is checked as a path: installing a package would not make it exist."""
    given = explicit or os.environ.get("LAB_QEMU")
    source = "--qemu" if explicit else "LAB_QEMU"
    if given and os.sep in given:
        if not os.path.exists(given):
            raise ToolMissing(f"{source} {given}: no such file")
        if os.path.isdir(given) or not os.access(given, os.X_OK):
            raise ToolMissing(f"{source} {given}: not an executable file")
        return os.path.abspath(given)
    if given:
        path = shutil.which(given)
        if path is None:
            raise ToolMissing(f"{source} {given!r}: no such program on PATH")
        return path
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise ToolMissing(f"QEMU not found (qemu-system-x86_64). Install it: {INSTALL_HINT}")
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


@functools.cache
def cpu_models(binary: str) -> frozenset[str]:
    """The CPU model names this QEMU knows (`-cpu help`), asked once per binary and run."""
    try:
        out = subprocess.run([binary, "-cpu", "help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolMissing(f"{binary} -cpu help failed: {exc}") from None
    names = frozenset(m.group(1) for m in re.finditer(r"^x86\s+(\S+)", out.stdout, re.M))
    if out.returncode != 0 or not names:
        raise ToolMissing(f"{binary} is not an x86 QEMU: `-cpu help` listed no x86 CPU models")
    return names


@functools.cache
def host_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU flags Linux reports for the machine running the lab (its first `flags` line);
    empty where it cannot be read. Only facts a KVM may pass through natively are taken from it
    (lab/expectations.py Facts.host_cpuid_fault)."""
    try:
        with open(cpuinfo, encoding="latin-1") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


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


# KVM_CHECK_EXTENSION = _IO(KVMIO=0xAE, 0x03); KVM_CAP_X86_SMM = 117 (linux/kvm.h): whether
# this KVM can run a guest's System Management Mode (QEMU's pc/q35 with smm=auto turn SMM
# off where it cannot, so an OUT to APM_CNT raises no SMI).
KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM = 0xAE03, 117


@functools.lru_cache(maxsize=None)
def kvm_has_smm(dev: str = "/dev/kvm") -> bool:
    """KVM_CAP_X86_SMM of the KVM behind `dev` (False without a usable /dev/kvm)."""
    import fcntl

    try:
        fd = os.open(dev, os.O_RDWR)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM) > 0
    except OSError:
        return False
    finally:
        os.close(fd)
