"""What a person at a terminal sees: a header, the checks (configurations and scopes side by
side, or one scope at a time), the reasons behind every non-pass, and how to reproduce each
boot. Everything comes from the report dict (lab/report.py); nothing here judges.

Views (`--view`): `table` puts the configurations and scopes side by side, probes grouped,
and folds a column with nothing observed in it (all skips, or a boot that never reported)
into one line that says why; it is made for 100 columns. `scope` shows one configuration
and scope at a time, with the expected value next to the observed one. `wide` is every
column, nothing folded, at its natural width whatever the terminal's. `auto` (default) is
`table` when it fits the width, else `scope`. A value is never cut: a view that does not
fit wraps (folds) a cell instead. No printed line ends in blanks (rich pads table cells to
their column's width): logs and copy-paste get the text only.

`--view table` narrower than the table's natural width keeps every value and every check
label whole: its cells wrap between words (the mark, the value and `ᵍ` on lines of their
own), each column no narrower than its longest word, the columns nearest their natural
width served first. Where even that does not fit (about 82 columns for TCG and KVM side by
side), one line says how many columns the table needs and the scope view follows: a value
split across lines, or a label folded mid-id, reads as another value; `--view wide` prints
the table at its natural width anyway (for `less -S`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Span, Text

from .judge import show

STYLE = {"pass": "green", "fail": "bold red", "error": "bold red", "xfail": "yellow",
         "xpass": "magenta", "skip": "dim"}
# An xfail's mark is not a cross: without colour `x` read as a fail (issue 20).
MARK = {"pass": "✓", "fail": "✗", "error": "!", "xfail": "~", "xpass": "X", "skip": "-"}
LEGEND = "✓ pass  ✗ fail  ! error  ~ xfail (a named deviation)  X xpass  - skip  ᵍ GDB read the same"
SCOPE_TITLE = {"host": "host", "guest-svm": "guest (SVM)", "guest-vmx": "guest (VMX)", "guest-soft": "guest (soft)",
               "ring-2": "ring -2 (SMM)"}
VIEWS = ("auto", "table", "scope", "wide", "popek-goldberg")  # the last: lab/popek.py
DESIGN_WIDTH = 100  # the width the table view is made for, and the default when piped
RUN_GROUP = "run"  # the boot itself: listed last


def make_console(stderr: bool = False) -> Console:
    """A terminal's own width; COLUMNS when set (also when piped: CI logs); else 100."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=console_width(stream))


def console_width(stream) -> int | None:
    cols = os.environ.get("COLUMNS", "").strip()
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    return None if stream.isatty() else DESIGN_WIDTH


# -- printing ------------------------------------------------------------------------------
class Unpadded:
    """A renderable without the blanks at the ends of its lines: rich pads a table's cells to
    their column's width and keeps the space a wrapped line broke at; logs and copy-paste
    get the text only."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console: Console, options):
        for line in console.render_lines(self.renderable, options, pad=False):
            while line and not line[-1].control and not line[-1].text.rstrip():
                line.pop()
            if line and not line[-1].control:
                line[-1] = Segment(line[-1].text.rstrip(), line[-1].style)
            yield from line
            yield Segment.line()

    def __rich_measure__(self, console: Console, options) -> Measurement:
        return Measurement.get(console, options, self.renderable)


def out(console: Console, renderable, *, highlight: bool | None = None, soft_wrap: bool = False, **kw) -> None:
    """console.print with no blanks at the ends of lines. A soft-wrapped line (one long
    line on purpose: a command to copy) is printed as it is."""
    if soft_wrap:
        console.print(renderable, highlight=highlight, soft_wrap=True, **kw)
        return
    if isinstance(renderable, str):  # markup and highlighting as console.print reads a str
        renderable = console.render_str(renderable, highlight=highlight)
    console.print(Unpadded(renderable), **kw)


# -- the model: columns (configuration, scope) and grouped rows ----------------------------
@dataclass
class Column:
    config: str
    scope: str
    checks: dict[str, dict] = field(default_factory=dict)  # row key -> check

    @property
    def folded(self) -> bool:
        """Nothing observed in it: every check a skip, or an error without a value."""
        body = [c for k, c in self.checks.items() if k != "run.integrity"] or list(self.checks.values())
        return all(c["status"] == "skip" or (c["status"] == "error" and c["observed"] is None) for c in body)


def _row_key(check: dict) -> str:
    # The id without its scope: the same probe lines up across host and guest columns.
    return check["id"].split(".", 1)[1] if check["scope"] != "host" or check["probe"] != "run" else check["id"]


def _columns(report: dict) -> list[Column]:
    cols: dict[tuple[str, str], Column] = {}
    for c in report["checks"]:
        key = (c["config"], c["scope"])
        cols.setdefault(key, Column(*key)).checks[_row_key(c)] = c
    return list(cols.values())


def _groups(report: dict) -> list[tuple[str, list[str]]]:
    """(probe, row keys) in order of first appearance; the boot's own rows last."""
    groups: dict[str, list[str]] = {}
    for c in report["checks"]:
        keys = groups.setdefault(c["probe"], [])
        if _row_key(c) not in keys:
            keys.append(_row_key(c))
    run = groups.pop(RUN_GROUP, None)
    return list(groups.items()) + ([(RUN_GROUP, run)] if run else [])


