"""The sweep's merged result: the per-configuration reports of every pytest worker and shard
(lab/sweep.py writes them) -> one model x engine matrix with counts per status, the known
deviations seen, the non-pass checks and the repro command; shown as a terminal table and
written as JSON, JUnit and one static HTML page (lab/sweep_html.py)."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, deviations
from . import report as report_mod
from .config import ConfigError
from .judge import STATUSES
from .sweep import ENGINES, SWEEP_KEY, bad_lines, report_files

MERGED_NAMES = ("matrix.json", "matrix.junit.xml", "matrix.html")


# -- merging ------------------------------------------------------------------------------------
def _deviations_seen(rep: dict) -> list[str]:
    """Names of the known deviations (lab/deviations.py) behind this report's xfail, xpass and
    skip checks, as the judge named them in each check's reason."""
    known = {d.name for d in deviations.DEVIATIONS}
    names = set()
    for c in rep["checks"]:
        if c["status"] in ("xfail", "skip"):  # reason: "<name>: <why>"
            name = c["reason"].split(":", 1)[0]
        elif c["status"] == "xpass":  # reason: "known deviation <name> did not happen: ..."
            m = re.match(r"known deviation (\S+) did not happen", c["reason"])
            name = m.group(1) if m else ""
        else:
            continue
        if name in known:
            names.add(name)
    return sorted(names)


_RANK = {"error": 0, "fail": 1, "xpass": 2, "xfail": 3, "skip": 4, "pass": 5}


def _worst_first(check: dict) -> tuple:
    """A boot's cause (run.integrity) first, then errors, fails, ... (the report's order within)."""
    return (check["id"] != "run.integrity", _RANK[check["status"]])


CPUID_VALUES = ("cpuid-vendor", "cpuid-hv-bit", "cpuid-hv-signature")  # shown for every cell


def _cell(rep: dict, path: Path) -> dict:
    meta = rep[SWEEP_KEY]
    counts = dict.fromkeys(STATUSES, 0)
    for c in rep["checks"]:
        counts[c["status"]] += 1
    if counts["error"]:
        status = "error"
    elif counts["fail"]:
        status = "fail"
    elif meta.get("skip"):
        status = "skip"
    elif counts["xfail"] or counts["xpass"]:
        status = "xfail"
    else:
        status = "pass"
    run = rep["runs"][0] if rep["runs"] else {}
    return {
        "status": status,
        "counts": counts,
        "deviations": _deviations_seen(rep),
        "cpu": run.get("cpu", meta["cpu"]),
        "tweak": meta.get("tweak", ""),
        "retry": meta.get("retry"),
        "timeout_retry": meta.get("timeout_retry"),  # lab/sweep.py: a boot retried after a timeout
        "skip": meta.get("skip"),
        "repro": run.get("repro", ""),
        "run_dir": run.get("run_dir", ""),
        "report": str(path),
        "nonpass": [{k: c[k] for k in ("id", "status", "expected", "observed", "reason")}
                    for c in sorted(rep["checks"], key=_worst_first) if c["status"] != "pass"],
        # What the CPU told the lab's kernel and its guest, whatever the verdict (the HTML page shows it).
        "values": {c["id"]: c["observed"] for c in rep["checks"] if c["probe"] in CPUID_VALUES
                   and c["status"] != "skip"},
    }


def merge(folders: list[Path]) -> dict:
    """All workers' and shards' reports -> one matrix: model x engine -> counts, status, the
    deviations seen, the non-pass checks and how to reproduce."""
    cells: dict[str, dict[str, dict]] = {}
    tweak_rows: dict[str, str] = {}
    hosts: list[dict] = []
    for path in report_files(folders):
        rep = json.loads(path.read_text())
        if SWEEP_KEY not in rep:
            continue
        meta = rep[SWEEP_KEY]
        row, engine = meta["cpu"], meta["accel"]  # row "*": an engine skipped as a whole (KVM not usable)
        if rep["host"] not in hosts:
            hosts.append(rep["host"])
        if meta.get("tweak"):
            tweak_rows[row] = meta["tweak"]
        if engine in cells.get(row, {}):
            raise ConfigError(f"two reports for {engine} {row}: {cells[row][engine]['report']} and {path}")
        cells.setdefault(row, {})[engine] = _cell(rep, path)
    engines = [e for e in ENGINES if any(e in r for r in cells.values())]
    # An engine skipped as a whole fills every row of its column with that skip.
    for engine in engines:
        whole = cells.get("*", {}).get(engine)
        if whole:
            for row in cells:
                cells[row].setdefault(engine, whole)
    if len(cells) > 1:
        cells.pop("*", None)
    rows = sorted(cells, key=lambda r: (r in tweak_rows, r.lower()))
    summary = {"configs": sum(len(c) for c in cells.values()), "by_status": dict.fromkeys(STATUSES, 0),
               "checks": dict.fromkeys(STATUSES, 0)}
    dev_seen: dict[str, int] = {}
    for row in rows:
        for cell in cells[row].values():
            summary["by_status"][cell["status"]] += 1
            for k, v in cell["counts"].items():
                summary["checks"][k] += v
            for d in cell["deviations"]:
                dev_seen[d] = dev_seen.get(d, 0) + 1
    reasons = {d.name: d.reason for d in deviations.DEVIATIONS}
    return {
        "completeness": completeness(folders),
        "lab_version": __version__,
        "hosts": hosts,
        "engines": engines,
        "rows": [{"model": r, "tweak": tweak_rows.get(r, "")} for r in rows],
        "cells": cells,
        "deviations": {d: {"configs": n, "reason": reasons.get(d, "")} for d, n in sorted(dev_seen.items())},
        "summary": summary,
    }


