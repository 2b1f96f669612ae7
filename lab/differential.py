"""The differential view: where engines (QEMU's TCG and KVM, Bochs) disagree on a check.

Three independent x86 implementations run the same kernel; where their verdicts on the
same check differ, at least one of them deviates from the architecture. Each engine's
expectation is derived from its own CPU model, so a disagreement is a difference of
verdict, never of value (two models may differ in vendor and still both pass). Every
disagreement is accounted for: on each side that did not pass, either a named deviation
(`xfail`, lab/deviations.py, with the value it showed as evidence) or a failure. Exit
counts, which the plan only requires to be at least one, are listed side by side.
Reads the report dict only (lab/report.py); judges nothing itself.
"""

from __future__ import annotations

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .console import fit, out
from .judge import show

COUNTED = ("vmexit", "trap")  # probes whose value is a count: compared, never a disagreement


def _engines(report: dict) -> list[str]:
    return list(dict.fromkeys(r["config"] for r in report["runs"]))


def build(report: dict) -> dict:
    """{"configs", "disagreements": [...], "counts": [...]} for a report of two or more boots."""
    configs = _engines(report)
    by_id: dict[str, dict[str, dict]] = {}
    for c in report["checks"]:
        if c["config"] in configs:
            by_id.setdefault(c["id"], {})[c["config"]] = c
    disagreements, counts = [], []
    for cid, per in by_id.items():
        ran = {cfg: c for cfg, c in per.items() if c["status"] != "skip"}
        if len(ran) < 2:
            continue
        if next(iter(ran.values()))["probe"] in COUNTED:
            values = {cfg: c["observed"] for cfg, c in ran.items()}
            if len(set(values.values())) > 1:
                counts.append({"id": cid, "observed": values})
        statuses = {cfg: c["status"] for cfg, c in ran.items()}
        if len(set(statuses.values())) == 1:
            continue
        sides = {}
        for cfg, c in ran.items():
            if c["status"] == "pass":
                kind = "pass"
            elif c["status"] == "xfail":
                kind = "named deviation"
            else:
                kind = "failure"
            sides[cfg] = {"status": c["status"], "kind": kind, "observed": show(c["observed"]),
                          "expected": show(c["expected"]), "reason": c["reason"]}
        # Accounted for: every side that did not pass is a named deviation; else a failure.
        disagreements.append({"id": cid, "sides": sides,
                              "accounted": all(s["kind"] != "failure" for s in sides.values())})
    return {"configs": configs, "disagreements": disagreements, "counts": counts}


def short_names(configs: list[str]) -> dict[str, str]:
    """`accel/machine/cpu` labels as column titles: the engine, with its CPU model when an
    engine ran more than one."""
    accels = [c.split("/")[0] for c in configs]
    return {c: a if accels.count(a) == 1 else f"{a} {c.split('/', 2)[-1]}" for c, a in zip(configs, accels)}


def _verdict(side: dict | None) -> Text:
    if side is None:
        return Text("- not run", style="dim")
    if side["kind"] == "pass":
        return Text(f"pass {side['observed']}", style="green")
    if side["kind"] == "named deviation":
        name = side["reason"].split(":", 1)[0]
        return Text(f"deviation {name}: {side['observed']} (architecture: {side['expected']})", style="yellow")
    return Text(f"{side['status']}: {side['observed']} (want {side['expected']})", style="bold red")


def render(diff: dict, console: Console) -> None:
    """Where the engines disagree, and each side's account of it; then counts that differ.

    Each check is a line of its own with one line per engine under it (the engine, then its
    verdict, which wraps between words): four engines side by side need more than 100
    columns once a deviation is named, and a table folded to fit breaks ids and names
    mid-word. The counts are short: a table, its titles wrapped at a space if need be, or
    the same lines as the checks where even that does not fit."""
    short = short_names(diff["configs"])
    out(console, Text(f"Differential view: {len(diff['configs'])} boots, {len(diff['disagreements'])} "
                      f"check(s) where the verdicts differ", style="bold"))
    for d in diff["disagreements"]:
        _block(console, diff["configs"], short, d["id"], [_verdict(d["sides"].get(cfg)) for cfg in diff["configs"]])
    if diff["counts"]:
        out(console, Text("exit and trap counts (each engine's own; the plan asks for at least one)"))
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold",
                      collapse_padding=True)
        table.add_column("count", no_wrap=True)
        for cfg in diff["configs"]:
            table.add_column(short.get(cfg, cfg), overflow="fold")
        for c in diff["counts"]:
            table.add_row(c["id"], *[c["observed"].get(cfg) or "-" for cfg in diff["configs"]])
        if fit(console, table):  # an engine's title wraps at its space, if need be
            out(console, table)
        else:
            for c in diff["counts"]:
                _block(console, diff["configs"], short, c["id"],
                       [Text(c["observed"].get(cfg) or "-") for cfg in diff["configs"]])


def _block(console: Console, configs: list[str], short: dict[str, str], title: str, cells: list[Text]) -> None:
    """A check's id on its own line, then a line per engine: its name, then its cell."""
    names = ["  " + short.get(cfg, cfg) for cfg in configs]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, min_width=max(cell_len(n) for n in short.values()) + 2)  # aligned across blocks
    grid.add_column(overflow="fold")
    for name, cell in zip(names, cells):
        grid.add_row(name, cell)
    out(console, Text(title, style="bold"))
    out(console, grid)