def _short_names(columns: list[Column]) -> dict[str, str]:
    """The accelerator as a column title when each accelerator has one configuration."""
    configs = list(dict.fromkeys(c.config for c in columns))
    short = {cfg: cfg.split("/")[0] for cfg in configs}
    return short if len(set(short.values())) == len(configs) else {cfg: cfg for cfg in configs}


# -- cells ---------------------------------------------------------------------------------
def cell(check: dict, *, want: bool = False) -> Text:
    """Mark and value. `ᵍ` only where GDB read the same value as the serial record; where the
    witnesses disagree (or GDB never got there) both values are shown."""
    st = check["status"]
    w = check.get("witnesses") or {}
    serial, gdb = w.get("serial", check["observed"]), w.get("gdb")
    if st == "skip":
        return Text(MARK[st], style=STYLE[st])
    if gdb is not None and gdb != serial:
        text = Text(f"{MARK[st]} serial={_value(serial)} gdb={_value(gdb)}", style=STYLE[st])
    else:
        text = Text(f"{MARK[st]} {_value(check['observed'])}", style=STYLE[st])
        if gdb is not None:
            text.append(" ᵍ", style="cyan")
    if want and st in ("fail", "error") and check["expected"] is not None:
        text.append(f" (want {check['expected']})", style="red")
    return text


def _value(v: str | None) -> str:
    return "—" if v is None else v


# -- views ---------------------------------------------------------------------------------
def _rows(groups, has) -> list[tuple[Text | str, str | None]]:
    """(label, row key) in group order: a bold group header (key None) over indented params,
    or the bare probe name when it has no params. `has(key)`: the row has a cell to show."""
    out: list[tuple[Text | str, str | None]] = []
    for group, keys in groups:
        present = [k for k in keys if has(k)]
        if present and present != [group]:
            out.append((Text(group, style="bold"), None))
        out += [(k if k == group else "  " + k[len(group) + 1:], k) for k in present]
    return out


def _new_table(*titles: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold",
                  collapse_padding=True)
    for title in titles:
        table.add_column(title, overflow="fold")  # wrap a cell rather than cut it
    return table


def _table(columns: list[Column], groups, short: dict[str, str], *, wide: bool) -> Table:
    table = _new_table("check", *(f"{short[c.config]}\n{SCOPE_TITLE.get(c.scope, c.scope)}" for c in columns))
    has = lambda k: any(k in col.checks for col in columns)  # noqa: E731
    rows = [(k, k) for _, keys in groups for k in keys if has(k)] if wide else _rows(groups, has)
    for label, k in rows:
        cells = [cell(col.checks[k], want=wide) if k in col.checks else "" for col in columns] if k else []
        table.add_row(label, *(cells or [""] * len(columns)))
    return table


def _print_table(console: Console, table: Table, **kw) -> None:
    """Prints a table of `_new_table`: where it is pinned at widths its cells fit (no cell
    wraps: the layout is known), as lines laid out here (`_laid_out`), the same bytes as
    rich's Table prints in a fraction of the time (rich renders each of ~170 x 5 cells on its
    own: ~50 ms in a fresh process); else through rich's Table (`out`), which wraps cells."""
    text = _laid_out(console, table)
    if text is None:
        out(console, table, **kw)
    else:
        console.print(LaidOut(text), **kw)


