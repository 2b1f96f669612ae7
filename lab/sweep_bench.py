"""The sweep's part of `invoke bench`: the speed-up pytest-xdist gives the sweep (1 against 2
workers, the same configurations, measured in the same run) and how evenly pytest-split's
shards divide it: estimated from the committed durations for the full sweep, and measured
by running a subset as two shards."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from .build import ROOT
from .sweep import DURATIONS, SPLIT_ALGORITHM, SweepOptions, pytest_command

# A subset with both vendors, several families, a pre-boot skip, under TCG and KVM.
BENCH_MODELS = "qemu64,qemu32,EPYC,Opteron_G4,Haswell,Skylake-Client"


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: a configuration failed; the timing still holds
        raise RuntimeError(f"sweep run ended with pytest status {proc.returncode}: {' '.join(cmd)}")
    return wall


def estimated_shards(splits: int, durations_path: Path = ROOT / DURATIONS) -> list[float]:
    """pytest-split's own assignment of the recorded full sweep to `splits` shards: seconds each."""
    from pytest_split.algorithms import Algorithms

    durations = json.loads(durations_path.read_text())
    items = [SimpleNamespace(nodeid=n) for n in sorted(durations)]
    groups = Algorithms[SPLIT_ALGORITHM].value(splits, items, durations)
    return [round(g.duration, 2) for g in groups]


def measure(console: Console, models: str = BENCH_MODELS) -> dict:
    with tempfile.TemporaryDirectory(prefix="ringlab-sweep-bench-") as tmp:
        def cmd(name: str, **kw) -> list[str]:
            opts = SweepOptions(models=models, tweaks="none", **kw)
            return pytest_command(opts, Path(tmp) / name, sys.executable)

        with console.status("sweep: 1 worker"):
            one = _timed(cmd("one", workers="1"))
        with console.status("sweep: 2 workers (pytest-xdist)"):
            two = _timed(cmd("two", workers="2"))
        with console.status("sweep: 2 shards (pytest-split)"):
            shards = [_timed(cmd(f"shard{k}", workers="1", splits=2, group=k)) for k in (1, 2)]
        configs = len(list((Path(tmp) / "one").glob("*__*.json")))
    est = {n: estimated_shards(n) for n in (2, 4)}
    return {
        "subset_models": models, "subset_configs": configs,
        "one_worker_s": round(one, 2), "two_workers_s": round(two, 2), "speedup": round(one / two, 2),
        "shards_measured_s": [round(s, 2) for s in shards],
        "shards_estimated_full_s": est,
        "shard_balance_estimated": {n: round(max(v) / min(v), 3) for n, v in est.items()},
    }


def show(console: Console, r: dict) -> None:
    console.print(
        f"sweep ({r['subset_configs']} configurations: {r['subset_models']}; tcg+kvm): "
        f"1 worker {r['one_worker_s']} s, 2 workers {r['two_workers_s']} s, speed-up {r['speedup']}x; "
        f"2 shards measured {r['shards_measured_s']} s; full sweep by the committed durations: "
        + "; ".join(f"{n} shards {v} s (max/min {r['shard_balance_estimated'][n]})"
                    for n, v in r["shards_estimated_full_s"].items()),
        highlight=False)