def completeness(folders: list[Path]) -> dict:
    """What the folders' sweeps planned (their plan.json, lab/sweep.py) against the reports
    they hold: a sweep killed or a shard left out is partial. A folder without a plan (made
    by hand, or by an older lab) cannot say: it is named under `unplanned`."""
    from .sweep import PLAN_NAME

    planned: set[str] = set()
    unplanned = []
    for folder in folders:
        try:
            planned |= set(json.loads((Path(folder) / PLAN_NAME).read_text())["configs"])
        except (OSError, ValueError, KeyError, TypeError):
            unplanned.append(str(folder))
    reported = {p.stem for p in report_files(folders)}
    missing = sorted(planned - reported)
    return {"planned": len(planned), "reported": len(reported & planned) if planned else len(reported),
            "missing": missing, "unplanned": unplanned, "partial": bool(missing)}


def matrix_view(merged: dict) -> dict:
    """What must not depend on how the sweep was spread: per cell its status, counts,
    deviations and non-pass checks (not paths, walls or the order files were written)."""
    return {
        row: {e: (c["status"], c["counts"], c["deviations"], sorted((n["id"], n["status"]) for n in c["nonpass"]))
              for e, c in cells.items()}
        for row, cells in merged["cells"].items()
    }


def exit_status(merged: dict, partial_ok: bool = False) -> int:
    """1 on a fail or an error, on nothing merged, and on a partial sweep unless told it may be."""
    s = merged["summary"]["by_status"]
    partial = merged.get("completeness", {}).get("partial") and not partial_ok
    return 1 if s["fail"] or s["error"] or not merged["cells"] or partial else 0


# -- outputs ------------------------------------------------------------------------------------
STYLE = {"pass": "green", "fail": "bold red", "error": "bold red", "xfail": "yellow", "skip": "dim"}


def cell_text(cell: dict) -> str:
    """Compact counts: `✓45 x3 -23` (pass, xfail, skip), fails and errors first when present."""
    n = cell["counts"]
    if cell["status"] == "skip" and not n["pass"]:
        return "- skip"
    parts = [f"✗{n['fail']}" if n["fail"] else "", f"!{n['error']}" if n["error"] else "", f"✓{n['pass']}",
             f"~{n['xfail']}" if n["xfail"] else "", f"X{n['xpass']}" if n["xpass"] else "",
             f"-{n['skip']}" if n["skip"] else ""]
    return " ".join(p for p in parts if p) + (" ʳ" if cell.get("retry") or cell.get("timeout_retry") else "")