class LaidOut:
    """Lines laid out already, none wider than the console: printed as their Text's segments
    (rich renders its styles), not wrapped again (a Text printed as such is first split into
    lines, wrapped and joined back, for nothing: ~3 ms of the table's ~9)."""

    def __init__(self, text: Text):
        self.text = text

    def __rich_console__(self, console: Console, options):
        return self.text.render(console, end="\n")


def _rich_layout(console: Console, table: Table) -> bool:
    """Whether the table is set up as `_new_table` sets it up (the layout `_laid_out` makes),
    and the console draws its box as it is (an ASCII-only console gets another box)."""
    safe = console.safe_box if table.safe_box is None else table.safe_box
    return (table.box is box.SIMPLE_HEAD and table.box.substitute(console.options, safe=safe) is box.SIMPLE_HEAD
            and table.show_header and not table.show_footer and not table.show_edge and not table.pad_edge
            and table.collapse_padding and table.padding == (0, 1, 0, 1) and not table.show_lines
            and not table.leading and table.header_style == "bold" and table.width is None and not table.expand
            and table.min_width is None and table.style in (None, "", "none")
            and not (table.title or table.caption or table.border_style or table.row_styles or table.highlight)
            and all(c.justify == "left" and c.vertical == "top"
                    and not (c.style or c.header_style or c.no_wrap or c.min_width or c.max_width or c.ratio
                             or c.highlight) for c in table.columns)
            and not any(row.style or row.end_section for row in table.rows))


def _as_text(console: Console, renderable) -> Text | None:
    """A cell as rich renders it: a str through markup (emoji codes too), never highlighted."""
    if isinstance(renderable, Text):
        return renderable
    if isinstance(renderable, str):
        return console.render_str(renderable, highlight=False) if _has_markup(renderable) else Text(renderable)
    return None


def _has_markup(text: str) -> bool:
    """Whether rich may read markup (`[`) or an emoji code (`:`) in a str."""
    return "[" in text or ":" in text


def _laid_out(console: Console, table: Table) -> Text | None:
    """The table as one Text, laid out as rich lays out a `_new_table` table whose cells fit
    its pinned widths: each cell padded to its column's width with the cell's own style (a
    Text's style runs into its padding), one blank after each column but the last, one blank
    between columns (box.SIMPLE_HEAD, no edge, collapsed padding); the header bold, its
    shorter cells aligned to the bottom under a bold blank, over the box's head rule; no
    blanks at the end of a line (`Unpadded`). Its spans break where rich's segments do, so
    a colour terminal gets the same escape codes. None where rich would do otherwise: a
    column not pinned, a cell wider than its column (rich wraps it) or with more characters
    than its column has cells (zero-width ones), a body cell of several lines, a tab, a cell
    justified on its own, a table not set up as `_new_table` does, or wider than the console."""
    if not _rich_layout(console, table):
        return None
    columns = table.columns
    widths = [c.width for c in columns]
    if not all(widths):
        return None
    pads = [1] * (len(columns) - 1) + [0]
    if sum(widths) + sum(pads) + len(columns) - 1 > console.width:
        return None
    made: dict[str, Text | None] = {}  # a str cell's Text, made once (most are empty)

    def as_text(cell) -> Text | None:
        if isinstance(cell, str):
            return made[cell] if cell in made else made.setdefault(cell, _as_text(console, cell))
        return _as_text(console, cell)

    header = [as_text(c.header) for c in columns]
    body = [[as_text(r) for r in c.cells] for c in columns]
    if any(t is None for t in header) or any(t is None for col in body for t in col):
        return None
    head_lines = [t.split("\n", allow_blank=True) if "\n" in t.plain else [t] for t in header]
    height = max(len(lines) for lines in head_lines)
    head_rows = [[None] * (height - len(lines)) + list(lines) for lines in head_lines]  # bottom-aligned
    bold = console.get_style(table.header_style)

    chunks: list[str] = []
    spans: list[Span] = []
    at = 0  # where the next line starts

    def add_line(cells, style) -> bool:
        nonlocal at
        parts: list[str] = []
        own: list[Span] = []  # the line's spans, from its start
        x = 0
        for t, width, pad in zip(cells, widths, pads):
            if t is None:  # a blank line over a shorter header cell: one segment, padding included
                own.append(Span(x, x + width + pad, style))
                parts.append(" " * (width + pad))
                x += width + pad
            else:
                plain = t.plain
                used = cell_len(plain)
                if (used > width or len(plain) > width or "\n" in plain or "\t" in plain
                        or t.justify not in (None, "left") or t.overflow not in (None, "fold")):
                    return False  # rich would wrap, fold or expand it, or pad it otherwise
                end = x + len(plain) + width - used
                if style:
                    own.append(Span(x, end, style))
                if t.style:
                    own.append(Span(x, end, t.style))
                own.extend(Span(x + s, x + e, st) for s, e, st in t.spans)
                parts.append(plain + " " * (width - used))
                x = end
                if pad:
                    if style:
                        own.append(Span(x, x + pad, style))
                    parts.append(" " * pad)
                    x += pad
            parts.append(" ")  # between columns
            x += 1
        text = "".join(parts).rstrip()  # no blanks at the end of the line; spans cut there
        kept = len(text)
        chunks.append(text)
        spans.extend(Span(at + s, at + min(e, kept), st) for s, e, st in own if s < kept)
        at += kept + 1  # and its newline
        return True

    for cells in zip(*head_rows):
        if not add_line(cells, bold):
            return None
    rule = box.SIMPLE_HEAD.get_row([w + p for w, p in zip(widths, pads)], "head", edge=False)
    chunks.append(rule)
    at += len(rule) + 1
    for cells in zip(*body):
        if not add_line(cells, None):
            return None
    return Text("\n".join(chunks), spans=spans)


