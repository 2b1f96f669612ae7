"""The differential view: where engines (QEMU's TCG and KVM, Bochs) disagree on a check.

Three independent x86 implementations run the same kernel; where their verdicts on the
same check differ, at least one of them deviates from the architecture. Each engine's
expectation is derived from its own CPU model, so a disagreement is a difference of
verdict. Every disagreement is accounted for: on each side that did not pass, either a
named deviation (`xfail`, lab/deviations.py, with the value it showed as evidence) or a
failure. Values can differ where every engine passes (the vendor, the hypervisor bit, the
signature at leaf 0x40000000): those are listed too, each side with why it shows what it
shows, read from its own check and its configuration's other CPUID checks. Exit counts,
which the plan only requires to be at least one, are listed side by side.
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
VALUES = ("cpuid-vendor", "cpuid-hv-bit", "cpuid-hv-signature")  # what each engine tells its guests


def _engines(report: dict) -> list[str]:
    return list(dict.fromkeys(r["config"] for r in report["runs"]))


def build(report: dict) -> dict:
    """{"configs", "disagreements": [...], "counts": [...]} for a report of two or more boots."""
    configs = _engines(report)
    by_id: dict[str, dict[str, dict]] = {}
    for c in report["checks"]:
        if c["config"] in configs:
            by_id.setdefault(c["id"], {})[c["config"]] = c
    disagreements, counts, differing = [], [], []
    for cid, per in by_id.items():
        ran = {cfg: c for cfg, c in per.items() if c["status"] != "skip"}
        if len(ran) < 2:
            continue
        if next(iter(ran.values()))["probe"] in VALUES and len({c["observed"] for c in ran.values()}) > 1:
            differing.append({"id": cid, "sides": {cfg: {"observed": show(c["observed"]), "status": c["status"],
                                                      "why": _why_value(c, by_id, cfg)}
                                                for cfg, c in ran.items()}})
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
    return {"configs": configs, "disagreements": disagreements, "counts": counts, "values": differing}


def _why_value(check: dict, by_id: dict[str, dict[str, dict]], config: str) -> str:
    """Why one engine's CPUID value is what it is, from the check (its expected value and
    verdict) and its configuration's hypervisor bit. A value the rule did not expect says so."""
    from .answers import KNOWN_SIGNATURES, ZEROS

    observed, expected, probe = check["observed"], check["expected"], check["probe"]
    scope = check.get("scope") or check["id"].split(".")[0]
    if check["status"] not in ("pass", "xpass"):
        return f"{check['status']}: the rule expects {expected} ({check['reason']})"
    guest = scope != "host"
    if probe == "cpuid-vendor":
        return "the guest's host passes the CPU's vendor through" if guest else             "the CPU model's own vendor (SDM Vol. 2A CPUID leaf 0), as its rule expects"
    if probe == "cpuid-hv-bit":
        if guest:
            return "set by the lab's host for its guest" if observed == "1" else "the lab's host leaves it clear here"
        return ("the engine sets CPUID.1:ECX[31]: its guest (the lab's kernel) can tell it is virtual" if observed == "1"
                else "the engine leaves CPUID.1:ECX[31] clear: nothing tells the lab's kernel it is virtual "
                     "(APM Vol. 3 E.3.2)")
    # cpuid-hv-signature: APM Vol. 3 App. E; out of range: SDM Vol. 2A CPUID
    if guest:
        return "the lab's host answers leaf 0x40000000 itself (--hv-signature)" if observed not in KNOWN_SIGNATURES \
            else "the guest's CPUID reaches the engine: its own signature"
    if observed in KNOWN_SIGNATURES:
        return f"{KNOWN_SIGNATURES[observed]} names itself at leaf 0x40000000 (APM Vol. 3 App. E)"
    bit = by_id.get(f"{scope}.cpuid-hv-bit", {}).get(config)
    vendor = by_id.get(f"{scope}.cpuid-vendor.leaf0", {}).get(config)
    if bit is not None and bit["observed"] == "0":
        # Out of range: Intel returns the highest basic leaf's data (SDM Vol. 2A CPUID), AMD zeros
        # (APM Vol. 3 CPUID); lab/expectations.py Facts.amd_cpuid_semantics.
        amd = vendor is not None and vendor["observed"] in ("AuthenticAMD", "AMDisbetter!", "HygonGenuine")
        if observed == ZEROS:
            return ("not a signature: no hypervisor bit; zeros, as AMD answers a leaf out of range (APM Vol. 3 CPUID)"
                    if amd else "not a signature: no hypervisor bit; zeros: the engine answers the range itself "
                                "and names nobody")
        if not amd:
            return ("not a signature: no hypervisor bit, and leaf 0x40000000 is out of range: the highest basic "
                    "leaf's data, as on Intel (SDM Vol. 2A CPUID)")
        return "not a signature: no hypervisor bit; the engine's own bytes there"
    return "zeros: the hypervisor does not name itself" if observed == ZEROS else "the hypervisor's own bytes"


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
    if diff.get("values"):
        out(console, Text(f"{len(diff['values'])} value(s) that differ between engines (each side: why it shows "
                          "what it shows)", style="bold"))
        for v in diff["values"]:
            _block(console, diff["configs"], short, v["id"],
                   [Text(f"{side['observed']}: {side['why']}", style="green" if side["status"] == "pass" else "bold red")
                    if (side := v["sides"].get(cfg)) else Text("- not run", style="dim") for cfg in diff["configs"]])
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
