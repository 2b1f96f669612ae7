"""`invoke bench`: how close the lab is to the floor, and how far ahead of a naive runner.

Everything is measured in the same run on the same machine (these machines are noisy), and
reported as ratios against the floor measured alongside:
- floor: a bare QEMU boot of the lab's kernel to isa-debug-exit, without the lab;
- lab, serial witness, and lab, serial + GDB witness, per accelerator;
- the full `invoke lab.run --accel all` (both witnesses), as a person runs it;
- microvm against pc;
- naive: one QEMU boot per check, as a per-test runner such as kvm-unit-tests' does;
- in-guest costs the firmware measured: CPUID native against through #VMEXIT / a trap.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .build import ROOT, build
from .console import make_console
from .hostinfo import kvm_status, qemu_binary
from .qemu import build_command
from .runner import make_config, run_one

TARGETS = {"lab_over_floor": 1.3, "gdb_added_s": 0.3, "full_run_s": 1.5}


def _stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def _time(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def floor_boot(cfg) -> None:
    """QEMU alone: boot to isa-debug-exit, console discarded (`-serial null`, the cheapest
    backend), nothing watching."""
    cmd = build_command(cfg, serial=None, qmp=None, paused=False)
    cmd[cmd.index("stdio")] = "null"
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if proc.returncode != 1:
        raise RuntimeError(f"bare boot ended with status {proc.returncode}: {' '.join(cmd)}")


def main(rounds: int = 5, json_path: str | None = "bench.json", naive_rounds: int = 1) -> int:
    console = make_console()
    qemu = qemu_binary()
    kvm = kvm_status()
    art = build()
    accels = ["tcg"] + (["kvm"] if kvm.usable else [])
    tmp = Path(tempfile.mkdtemp(prefix="ringlab-bench-"))
    results: dict = {"rounds": rounds, "accels": {}, "targets": TARGETS}

    def lab_boot(cfg, witness):
        out = run_one(cfg, tmp / f"{cfg.accel}-{witness}-{time.monotonic_ns()}", kvm, witness)
        if not out.boot or out.boot.exit != "ok":
            raise RuntimeError(f"lab boot failed: {out.error or out.boot.exit_detail}")
        return out

    for accel in accels:
        cfg = make_config(accel, art, qemu=qemu, kvm=kvm)
        pc_cfg = make_config(accel, art, qemu=qemu, kvm=kvm, machine="pc")
        with console.status(f"{accel}: floor, lab, GDB, pc, naive"):
            floor = _time(lambda: floor_boot(cfg), rounds)
            serial = _time(lambda: lab_boot(cfg, "serial"), rounds)
            gdb = _time(lambda: lab_boot(cfg, "both"), rounds)
            pc = _time(lambda: lab_boot(pc_cfg, "serial"), max(1, min(rounds, 3)))
            n_checks = len([c for c in lab_boot(cfg, "serial").checks if c.status != "skip"])
            naive = [sum(_time(lambda: lab_boot(cfg, "serial"), n_checks)) for _ in range(naive_rounds)]
            costs = lab_boot(cfg, "serial").as_run_dict()["costs"]
        f, s, g = _stats(floor), _stats(serial), _stats(gdb)
        results["accels"][accel] = {
            "floor_s": f, "lab_serial_s": s, "lab_gdb_s": g, "pc_serial_s": _stats(pc),
            "naive_s": _stats(naive), "naive_boots": n_checks,
            "lab_over_floor": s["median"] / f["median"],
            "gdb_added_s": g["median"] - s["median"],
            "naive_over_lab": statistics.median(naive) / s["median"],
            "pc_over_microvm": statistics.median(pc) / s["median"],
            "guest_costs_cycles": costs,
        }

    full_cmd = [sys.executable, "-m", "invoke", "lab.run", "--accel", "all", "--json", str(tmp / "full.json")]
    with console.status("full invoke lab.run --accel all"):
        full = _time(lambda: subprocess.run(full_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, check=False), rounds)
    results["full_run_s"] = _stats(full)

    verdicts = _verdicts(results)
    results["verdicts"] = verdicts
    _print(console, results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"figures: {json_path}")
    return 0 if all(v["met"] for v in verdicts) else 1


def _verdicts(r: dict) -> list[dict]:
    out = []
    for accel, a in r["accels"].items():
        out.append({"target": f"{accel}: lab serial <= {TARGETS['lab_over_floor']}x floor",
                    "value": round(a["lab_over_floor"], 2), "met": a["lab_over_floor"] <= TARGETS["lab_over_floor"]})
        out.append({"target": f"{accel}: GDB witness adds <= {TARGETS['gdb_added_s']} s",
                    "value": round(a["gdb_added_s"], 3), "met": a["gdb_added_s"] <= TARGETS["gdb_added_s"]})
    full = r["full_run_s"]["median"]
    out.append({"target": f"full run <= {TARGETS['full_run_s']} s", "value": round(full, 3),
                "met": full <= TARGETS["full_run_s"]})
    return out


def _fmt(s: dict) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def _print(console: Console, r: dict) -> None:
    t = Table(title=f"ring-lab bench (seconds, median \\[min-max], {r['rounds']} rounds)")
    for col in ("accel", "floor", "lab serial", "lab+GDB", "pc serial", "naive", "lab/floor", "GDB adds",
                "naive/lab", "pc/microvm"):
        t.add_column(col)
    for accel, a in r["accels"].items():
        t.add_row(accel, _fmt(a["floor_s"]), _fmt(a["lab_serial_s"]), _fmt(a["lab_gdb_s"]), _fmt(a["pc_serial_s"]),
                  f"{_fmt(a['naive_s'])} ({a['naive_boots']} boots)", f"{a['lab_over_floor']:.2f}x",
                  f"{a['gdb_added_s']:+.3f} s", f"{a['naive_over_lab']:.0f}x", f"{a['pc_over_microvm']:.1f}x")
    console.print(t)
    console.print(f"full invoke lab.run --accel all: {_fmt(r['full_run_s'])}")
    for accel, a in r["accels"].items():
        for k, v in sorted(a["guest_costs_cycles"].items()):
            if k.endswith("_cycles"):
                console.print(f"  {accel} {k} = {v} TSC cycles")
    for v in r["verdicts"]:
        console.print(f"  {'met' if v['met'] else 'MISSED':6} {v['target']}: {v['value']}",
                      style="green" if v["met"] else "bold red")