def _scope_tables(columns: list[Column], groups) -> list[tuple[Column, Table]]:
    out = []
    for col in columns:
        table = _new_table("check", "observed", "expected")
        for label, k in _rows(groups, lambda k, col=col: k in col.checks):
            c = col.checks.get(k) if k else None
            if c is None:
                table.add_row(label, "", "")
            else:
                table.add_row(label, cell(c), "" if c["status"] == "skip" else _value(c["expected"]))
        out.append((col, table))
    return out


def _split_skipped_rows(groups, columns: list[Column]):
    """(groups without the rows that are a skip in every column that has them, those rows
    by group): a row of dashes says nothing the reasons below do not."""
    kept, hidden = [], {}
    for group, keys in groups:
        cells = {k: [col.checks[k] for col in columns if k in col.checks] for k in keys}
        skipped = [k for k, cs in cells.items() if cs and all(c["status"] == "skip" for c in cs)]
        kept.append((group, [k for k in keys if k not in skipped]))
        if skipped:
            hidden[group] = skipped
    return kept, hidden


def _plain(console: Console, renderable) -> str:
    """A cell's text (a str or a Text) as rich reads it."""
    if isinstance(renderable, str) and not _has_markup(renderable):
        return renderable  # most cells: no Text to make
    return _as_text(console, renderable).plain


def _line_width(console: Console, renderable) -> int:
    """The widest line of a cell, in terminal cells, as rich measures it."""
    return max((cell_len(line) for line in _plain(console, renderable).splitlines()), default=0)


def _word_width(console: Console, renderable) -> int:
    """The widest word of a cell: the narrowest it wraps to with no word broken (rich keeps a
    line's leading blanks with its first word: a row label's indent counts)."""
    return max((cell_len(word.rstrip()) for line in _plain(console, renderable).splitlines()
                for word in re.findall(r"\s*\S+\s*", line)), default=0)


def _pin_natural_widths(console: Console, table: Table) -> int:
    """Fixes every column at its natural width (its widest cell) and returns the table's
    width: rich then measures no cell again (measuring ~170 rows costs tens of ms, this
    under one). The output is the same as with rich's own measurement as long as the
    table fits; `_unpin` before printing one that does not (rich wraps its cells then)."""
    for column in table.columns:
        column.width = max(_line_width(console, c) for c in (column.header, *column.cells))
    return console.measure(table, options=console.options.update_width(10_000)).maximum


def _unpin(table: Table) -> None:
    for column in table.columns:
        column.width = None


def _fits(console: Console, table: Table) -> bool:
    """Whether the table fits the console at its natural width; if so it stays pinned there."""
    if _pin_natural_widths(console, table) <= console.width:
        return True
    _unpin(table)
    return False