def render(merged: dict, console: Console) -> None:
    """The matrix for a terminal: one row per model, one column per engine, then every
    non-pass configuration named with its reason (skips grouped by reason)."""
    engines = merged["engines"]
    table = Table(header_style="bold", pad_edge=False, title="sweep: model x engine (checks per status)")
    table.add_column("model", no_wrap=True, overflow="fold")
    for e in engines:
        table.add_column(e, no_wrap=True)
    for row in merged["rows"]:
        cells = merged["cells"][row["model"]]
        table.add_row(row["model"], *[Text(cell_text(cells[e]), style=STYLE[cells[e]["status"]]) if e in cells
                                      else Text("") for e in engines])
    console.print(table)
    console.print("legend: ✓ pass  ~ xfail (known deviation)  X xpass  - skip  ✗ fail  ! error  ʳ retried; "
                  "a cell's colour is its worst status (xfail: nothing failed, a named deviation showed)",
                  highlight=False)
    skips: dict[str, list[str]] = {}
    for row in merged["rows"]:
        for e, cell in merged["cells"][row["model"]].items():
            label = f"{e} {row['model']}"
            if cell["retry"]:
                retry = cell["retry"]
                console.print(f"retried {label} as -cpu {retry['cpu']}: {retry['why']}", highlight=False)
            if cell.get("timeout_retry"):
                t = cell["timeout_retry"]
                console.print(f"retried {label} after a timeout ({t['why']}) with {t['retry_timeout_s']:g} s instead of "
                              f"{t['timeout_s']:g} s: the verdict is the second boot's", highlight=False)
            if cell["skip"]:
                skips.setdefault(cell["skip"], []).append(label)
            elif cell["status"] in ("fail", "error"):
                console.print(Text(f"{cell['status']} {label}: {cell['report']}", style=STYLE[cell["status"]]))
                for line in bad_lines(cell["nonpass"]):
                    console.print(f"  {line}", highlight=False)
                console.print(f"  reproduce: {cell['repro']}", highlight=False, soft_wrap=True)
    for reason, labels in skips.items():
        console.print(f"skip ({len(labels)}) {reason}: {', '.join(labels)}", style="dim", highlight=False)
    for name, d in merged["deviations"].items():
        console.print(f"deviation {name} ({d['configs']} configurations): {d['reason']}", style="yellow",
                      highlight=False)
    s = merged["summary"]
    line = "  ".join(f"{k}={v}" for k, v in s["by_status"].items() if k != "xpass")
    bad = s["by_status"]["fail"] + s["by_status"]["error"]
    note = ("  (nothing failed; xfail: a named deviation showed in a configuration)"
            if not bad and s["by_status"]["xfail"] else "")
    console.print(f"[{'bold red' if bad else 'bold green'}]configurations={s['configs']}  {line}{note}[/]")
    done = merged.get("completeness") or {}
    if done.get("partial"):
        missing = done["missing"]
        console.print(Text(f"partial sweep: {done['reported']} of {done['planned']} planned configurations reported; "
                           f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
                           "(lab.merge --partial accepts it)", style="bold red"), soft_wrap=True)
    elif done.get("unplanned"):
        console.print(f"no plan.json in {', '.join(done['unplanned'])}: whether the sweep is whole is not known",
                      style="yellow", highlight=False)


def write_junit(merged: dict, path: Path) -> None:
    """One testcase per configuration (classname = engine, name = model)."""
    by = merged["summary"]["by_status"]
    suite = ET.Element("testsuite", name="ring-lab-sweep", tests=str(merged["summary"]["configs"]),
                       failures=str(by["fail"]), errors=str(by["error"]), skipped=str(by["skip"]))
    for row in merged["rows"]:
        for engine, cell in merged["cells"][row["model"]].items():
            case = ET.SubElement(suite, "testcase", classname=f"ringlab.sweep.{engine}", name=row["model"])
            bad = "\n".join(f"{n['status']} {n['id']}: {n['reason']}" for n in cell["nonpass"]
                            if n["status"] in ("fail", "error"))
            if cell["status"] in ("fail", "error"):
                tag = "failure" if cell["status"] == "fail" else "error"
                ET.SubElement(case, tag, message=f"{cell_text(cell)}").text = f"{bad}\nreproduce: {cell['repro']}"
            elif cell["status"] == "skip":
                ET.SubElement(case, "skipped", message=cell["skip"] or "skip")
            if cell["deviations"] or cell["retry"]:
                extra = [f"deviations: {', '.join(cell['deviations'])}"] if cell["deviations"] else []
                extra += [f"retried as -cpu {cell['retry']['cpu']}: {cell['retry']['why']}"] if cell["retry"] else []
                ET.SubElement(case, "system-out").text = "\n".join(extra)
    ET.indent(suite)
    report_mod._atomic_write(path, ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n")


def write_outputs(merged: dict, out_dir: Path) -> list[Path]:
    from .sweep_html import write_html

    paths = [out_dir / n for n in MERGED_NAMES]
    report_mod.write_json(merged, paths[0])
    write_junit(merged, paths[1])
    write_html(merged, paths[2])
    return paths


def merge_main(folders: list[Path], out: Path, console: Console, partial_ok: bool = False) -> int:
    merged = merge(folders)
    out.mkdir(exist_ok=True)
    paths = write_outputs(merged, out)  # first: the files do not depend on the terminal
    render(merged, console)
    for p in paths:
        console.print(f"merged: {p}", highlight=False)
    return exit_status(merged, partial_ok)


def check_merge_input(folders: list[str], out: str | None) -> tuple[list[Path], Path]:
    if not folders:
        raise ConfigError("lab.merge needs at least one --dir FOLDER (a sweep folder)")
    paths = [Path(f) for f in folders]
    for p in paths:
        if not p.is_dir():
            raise ConfigError(f"--dir {p}: not a folder")
        if not report_files([p]):
            raise ConfigError(f"--dir {p}: holds no sweep reports (<accel>__<cpu>.json)")
    target = Path(out) if out else paths[0]
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target}: exists and is not a folder")
    if not target.exists() and not target.parent.is_dir():
        raise ConfigError(f"--out {target}: the folder {target.parent} does not exist")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise ConfigError(f"--out {target}: not writable")
    return paths, target
