"""The Popek-Goldberg table of x86 (`--view popek-goldberg`): one row per instruction Robin and
Irvine (USENIX Security 2000) found sensitive but unprivileged, beside their classification,
with this run's verdict per configuration and guest host, UMIP clear / set, and what follows.

Every cell is a judged check of the `popek-goldberg` family (lab/catalogue.py PG_INSNS): the
verdict the guest and its host observed, with the judge's mark (✓ the rule's verdict, ✗ not,
~ a named deviation, - not run); the conclusion reads the observed verdicts, never the rules.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .catalogue import PG_FAMILY, PG_INSNS
from .console import out

HOSTS = {"guest-soft": "software host (CPL1)", "guest-svm": "SVM guest (CPL0)", "guest-vmx": "VMX guest (CPL0)"}
_MARK = {"pass": "✓", "fail": "✗", "error": "!", "xfail": "~", "xpass": "X", "skip": "-"}
_STYLE = {"pass": "", "fail": "bold red", "error": "bold red", "xfail": "yellow", "xpass": "yellow", "skip": "dim"}


def pg_checks(report: dict) -> dict[tuple[str, str], dict[tuple[str, str], dict]]:
    """(config, scope) -> (instruction, umip) -> check, for the family's checks of the report."""
    names = {f"pg-{n}" for n, *_ in PG_INSNS}
    out: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
    for c in report["checks"]:
        if c["probe"] in names:
            out.setdefault((c["config"], c["scope"]), {})[(c["probe"][3:], c["params"].get("umip", "0"))] = c
    return out


def _ran(checks: dict[tuple[str, str], dict]) -> bool:
    return any(c["status"] != "skip" or c.get("cause") == "deviation" for c in checks.values())


def columns(report: dict) -> list[tuple[str, str]]:
    """The (config, scope) columns where the family ran (a host the setup did not run is left out)."""
    return [k for k, v in pg_checks(report).items() if _ran(v)]


def _cell(c: dict | None) -> Text:
    if c is None:
        return Text("")
    st = c["status"]
    if st == "skip":
        return Text("-", style=_STYLE["skip"])
    return Text(f"{c['observed'] or '?'}{_MARK[st]}", style=_STYLE[st])


def conclusion(scope: str, checks: dict[tuple[str, str], dict]) -> str:
    """Virtualizable by trap-and-emulate, from the observed verdicts of one host."""
    def leaking(umip: str) -> list[str]:
        return [n for n, *_ in PG_INSNS if (c := checks.get((n, umip))) and c["status"] != "skip"
                and c["observed"] in ("leaks", "wrong")]

    def unrun(umip: str) -> list[str]:
        return [n for n, *_ in PG_INSNS if (c := checks.get((n, umip))) is None or c["status"] == "skip"]

    parts = []
    for umip, label in (("0", "UMIP off"), ("1", "with UMIP")):
        if len(unrun(umip)) == len(PG_INSNS):
            parts.append(f"{label}: not run")
            continue
        leaks = leaking(umip)
        how = "none leaks" if scope == "guest-soft" else "none leaks, each runs on the guest's own state"
        text = (f"{label}: no, {len(leaks)} leak ({', '.join(i.upper() for i in leaks)})" if leaks
                else f"{label}: yes, {how}")
        if unrun(umip):
            text += f"; not run: {', '.join(i.upper() for i in unrun(umip))}"
        parts.append(text)
    return f"{HOSTS.get(scope, scope)}: virtualizable by trap-and-emulate? " + "; ".join(parts)


def render(report: dict, console: Console, short: dict[str, str] | None = None) -> None:
    """The table, then one conclusion line per column; a run without the family says so."""
    checks = pg_checks(report)
    cols = columns(report)
    if not cols:
        out(console, "popek-goldberg: no guest ran the family in this run (a guest host runs it: "
                      "--host-mode soft, svm or vmx)", highlight=False)
        return
    short = short or {}
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left",
              title="Popek-Goldberg on x86: each cell is the verdict with UMIP off / on and its mark")
    t.add_column("insn")
    t.add_column("Robin & Irvine 2000")
    for config, scope in cols:
        t.add_column(f"{short.get(config, config)}\n{HOSTS.get(scope, scope)}")
    for name, group, *_ in PG_INSNS:
        row = [name.upper(), f"{group}, not privileged"]
        for col in cols:
            cell = _cell(checks[col].get((name, "0")))
            cell.append(" / ")
            cell.append_text(_cell(checks[col].get((name, "1"))))
            row.append(cell)
        t.add_row(*row)
    out(console, t)
    out(console, "traps: the host saw it and the guest saw its own view; leaks: no trap, and the guest saw "
                  "what a CPL0 kernel would not; same: no trap, the same view; wrong: a trap, yet another "
                  "view (docs/probes.md \"The Popek-Goldberg table\")", style="dim", highlight=False)
    for config, scope in cols:
        out(console, f"  {short.get(config, config)} {conclusion(scope, checks[(config, scope)])}", highlight=False)


FAMILY = PG_FAMILY
