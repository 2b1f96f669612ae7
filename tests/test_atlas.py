"""The privilege atlas (issue: every CR4/IOPL-gated user instruction): on a CPU model that has
every feature (`max`), every family runs and every row passes or is a named deviation, in
the host and in the guest under each host, and GDB reads the rows it can."""
from __future__ import annotations

import shutil

import pytest

from lab import build, catalogue, deviations
from lab.config import ConfigError
from lab.runner import make_config, preboot, run_one

FAMILIES = {"umip", "cr4-reserved", "pmc", "cpuid-faulting", "iopl", "io", "tsc", "priv"}
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def boot(tmp_path, accel, qemu, kvm, **kw):
    try:
        cfg = preboot(make_config(accel, build.build(), qemu=qemu, kvm=kvm, cpu="max", **kw)).cfg
    except ConfigError as exc:  # some hosts' KVM refuses MSR 0x10a for `max`: the documented fix
        if "0x10a" not in str(exc):                                   # (lab/qemu.py, docs/platform.md)
            raise
        cfg = preboot(make_config(accel, build.build(), qemu=qemu, kvm=kvm, cpu="max,-arch-capabilities", **kw)).cfg
    return run_one(cfg, tmp_path / f"{accel}-{kw.get('host_mode', 'auto')}", kvm, "both")


def family(check) -> str | None:
    for row in catalogue.rows(check.scope):
        if row.id == check.id:
            return row.entry.family
    return None


@needs_gdb
@pytest.mark.gdb
@pytest.mark.parametrize("accel,host_mode", [pytest.param("tcg", "auto", marks=pytest.mark.tcg),
                                             pytest.param("tcg", "soft", marks=pytest.mark.tcg),
                                             pytest.param("kvm", "auto", marks=pytest.mark.kvm)])
def test_every_family_runs_on_max_and_passes_or_is_named(tmp_path, accel, host_mode, qemu, kvm, no_leftovers):
    out = boot(tmp_path, accel, qemu, kvm, host_mode=host_mode)
    bad = [(c.id, c.status, c.reason) for c in out.checks if c.status in ("fail", "error", "xpass")]
    assert not bad
    ran = {family(c) for c in out.checks if c.scope == "host" and c.status in ("pass", "xfail")}
    missing = FAMILIES - ran - ({"cpuid-faulting"} if accel == "tcg" else set())  # TCG does not offer it
    assert not missing, missing
    names = {d.name for d in deviations.DEVIATIONS}
    for c in out.checks:
        if c.status == "xfail":
            assert c.reason.split(":")[0] in names, c  # named: "<deviation>: why"
    # The guest kernel's UMIP rows, at its CPL3 under its own CR4.UMIP, under whichever host runs it.
    scope = {"auto": "guest-svm" if accel == "tcg" else "guest-soft", "soft": "guest-soft"}[host_mode]
    umip = {c.id: c for c in out.checks if c.scope == scope and family(c) == "umip"}
    assert len(umip) == 10 and all(c.status == "pass" for c in umip.values())
    assert umip[f"{scope}.sgdt.umip1.cpl3"].observed == "#GP(0)" and umip[f"{scope}.sgdt.umip0.cpl3"].observed == "ok"
    if accel == "tcg":  # the CPU's own evidence, read at the IDT the CPU used
        assert all("gdb" in c.witnesses for c in umip.values())