def _wrap_to_fit(console: Console, table: Table) -> int:
    """For a table wider than the console at its natural widths: the least width it needs
    with every word whole (each column as wide as its longest word). When that fits, pins
    the columns there: the columns nearest their natural width get it first, the rest share
    what is left, and their cells wrap between words (mark, value, ᵍ), never inside one."""
    total = _pin_natural_widths(console, table)
    natural = [c.width for c in table.columns]
    overhead = total - sum(natural)  # padding and separators
    least = [max(_word_width(console, cell) for cell in (c.header, *c.cells)) for c in table.columns]
    spare = console.width - overhead - sum(least)
    if spare < 0:
        _unpin(table)
        return overhead + sum(least)
    widths = list(least)
    for i in sorted(range(len(widths)), key=lambda i: natural[i] - least[i]):
        grow = min(spare, natural[i] - least[i])
        widths[i] += grow
        spare -= grow
    for column, width in zip(table.columns, widths):
        column.width = width
    return overhead + sum(widths)


def fit(console: Console, table: Table) -> bool:
    """Pins a table's columns so that it fits the console with every word whole: at their
    natural widths, else wrapped between words (`_wrap_to_fit`). False, with nothing
    pinned, where it cannot (rich then folds its cells as a last resort)."""
    return _fits(console, table) or _wrap_to_fit(console, table) <= console.width


def _in_fold_line(col: Column, key: str, dead: set[str]) -> bool:
    """Whether a folded column's check is counted on its configuration's fold line: all of
    them but a live boot's run.integrity (a dead boot's is one of its errors)."""
    return key != "run.integrity" or col.config in dead


DIED = "the boot died (its cause below)"


def _fold_lines(folded: list[Column], short: dict[str, str], dead: set[str]) -> list[tuple[str, Text]]:
    """One line per configuration for its folded columns: each reason once, with the scopes
    and the number of checks it covers. A dead boot's errors (run.integrity and every check
    it never observed) are one count that points at the boot's own line, which gives the
    cause: the counts add up to the summary's."""
    worse = ("skip", "xfail", "xpass", "fail", "error")
    per_config: dict[str, dict[tuple[str, str], list]] = {}
    for col in folded:
        for k, c in col.checks.items():
            if not _in_fold_line(col, k, dead):
                continue  # the boot line says how the boot ended
            reason = c["reason"]
            if col.config in dead:  # the boot's cause is what matters; skips only counted
                reason = DIED if c["status"] == "error" else ""
            entry = per_config.setdefault(col.config, {}).setdefault((c["status"], reason), [[], 0, 0])
            if col not in entry[0]:
                entry[0].append(col)
            entry[1] += 1
            entry[2] += k == "run.integrity"
    lines = []
    for config, reasons in per_config.items():
        parts = []
        for (status, reason), (cols, n, integrity) in reasons.items():
            scopes = " + ".join(SCOPE_TITLE.get(c.scope, c.scope) for c in cols)
            what = "skipped" if status == "skip" else status + ("s" if n > 1 and status in ("error", "fail") else "")
            if reason == DIED:
                unseen = n - integrity
                reason += ": " + " and ".join(["run.integrity"] * integrity + [
                    f"{unseen} check{'s' if unseen > 1 else ''} with no observation"] * (unseen > 0))
            parts.append(f"{scopes}: {n} {what}, {reason}" if reason else f"{n} {what} in {scopes.replace(' + ', ', ')}")
        status = max((st for st, _ in reasons), key=worse.index)
        lines.append((f"  {status}", Text(f"{short[config]} columns not shown: " + "; ".join(parts),
                                          style=STYLE[status])))
    return lines


