"""`invoke soak`: the full matrix N times; any check whose status changes between rounds, and
any fail or error, is a flake."""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from .cli import RunOptions, run_lab


def soak(n: int, opts: RunOptions, console: Console) -> dict:
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad_rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ringlab-soak-") as runs, Progress(console=console) as progress:
        task = progress.add_task(f"soak x{n}", total=n)
        for i in range(n):
            opts.runs_dir = runs
            status, report = run_lab(opts, console)
            if report is None:  # interrupted
                break
            for c in report["checks"]:
                seen[f"{c['config']} {c['id']}"][c["status"]] += 1
            if status:
                bad = [f"{c['config']} {c['id']}: {c['status']} {c['reason']}" for c in report["checks"]
                       if c["status"] in ("fail", "error")]
                bad_rounds.append({"round": i, "problems": bad})
            progress.advance(task)
    flaky = {k: dict(v) for k, v in seen.items() if len(v) > 1}
    return {"rounds": n, "failed_rounds": bad_rounds, "flaky_checks": flaky}


def main(n: int = 100, accel: str = "all", witness: str = "both", json_path: str | None = None) -> int:
    console = Console()
    result = soak(n, RunOptions(accel=accel, witness=witness, quiet=True), console)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    flakes = len(result["failed_rounds"]) + len(result["flaky_checks"])
    for r in result["failed_rounds"][:10]:
        console.print(f"[red]round {r['round']}:[/] " + "; ".join(r["problems"][:5]))
    for k, v in list(result["flaky_checks"].items())[:20]:
        console.print(f"[yellow]flaky[/] {k}: {v}")
    console.print(f"soak: {n} rounds, {flakes} flake(s)", style="bold red" if flakes else "bold green")
    return 1 if flakes else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
