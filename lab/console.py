"""What a person at a terminal sees: a header, one table with the configurations and scopes
side by side, the reasons behind every non-pass, and how to reproduce each boot."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .judge import show

STYLE = {"pass": "green", "fail": "bold red", "error": "bold red", "xfail": "yellow",
         "xpass": "magenta", "skip": "dim"}
MARK = {"pass": "✓", "fail": "✗", "error": "!", "xfail": "x", "xpass": "X", "skip": "-"}
SCOPE_TITLE = {"host": "host", "guest-svm": "guest (SVM)", "guest-soft": "guest (soft)"}


def _row_key(check: dict) -> str:
    # The id without its scope: the same probe lines up across host and guest columns.
    return check["id"].split(".", 1)[1] if check["scope"] != "host" or check["probe"] != "run" else "run.integrity"


def _cell(check: dict) -> Text:
    st = check["status"]
    observed = check["observed"] if check["observed"] is not None else "—"
    text = Text(f"{MARK[st]} {observed}", style=STYLE[st])
    if st in ("fail", "error") and check["expected"] is not None:
        text.append(f" (want {check['expected']})", style="red")
    if "gdb" in check["witnesses"]:
        text.append(" ᵍ", style="cyan")
    return text


def make_console(stderr: bool = False) -> Console:
    """A terminal's own width; 160 columns when writing to a file or a pipe (CI logs)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def render(report: dict, console: Console | None = None) -> None:
    console = console or make_console()
    h = report["host"]
    kvm = h["kvm_module"] or "none"
    kvm_note = "" if h["kvm_usable"] else f" (unusable: {h['kvm_reason']})"
    console.print(f"[bold]ring-lab {report['lab_version']}[/]  QEMU {h['qemu']}  KVM module: {kvm}{kvm_note}")

    columns: list[tuple[str, str]] = []  # (config, scope)
    for c in report["checks"]:
        key = (c["config"], c["scope"])
        if key not in columns:
            columns.append(key)
    rows: dict[str, dict[tuple[str, str], dict]] = {}
    for c in report["checks"]:
        rows.setdefault(_row_key(c), {})[(c["config"], c["scope"])] = c

    # Short column titles (the accelerator) when each accelerator has one configuration.
    configs = list(dict.fromkeys(cfg for cfg, _ in columns))
    short = {cfg: cfg.split("/")[0] for cfg in configs}
    if len(set(short.values())) < len(configs):
        short = {cfg: cfg for cfg in configs}
    console.print("columns: " + "; ".join(f"{short[c]} = {c}" for c in configs), highlight=False)
    table = Table(show_lines=False, header_style="bold", pad_edge=False)
    table.add_column("check", no_wrap=True)
    for cfg, scope in columns:
        table.add_column(f"{short[cfg]}\n{SCOPE_TITLE.get(scope, scope)}")
    for key, cells in rows.items():
        table.add_row(key, *[_cell(cells[col]) if col in cells else Text("") for col in columns])
    console.print(table)

    notes = [c for c in report["checks"] if c["status"] != "pass"]
    if notes:
        console.print("[bold]Why not pass[/]")
        seen: set[tuple[str, str]] = set()
        for c in notes:
            if c["status"] == "skip" and (c["config"], c["reason"]) in seen:
                continue  # one line for a whole skipped column
            seen.add((c["config"], c["reason"]))
            console.print(Text(f"  {c['status']:5} {c['config']} {c['id']}: {c['reason']}", style=STYLE[c["status"]]))

    for r in report["runs"]:
        console.print(f"[bold]{r['config']}[/] exit={r['exit']} wall={r['wall_s']} s  log: {r['log']}")
        if r["exit"] != "ok":
            console.print(f"  [red]{r['exit_detail']}[/]")
        for line in _cost_lines(r.get("costs", {})):
            console.print(f"  {line}")
        if r["repro"]:
            console.print(f"  reproduce: {r['repro']}", soft_wrap=True, highlight=False)
    s = report["summary"]
    line = "  ".join(f"{k}={v}" for k, v in s.items())
    bad = s["fail"] + s["error"]
    console.print(f"[{'bold red' if bad else 'bold green'}]{line}[/]")


def _cost_lines(costs: dict[str, int]) -> list[str]:
    """`cost.<op>.<path>_cycles` pairs from the firmware, native against trapped."""
    out = []
    ops = sorted({k.split(".")[1] for k in costs if k.endswith("_cycles")})
    for op in ops:
        native = costs.get(f"cost.{op}.native_cycles")
        paths = [(k.split(".")[2][: -len("_cycles")], v) for k, v in costs.items()
                 if k.startswith(f"cost.{op}.") and k.endswith("_cycles") and not k.endswith("native_cycles")]
        if native is None:
            continue
        for path, cycles in paths:
            ratio = f" (x{cycles / native:.0f})" if native else ""
            out.append(f"{op.upper()} cost: native {native} TSC cycles, through {path} {cycles}{ratio}")
    return out


def last_lines(serial: bytes, n: int = 5) -> list[str]:
    """The end of a console capture, printable, for error messages."""
    text = serial.decode("latin-1")
    return [show(line)[:200] for line in text.splitlines()[-n:]]