def render(report: dict, console: Console | None = None, view: str = "auto") -> None:
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: choose one of {', '.join(VIEWS)}")
    console = console or make_console()
    h = report["host"]
    kvm = h["kvm_module"] or "none"
    kvm_note = "" if h["kvm_usable"] else f" (unusable: {h['kvm_reason']})"
    only = f"  only: {','.join(report['only'])}" if report.get("only") else ""
    engines = {r.get("accel") for r in report["runs"]}
    qemu = "" if engines == {"bochs"} else f"  QEMU {h['qemu']}  KVM module: {kvm}{kvm_note}"
    bochs = f"  Bochs {h['bochs']}" if h.get("bochs") else ""
    out(console, f"[bold]ring-lab {report['lab_version']}[/]{qemu}{bochs}"
                  f"  witness: {report.get('witness', 'both')}{only}", highlight=False)

    columns = _columns(report)
    groups = _groups(report)
    short = _short_names(columns)
    configs = list(dict.fromkeys(c.config for c in columns))
    # What each column title stands for, where the title is shorter than the configuration.
    out(console, "columns: " + "; ".join(f"{short[c]} = {c}" if short[c] != c else c for c in configs),
                  highlight=False)
    if view == "popek-goldberg":        # the family's table instead of every check (lab/popek.py)
        from . import popek
        popek.render(report, console, short)
        _print_summary(report, console)
        return
    _answers(report, console, short)

    folded = [] if view == "wide" else [c for c in columns if c.folded]
    shown = [c for c in columns if c not in folded]
    hidden: dict[str, list[str]] = {}  # group -> rows skipped in every shown column
    if view != "wide":
        groups, hidden = _split_skipped_rows(groups, shown)
    if shown:  # the symbols appear in the table or the scope view; ᵍ only where GDB witnessed
        legend = LEGEND if report.get("witness", "both") != "serial" else LEGEND.rsplit("  ᵍ", 1)[0]
        out(console, Text(legend, style="dim"), highlight=False)
    if view == "wide":
        table = _table(shown, groups, short, wide=True)
        # Its natural width even past the terminal's (for `less -S` or a wide window).
        width, console.width = console.width, max(console.width, _pin_natural_widths(console, table))
        try:
            _print_table(console, table, crop=False)
        finally:
            console.width = width
    elif shown:
        table = None if view == "scope" else _table(shown, groups, short, wide=False)
        fits = table is not None and _fits(console, table)
        if table is not None and not fits and view == "table":
            need = _wrap_to_fit(console, table)
            fits = need <= console.width
            if not fits:
                out(console, Text(f"--view table needs {need} columns, {console.width} here: one table per scope "
                                  "instead", style="yellow"))
        if fits:
            _print_table(console, table)
        else:
            for col, t in _scope_tables(shown, groups):
                out(console, Text(f"{short[col.config]} {SCOPE_TITLE.get(col.scope, col.scope)}", style="bold"))
                _fits(console, t)  # pinned where it fits
                out(console, t)
    dead = {r["config"] for r in report["runs"] if r.get("exit") != "ok"}
    notes = _fold_lines(folded, short, dead)
    if hidden:
        rows = ", ".join(f"{g} {len(keys)}" for g, keys in hidden.items())
        notes.append(("  skip", Text(f"rows not shown, skipped in every column (why: below): {rows}",
                                     style=STYLE["skip"])))
    _print_notes(console, notes)

    _why_not_pass(report, console, skip_columns=folded, short=short, dead=dead)
    _boots(report, console)
    _print_summary(report, console)


def _print_summary(report: dict, console: Console) -> None:
    s = report["summary"]
    line = "  ".join(f"{k}={v}" for k, v in s.items())
    causes = skip_causes(report)
    if causes:  # skips the CPU model explains apart from the rest (lab/judge.py SKIP_CAUSES)
        line += " (" + ", ".join(f"{n} {cause}" for cause, n in causes.items()) + ")"
    bad = s["fail"] + s["error"]
    out(console, f"[{'bold red' if bad else 'bold green'}]{line}[/]")


