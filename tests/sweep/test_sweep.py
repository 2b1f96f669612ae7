"""One test per sweep configuration: the lab's own runner boots it, its JSON report goes
into the sweep folder, and the test fails on any fail or error check."""

from __future__ import annotations

import pytest

from lab import sweep

pytestmark = pytest.mark.sweep


def test_config(sweep_cfg: sweep.SweepConfig, sweep_env):
    rep = sweep.run_config(sweep_cfg, art=sweep_env["art"], qemu=sweep_env["qemu"], kvm=sweep_env["kvm"],
                           out_dir=sweep_env["dir"], witness=sweep_env["witness"], timeout_s=sweep_env["timeout"])
    if sweep.bad_checks(rep):
        run = rep["runs"][0] if rep["runs"] else {}
        lines = sweep.bad_lines(rep["checks"])
        pytest.fail("\n".join([*lines, f"reproduce: {run.get('repro', '')}"]), pytrace=False)
    skip = rep[sweep.SWEEP_KEY]["skip"]
    if skip:
        pytest.skip(skip)
