"""`invoke soak`: the full matrix N times; any check whose status changes between rounds, and
any fail or error, is a flake."""

from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from . import report
from .cli import RunOptions, check_options, run_lab
from .config import ConfigError
from .runner import new_run_root


def soak(n: int, opts: RunOptions, console: Console, root: Path | None = None) -> dict:
    """N rounds into `root` (default: a new folder under runs/). A round that passes leaves
    nothing; a failed round keeps its run folder, which explains it."""
    root = root or new_run_root()
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad_rounds: list[dict] = []
    with Progress(console=console) as progress:
        task = progress.add_task(f"soak x{n}", total=n)
        for i in range(n):
            round_dir = root / f"round-{i}"
            opts.runs_dir = str(round_dir)
            status, report = run_lab(opts, console)
            if report is None:  # interrupted
                break
            for c in report["checks"]:
                seen[f"{c['config']} {c['id']}"][c["status"]] += 1
            if status:
                bad = [f"{c['config']} {c['id']}: {c['status']} {c['reason']}" for c in report["checks"]
                       if c["status"] in ("fail", "error")]
                bad_rounds.append({"round": i, "problems": bad, "run_dir": str(round_dir)})
            else:
                shutil.rmtree(round_dir, ignore_errors=True)
            progress.advance(task)
    flaky = {k: dict(v) for k, v in seen.items() if len(v) > 1}
    return {"rounds": n, "failed_rounds": bad_rounds, "flaky_checks": flaky, "root": str(root)}


def main(n: int = 100, accel: str = "all", witness: str = "both", json_path: str | None = None) -> int:
    console = Console()
    if n < 1:
        raise ConfigError(f"-n {n}: at least 1 round")
    target = report.check_target(json_path, "--json") if json_path else None  # before the first round
    opts = RunOptions(accel=accel, witness=witness, quiet=True)
    check_options(opts)  # every value, as lab.run checks them, before the progress bar and the folder
    result = soak(n, opts, console)
    out = target or Path(result["root"]) / "soak.json"
    report._atomic_write(out, json.dumps(result, indent=2) + "\n")
    flakes = len(result["failed_rounds"]) + len(result["flaky_checks"])
    for r in result["failed_rounds"][:10]:
        console.print(f"[red]round {r['round']}[/] (run folder {r['run_dir']}):")
        for problem in r["problems"][:5]:
            console.print(f"  {problem}", highlight=False)
        if len(r["problems"]) > 5:
            console.print(f"  ... {len(r['problems']) - 5} more in {r['run_dir']}")
    for k, v in list(result["flaky_checks"].items())[:20]:
        console.print(f"[yellow]flaky[/] {k}: {v}")
    console.print(f"soak: {n} rounds, {flakes} flake(s); result {out}", style="bold red" if flakes else "bold green")
    return 1 if flakes else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