def skip_causes(report: dict) -> dict[str, int]:
    """Skips by what they follow from (a check's `cause`; "other" where it has none)."""
    counts: dict[str, int] = {}
    for c in report["checks"]:
        if c["status"] == "skip":
            cause = c.get("cause") or "other"
            counts[cause] = counts.get(cause, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _answers(report: dict, console: Console, short: dict[str, str]) -> None:
    """The lab's three questions answered from this run's checks, per configuration (lab/answers.py)."""
    from .answers import answers

    found = answers(report)
    silent = [short.get(a.config, a.config) for a in found if not a.lines]
    found = [a for a in found if a.lines]
    if silent:
        out(console, Text(f"{', '.join(silent)}: no answers, nothing observed (why: below)", style="dim"),
            highlight=False)
    if not found:
        return
    out(console, "[bold]Answers[/] from this run's checks (\\[the judge's verdict]; the rows are in the table)",
        highlight=False)
    names = {a.config: short.get(a.config, a.config) for a in found}
    long_names = max(cell_len(n) for n in names.values()) > 8  # each on a line of its own, answers under it
    indent = 2 if long_names else max(cell_len(n) for n in names.values()) + 1
    lines = Text()
    for a in found:
        if long_names:
            lines.append(names[a.config] + "\n", style="bold")
        for i, (status, text) in enumerate(a.lines):
            key = names[a.config] if i == 0 and not long_names else ""
            # A hanging indent, wrapped between words here: cheaper than a rich grid (render cost).
            for j, part in enumerate(Text(text, style=STYLE[status]).wrap(console, max(20, console.width - indent))):
                lead = key if j == 0 else ""
                lines.append(lead, style="bold")
                lines.append(" " * (indent - cell_len(lead)))
                part.rstrip()
                lines.append_text(part)
                lines.append("\n")
    lines.rstrip()
    console.print(LaidOut(lines))


def _why_not_pass(report: dict, console: Console, *, skip_columns: list[Column], short: dict[str, str],
                  dead: set[str]) -> None:
    """One line per (configuration, status, reason), naming one sample check and how many
    more share it: every non-pass the fold lines do not count, so that the two add up to
    the summary (a dead boot's `run.integrity` included)."""
    hidden = {id(c) for col in skip_columns for k, c in col.checks.items() if _in_fold_line(col, k, dead)}
    entries: dict[tuple[str, str, str], list[dict]] = {}
    for c in report["checks"]:
        if c["status"] == "pass" or id(c) in hidden:
            continue
        entries.setdefault((c["config"], c["status"], c["reason"]), []).append(c)
    if not entries:
        return
    sampled = any(len(v) > 1 for v in entries.values())
    out(console, "[bold]Why not pass[/]" + (" (one sample check per configuration and reason; +N: more)"
                                             if sampled else ""))
    notes = []
    for (config, status, reason), checks in entries.items():
        more = f" +{len(checks) - 1}" if len(checks) > 1 else ""
        name = short.get(config, config)
        notes.append((f"  {status}", Text(f"{name} {checks[0]['id']}{more}: {reason}", style=STYLE[status])))
    _print_notes(console, notes)


def _print_notes(console: Console, notes: list[tuple[str, Text]], key_style: bool = True) -> None:
    """Lines that wrap under their own text (a hanging indent), never cut."""
    if not notes:
        return
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for key, text in notes:
        grid.add_row(Text(key, style=text.style if key_style else "bold"), text)
    # Each column at the width rich would give it, without its measuring every line.
    key_width = max(cell_len(key) for key, _ in notes)
    room = console.width - key_width - 1
    if room > 0:
        grid.columns[0].width = key_width
        grid.columns[1].width = min(room, max(_line_width(console, text) for _, text in notes))
    out(console, grid)


def _boots(report: dict, console: Console) -> None:
    for r in report["runs"]:
        out(console, f"[bold]{r['config']}[/] exit={r['exit']} wall={r['wall_s']} s", highlight=False)
        if r["exit"] != "ok":  # a dead boot: the cause and the last thing it said, one line
            last = last_serial_line(r)
            out(console, Text(f"  cause: {r['exit_detail']}; last serial line: {last if last is not None else '(none)'}",
                               style="red"), soft_wrap=True)
        out(console, Text(f"  log: {r['log']}"), soft_wrap=True)
        saw = _gdb_saw(report, r["config"])
        if saw:
            out(console, Text(f"  GDB saw: {saw}"), soft_wrap=True)
        for line in _cost_lines(r.get("costs", {})):
            out(console, f"  {line}")
        if r["repro"]:
            out(console, f"  reproduce: {r['repro']}", soft_wrap=True, highlight=False)


def _gdb_saw(report: dict, config: str) -> str:
    """What the GDB witness saw of this boot's checks (each check's `gdb.saw`), counted, with
    the links it could not see where the accelerator kept it from the instruction."""
    counts: dict[str, int] = {}
    missing = ""
    for c in report["checks"]:
        details = c.get("details") or {}
        if c.get("config") == config and "gdb.saw" in details:
            counts[details["gdb.saw"]] = counts.get(details["gdb.saw"], 0) + 1
            missing = missing or details.get("gdb.missing", "")
    text = ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if text and missing:  # "kvm_pvm: no stop at the instruction: ...": its first two clauses
        return f"{text} ({': '.join(missing.split(': ')[:2])}; report.json `gdb.missing` lists the links)"
    return text


def last_serial_line(run: dict) -> str | None:
    """The boot's last non-empty console line (from its serial.log), printable."""
    try:
        data = Path(run["log"]).read_bytes()
    except (OSError, KeyError, TypeError):
        return None
    lines = [line for line in data.decode("latin-1").splitlines() if line.strip()]
    return show(lines[-1])[:200] if lines else None


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

