"""The sweep as pytest tests: one test per configuration, parametrized from QEMU's own model
list, so pytest-xdist (`-n 2`, `--tx 2*popen`) and pytest-split (`--splits N --group K`)
spread it. Collected only when this folder is named (`pytest tests/sweep ...`, which
`invoke lab.sweep` runs): pyproject's `norecursedirs` keeps it out of the default run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import build, sweep
from lab.config import ConfigError
from lab.hostinfo import ToolMissing, kvm_status, qemu_binary, require_tool
from lab.runner import WITNESSES


def pytest_addoption(parser):
    g = parser.getgroup("ring-lab sweep")
    g.addoption("--sweep-dir", default=None, help="sweep folder for the per-configuration JSON reports (required)")
    g.addoption("--sweep-accel", default="all", help="all, tcg, kvm or tcg,kvm")
    g.addoption("--sweep-models", default="*", help="comma-separated globs over QEMU's model names")
    g.addoption("--sweep-tweaks", default="all", help=f"all, none or some of {','.join(sweep.TWEAK_NAMES)}")
    g.addoption("--sweep-witness", default="both", help="serial, gdb or both")
    g.addoption("--sweep-versions", action="store_true", help="also QEMU's versioned model names (X-v1, ...)")
    g.addoption("--sweep-qemu", default=None, help="QEMU binary")
    g.addoption("--sweep-variant", default="normal", help="kernel build: normal or lie (negative control)")
    g.addoption("--sweep-timeout", default=15.0, type=float, help="seconds a boot may take")


def _options(config) -> dict:
    o = config.option
    if not o.sweep_dir:
        raise pytest.UsageError("--sweep-dir DIR is required (the folder for the per-configuration reports)")
    if o.sweep_witness not in WITNESSES:
        raise pytest.UsageError(f"--sweep-witness {o.sweep_witness!r}: choose one of {', '.join(WITNESSES)}")
    return {"dir": Path(o.sweep_dir), "witness": o.sweep_witness, "variant": o.sweep_variant,
            "timeout": o.sweep_timeout}


def pytest_generate_tests(metafunc):
    if "sweep_cfg" not in metafunc.fixturenames:
        return
    config = metafunc.config
    _options(config)
    try:
        qemu = qemu_binary(config.option.sweep_qemu)
        cfgs = sweep.plan(qemu, kvm_status(), accels=config.option.sweep_accel, models=config.option.sweep_models,
                          tweaks=config.option.sweep_tweaks, versions=config.option.sweep_versions)
    except (ConfigError, ToolMissing) as exc:
        raise pytest.UsageError(str(exc)) from None
    if not cfgs:
        raise pytest.UsageError(f"--sweep-models {config.option.sweep_models!r} matches no CPU model QEMU lists")
    metafunc.parametrize("sweep_cfg", cfgs, ids=[c.id for c in cfgs])


@pytest.fixture(scope="session")
def sweep_env(pytestconfig):
    opts = _options(pytestconfig)
    qemu = qemu_binary(pytestconfig.option.sweep_qemu)
    if opts["witness"] != "serial":
        require_tool("gdb")
    return {**opts, "qemu": qemu, "kvm": kvm_status(), "art": build.build(opts["variant"])}
