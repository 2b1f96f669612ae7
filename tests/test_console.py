"""The console report: fed report dicts (no boot), rendered at 80, 100 and 120 columns."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys

import pytest
from rich.console import Console
from rich.text import Span

from lab import console as con
from lab.cli import RunOptions, run_lab
from lab.config import ConfigError
from lab.expectations import AT_LEAST_ONCE, Facts, plan
from lab.judge import Check, judge_one
from lab.report import build

WIDTHS = (80, 100, 120)
TCG = "tcg/microvm/qemu64,+svm"
KVM = "kvm/microvm/qemu64"


def _facts(accel: str) -> Facts:
    return Facts(accel=accel, kvm_module="kvm_pvm" if accel == "kvm" else None,
                 vendor="AuthenticAMD" if accel == "tcg" else "GenuineIntel", rdtscp=False,
                 svm=accel == "tcg", hypervisor=True)


def _checks(accel: str, config: str, *, observe=None, gdb=None) -> list[Check]:
    """Every planned check of a configuration, judged as the lab would: serial reports the
    expected value unless `observe` says otherwise; GDB reads what `gdb` returns."""
    facts = _facts(accel)
    out = []
    for exp in plan(facts):
        serial = "3" if exp.expected == AT_LEAST_ONCE else exp.expected
        if observe is not None:
            serial = observe(exp, serial)
        reading = gdb(exp, serial) if gdb is not None else serial if exp.scope == "host" else None
        out.append(judge_one(exp, facts, serial, reading, config=config))
    out.append(Check("run.integrity", accel, "host", "run", {}, "complete", "complete", "pass", config=config))
    return out


def _run(config: str, log, exit_: str = "ok", detail: str = "isa-debug-exit 0") -> dict:
    accel = config.split("/")[0]
    return {"accel": accel, "config": config, "exit": exit_, "exit_detail": detail, "wall_s": 0.1,
            "log": str(log), "repro": f"qemu-system-x86_64 -accel {accel} -serial stdio", "costs": {}}


def _report(checks: list[Check], runs: list[dict], **top) -> dict:
    host = {"qemu": "7.2.0", "kvm_module": "kvm_pvm", "kvm_usable": True, "kvm_reason": ""}
    return build("0.1.0", host, runs, checks) | top


@pytest.fixture
def full(tmp_path) -> dict:
    """TCG (host + SVM guest) and KVM (host + software guest), as on this project's machines."""
    return _report(_checks("tcg", TCG) + _checks("kvm", KVM),
                   [_run(TCG, tmp_path / "t.log"), _run(KVM, tmp_path / "k.log")])


def render(report: dict, width: int, view: str = "auto") -> str:
    out = io.StringIO()
    con.render(report, Console(file=out, width=width), view=view)
    return out.getvalue()


def table_part(text: str) -> list[str]:
    """The lines from the table's header on: the header, the columns line and the answers
    (lab/answers.py) come before it, ended by the legend."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(con.LEGEND.split("  ")[0]))
    return ["", ""] + lines[at + 1:]  # the table's header on lines 2.. as before the answers came


def values_intact(text: str, report: dict) -> list[str]:
    """Observed values of non-skipped checks that do not appear whole in the output."""
    missing = []
    for c in report["checks"]:
        if c["status"] != "skip" and c["observed"] is not None and c["observed"] not in text:
            missing.append(f"{c['id']}={c['observed']}")
    return missing + (["ellipsis"] if "…" in text else [])


def _long_lines(text: str, width: int) -> list[str]:
    # `reproduce:`, `log:` and `last serial line:` are single lines on purpose (copy-paste).
    keep = ("  reproduce:", "  log:", "  last serial line:")
    return [line for line in text.splitlines() if len(line) > width and not line.startswith(keep)]


def test_checker_catches_a_cut_value(full):
    """Negative control for values_intact: an ellipsized value is reported."""
    text = render(full, 120).replace("AuthenticAMD", "AuthenticA…")
    assert values_intact(text, full)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("view", ["auto", "scope"])
def test_no_value_cut_and_lines_fit(full, width, view):
    text = render(full, width, view)
    assert values_intact(text, full) == []
    assert _long_lines(text, width) == []


@pytest.mark.parametrize("width", (60, *WIDTHS))
@pytest.mark.parametrize("view", con.VIEWS)
def test_no_line_ends_in_spaces(full, tmp_path, width, view):
    """Tables are printed without rich's padding at the ends of lines, wrapped text without
    the space it broke at: logs and copy-paste get the text only."""
    for rep in (full, _dead(tmp_path, lambda exp, serial: None)):
        padded = [line for line in render(rep, width, view).splitlines() if line != line.rstrip()]
        assert padded == []


def test_no_trailing_spaces_with_colours_either(full):
    """The same through a terminal's escape codes: no blank run before a line's end."""
    out = io.StringIO()
    con.render(full, Console(file=out, width=100, force_terminal=True, color_system="truecolor"))
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())
    assert "✓" in plain and [line for line in plain.splitlines() if line != line.rstrip()] == []


@pytest.mark.parametrize("width", WIDTHS)
def test_wide_view_is_every_column_at_its_natural_width(full, width):
    text = render(full, width, "wide")
    assert values_intact(text, full) == []
    header = "\n".join(table_part(text)[2:5])
    assert header.count("guest (soft)") == 2 and header.count("guest (SVM)") == 2  # nothing folded
    assert "cpl-enter.cpl1.iretq" in text  # full ids, one row each


@pytest.mark.parametrize("width", (100, 120))
def test_table_view_fits_100_columns(full, width):
    text = render(full, width)
    assert "observed" not in table_part(text)[3]  # the side-by-side table, not the scope view
    table_lines = "\n".join(table_part(text)).split("not shown")[0].splitlines()[:-1]
    assert max(len(line.rstrip()) for line in table_lines) <= 100


def labels_intact(text: str, report: dict) -> list[str]:
    """Row labels (a check id without its group) that do not appear whole in the output."""
    words = set(text.split())
    return sorted({k for c in report["checks"] if c["status"] != "skip"
                   for k in [con._row_key(c).removeprefix(c["probe"] + ".")] if k not in words})


@pytest.mark.parametrize("width", (60, 80, 90, 100))
def test_forced_table_view_never_splits_a_value_or_a_label(full, width):
    """--view table narrower than the table: cells wrap between words (mark, value, ᵍ), never
    inside one; where even that cannot fit, one line says so and the scope view follows."""
    text = render(full, width, "table")
    assert values_intact(text, full) == [] and labels_intact(text, full) == []
    assert _long_lines(text, width) == []
    note = [line for line in text.splitlines() if "--view table needs" in line]
    if "observed" in text:  # fell back to one table per scope
        assert len(note) == 1 and "one table per scope" in note[0]
    else:
        assert note == []


def test_forced_table_wraps_cells_where_the_table_can_fit(full):
    """A value widens the table past 100 columns: --view table stays a table, its cells
    wrapped between words; only a column's own longest word sets how narrow it may get."""
    wide_cell = next(c for c in full["checks"] if c["id"] == "host.cpuid-vendor.leaf0" and c["config"] == TCG)
    wide_cell["observed"] = "AuthenticAMD-and-then-some"
    text = render(full, 100, "table")
    assert "observed" not in text and "--view table needs" not in text
    assert values_intact(text, full) == [] and labels_intact(text, full) == []
    assert _long_lines(text, 100) == []


def test_label_checker_control_a_split_label_is_reported(full):
    text = render(full, 100).replace("cpl1.ring-compression", "cpl1.ring-com\npression")
    assert labels_intact(text, full) == ["cpl1.ring-compression"]


def test_auto_falls_back_to_scope_view_when_the_table_does_not_fit(full):
    wide_cell = next(c for c in full["checks"] if c["id"] == "host.cpuid-vendor.leaf0" and c["config"] == TCG)
    wide_cell["observed"] = "AuthenticAMD-and-then-some"  # widens the table past 100, not a scope
    assert con._fits(Console(file=io.StringIO(), width=100), con._table(
        con._columns(full), con._groups(full), con._short_names(con._columns(full)), wide=False)) is False
    text = render(full, 100)
    assert f"{TCG.split('/')[0]} host\n" in text and "expected" in text  # per-scope tables
    assert values_intact(text, full) == []


def test_all_skip_columns_fold_into_one_line_that_says_why(full):
    text = render(full, 100)
    header = " ".join(table_part(text)[2:4])
    assert header.count("guest (soft)") == 1 and header.count("guest (SVM)") == 1
    soft = next(c for c in full["checks"] if c["config"] == TCG and c["scope"] == "guest-soft")
    svm = next(c for c in full["checks"] if c["config"] == KVM and c["scope"] == "guest-svm")
    flat = " ".join(text.split())  # the lines wrap under their own text
    assert flat.count(soft["reason"]) == 1
    tcg_line = flat.split("tcg columns not shown: ")[1].split(" kvm columns not shown: ")[0]
    n_soft = sum(c["config"] == TCG and c["scope"] == "guest-soft" for c in full["checks"])
    n_svm = sum(c["config"] == KVM and c["scope"] == "guest-svm" for c in full["checks"])
    assert f"guest (soft): {n_soft} skipped, " + soft["reason"] in tcg_line
    assert f"kvm columns not shown: guest (SVM): {n_svm} skipped, " + svm["reason"] in flat


def test_a_column_with_one_observed_value_is_not_folded(tmp_path):
    checks = _checks("tcg", TCG)
    soft = next(c for c in checks if c.scope == "guest-soft")
    soft.status, soft.observed, soft.reason = "fail", "1", "expected nothing"
    text = render(_report(checks, [_run(TCG, tmp_path / "t.log")]), 120)
    assert "guest (soft)" in " ".join(table_part(text)[2:4])
    assert "guest (soft):" not in " ".join(text.split()).split("columns not shown")[-1]


def test_probe_groups_keep_trap_cpuid_with_its_group_and_the_boot_last(full):
    lines = [line.rstrip() for line in render(full, 100).splitlines()]
    trap, run = lines.index("trap"), lines.index("run")
    cpuid = next(i for i in range(trap, len(lines)) if lines[i].startswith("  cpuid"))
    assert trap < cpuid < run
    assert all(not lines[i].startswith(("  ", "run")) or i > trap for i in range(cpuid, run))
    assert lines[run + 1].startswith("  integrity")


def test_gdb_mark_only_where_gdb_agreed(tmp_path):
    def gdb(exp, serial):
        if exp.id == "host.cpl-enter.cpl3.iretq":
            return "0"  # disagrees
        if exp.id == "host.rdtsc.tsd1.cpl1":
            return "unreached"
        if exp.id == "host.rdtsc.tsd0.cpl0":
            return None  # not witnessed
        return serial if exp.scope == "host" else None

    rep = _report(_checks("tcg", TCG, gdb=gdb), [_run(TCG, tmp_path / "t.log")])
    lines = render(rep, 120).splitlines()

    def row(label):
        return next(line for line in lines if line.startswith(label))

    assert "serial=3 gdb=0" in row("  cpl3.iretq") and "ᵍ" not in row("  cpl3.iretq").split("gdb=0")[1][:3]
    assert "✗" in row("  cpl3.iretq")
    assert "serial=#GP(0) gdb=unreached" in row("  tsd1.cpl1")
    assert "ᵍ" not in row("  tsd0.cpl0")
    assert "ᵍ" in row("  cpl1.iretq")


def test_gdb_mark_control_a_disagreeing_cell_never_shows_the_mark():
    c = {"status": "fail", "observed": "3", "expected": "3", "witnesses": {"serial": "3", "gdb": "0"}}
    assert "ᵍ" not in con.cell(c).plain and "serial=3 gdb=0" in con.cell(c).plain
    c["witnesses"]["gdb"] = "3"
    assert con.cell(c).plain.endswith("ᵍ")


@pytest.mark.parametrize("mode", ["serial", "gdb", "both"])
def test_header_names_the_witness_mode(full, mode):
    full["witness"] = mode
    assert render(full, 100).splitlines()[0].endswith(f"witness: {mode}")


def test_header_witness_mode_defaults_to_both(full):
    full.pop("witness", None)
    assert render(full, 100).splitlines()[0].endswith("witness: both")


def test_one_dead_boot_one_explanation(tmp_path):
    """A hung boot: every check without an observation collapses into one line with the
    cause; the boot line gives the last serial line. At most 15 lines in all."""
    log = tmp_path / "serial.log"
    log.write_bytes(b"\r\n@@LAB 0 hello proto=1 ck=d9\r\n@@LAB 1 info fault=hang ck=83\r\n\r\n")
    why = "no observation: the probe did not report (boot timeout: no `end` record within 3.0 s)"
    checks = _checks("tcg", TCG, observe=lambda exp, serial: None)
    for c in checks:
        if c.status == "error":
            c.reason = why
    integrity = checks[-1]
    integrity.status, integrity.observed = "error", "timeout"
    integrity.reason = "boot timeout: no `end` record within 3.0 s; output cut short"
    rep = _report(checks, [_run(TCG, log, "timeout", "no `end` record within 3.0 s")])
    for width in WIDTHS:
        text = render(rep, width)
        assert len(text.splitlines()) <= 15, text
        flat = " ".join(text.split())
        assert flat.count("no observation") == 1 and flat.count("the boot died") == 1
        assert "cause: no `end` record within 3.0 s; last serial line: @@LAB 1 info fault=hang ck=83" in text


def _notes(text: str) -> list[tuple[str, str]]:
    """(status, text) of each note line (`  error tcg ...`), its wrapped lines joined."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = re.match(r"  (pass|fail|error|xfail|xpass|skip) +(.*)", line)
        if m:
            out.append((m.group(1), m.group(2).strip()))
        elif out and line.startswith("        ") and line.strip():
            out[-1] = (out[-1][0], f"{out[-1][1]} {line.strip()}")
        else:
            out.append(("", ""))  # ends the note
    return [n for n in out if n[0]]


def errors_a_reader_counts(text: str) -> int:
    """Errors as printed: `N errors` on the folded-columns lines, 1 (+N) per `Why not pass` line."""
    n = 0
    for status, note in _notes(text):
        if "columns not shown:" in note:
            n += sum(int(k) for k in re.findall(r"(\d+) errors?\b", note))
        elif status == "error":
            more = re.match(r"\S+ \S+(?: \+(\d+))?:", note)
            n += 1 + int(more.group(1) or 0)
    return n


def _dead(tmp_path, observe) -> dict:
    log = tmp_path / "serial.log"
    log.write_bytes(b"@@LAB 0 hello proto=1 ck=d9\r\n")
    checks = _checks("tcg", TCG, observe=observe)
    for c in checks:
        if c.status == "error":
            c.reason = "no observation: the probe did not report (boot timeout: no `end` record within 3.0 s)"
    integrity = checks[-1]
    integrity.status, integrity.observed = "error", "timeout"
    integrity.reason = "boot timeout: no `end` record within 3.0 s; output cut short"
    return _report(checks, [_run(TCG, log, "timeout", "no `end` record within 3.0 s")])


@pytest.mark.parametrize("width", WIDTHS)
def test_a_dead_boots_errors_add_up_to_the_summary(tmp_path, width):
    """The folded line counts run.integrity too: its errors are the summary's."""
    rep = _dead(tmp_path, lambda exp, serial: None)
    text = render(rep, width)
    assert errors_a_reader_counts(text) == rep["summary"]["error"], text
    fold = next(note for _, note in _notes(text) if "columns not shown" in note)
    assert "run.integrity" in fold


@pytest.mark.parametrize("width", WIDTHS)
def test_a_boot_that_died_half_way_adds_up_too(tmp_path, width):
    """Host probes observed, then the boot hung: the host column is shown, the guest's folded;
    run.integrity is counted with the other errors (Why not pass), not only in the table."""
    rep = _dead(tmp_path, lambda exp, serial: serial if exp.scope == "host" and "rdtsc" not in exp.id else None)
    text = render(rep, width)
    assert errors_a_reader_counts(text) == rep["summary"]["error"], text


def test_error_count_control_a_missing_error_line_is_noticed(tmp_path):
    """Negative control for errors_a_reader_counts: drop a Why-not-pass line and it no longer adds up."""
    rep = _dead(tmp_path, lambda exp, serial: serial if exp.scope == "host" and "rdtsc" not in exp.id else None)
    text = render(rep, 120)
    line = next(li for li in text.splitlines() if li.startswith("  error tcg host.rdtsc"))
    assert errors_a_reader_counts(text.replace(line + "\n", "")) != rep["summary"]["error"]


def test_dead_boot_control_a_live_boot_has_no_cause_line(full):
    assert "cause:" not in render(full, 100) and "last serial line" not in render(full, 100)


def test_why_not_pass_says_when_it_shows_one_sample(tmp_path):
    checks = _checks("kvm", KVM)  # kvm_pvm: eight RDTSCP skips share one reason
    text = render(_report(checks, [_run(KVM, tmp_path / "k.log")]), 120)
    assert "one sample check per configuration and reason" in text
    assert "kvm host.rdtscp.tsd0.cpl0 +7:" in text
    assert "rdtscp.tsd1.cpl3:" not in text


def test_why_not_pass_without_samples_says_nothing_about_them(tmp_path):
    checks = _checks("tcg", TCG)
    for c in checks:
        if c.status != "pass":  # keep one reason only: the fail below
            c.status, c.reason, c.observed = "pass", "", c.expected
    bad = next(c for c in checks if c.id == "host.cpuid-hv-bit")
    bad.status, bad.observed, bad.reason = "fail", "0", "expected 1, observed 0"
    folded_out = [c for c in checks if c.scope != "guest-soft"]
    text = render(_report(folded_out, [_run(TCG, tmp_path / "t.log")]), 120)
    assert "Why not pass\n" in text and "one sample" not in text
    assert "fail tcg host.cpuid-hv-bit: expected 1, observed 0" in text


def test_columns_env_is_honoured_when_piped(monkeypatch):
    pipe = io.StringIO()  # not a tty
    monkeypatch.setenv("COLUMNS", "123")
    assert con.console_width(pipe) == 123
    monkeypatch.delenv("COLUMNS")
    assert con.console_width(pipe) == con.DESIGN_WIDTH


def test_make_console_uses_columns_when_stdout_is_a_pipe():
    code = "from lab.console import make_console; print(make_console().width)"
    env = {"COLUMNS": "87", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "87"
    env.pop("COLUMNS")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(con.DESIGN_WIDTH)


def test_bad_view_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--view 'nope'"):
        run_lab(RunOptions(view="nope", runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError):
        con.render({}, Console(file=io.StringIO()), view="nope")


def test_invoke_bad_view_is_one_error_line_and_exit_2():
    out = subprocess.run(["invoke", "lab.run", "--view", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: --view 'nope': choose one of {', '.join(con.VIEWS)}"]


def test_the_boot_row_stays_last_when_a_later_configuration_adds_a_group(tmp_path):
    extra = Check("host.umip.cpl3", "kvm", "host", "umip", {"cpl": "3"}, "#GP(0)", "#GP(0)", "pass", config=KVM)
    rep = _report(_checks("tcg", TCG) + _checks("kvm", KVM) + [extra],
                  [_run(TCG, tmp_path / "t.log"), _run(KVM, tmp_path / "k.log")])
    lines = [line.rstrip() for line in render(rep, 120).splitlines()]
    assert lines.index("umip") < lines.index("run")


@pytest.mark.tcg
@pytest.mark.parametrize("width", (80, 100))
def test_a_real_hung_boot_explains_itself_in_15_lines(tmp_path, artifacts, no_leftovers, width):
    out = io.StringIO()
    opts = RunOptions(accel="tcg", kernel_args=("fault=hang",), timeout=1.5, witness="serial",
                      runs_dir=str(tmp_path / "runs"))
    status, rep = run_lab(opts, Console(file=out, width=width))
    text = out.getvalue()
    assert status == 1 and rep["summary"]["error"] > 10
    assert len(text.splitlines()) <= 15, text
    assert "cause: no `end` record within 1.5 s; last serial line: @@LAB" in text
    assert "fault=hang" in text.split("last serial line:")[1].splitlines()[0]


def test_rows_skipped_in_every_column_are_one_line(tmp_path):
    checks = _checks("tcg", TCG) + _checks("kvm", KVM)
    for c in checks:
        if c.id == "host.rdtsc.tsd0.cpl2":  # skipped on both accelerators: no row
            c.status, c.reason = "skip", "not run here"
        if c.id == "host.rdtsc.tsd0.cpl1" and c.accel == "kvm":  # skipped on one: the row stays
            c.status, c.reason = "skip", "not run on kvm"
    rep = _report(checks, [_run(TCG, tmp_path / "t.log"), _run(KVM, tmp_path / "k.log")])
    lines = [line.rstrip() for line in render(rep, 100).splitlines()]
    rdtsc = lines.index("rdtsc")
    rows = lines[rdtsc + 1:rdtsc + 12]
    assert not any(r.startswith("  tsd0.cpl2 ") for r in rows), rows
    assert any(r.startswith("  tsd0.cpl1 ") for r in rows), rows
    assert any("rows not shown, skipped in every column" in line and "rdtsc 1" in line for line in lines)
    assert any(line.startswith("  tsd0.cpl2 ") for line in render(rep, 100, "wide").splitlines()) is False
    assert "rdtsc.tsd0.cpl2" in render(rep, 100, "wide")  # the wide view keeps every row


def test_a_column_title_that_is_the_whole_configuration_is_not_repeated_as_its_own_alias():
    from lab.console import _short_names  # noqa: PLC0415

    class Col:
        def __init__(self, config):
            self.config = config

    two_tcg = [Col("tcg/microvm/qemu64,+svm"), Col("tcg/microvm/max")]
    short = _short_names(two_tcg)
    assert short == {c.config: c.config for c in two_tcg}  # no shorter title: printed once, no "x = x"
    one_each = [Col("tcg/microvm/qemu64,+svm"), Col("kvm/microvm/qemu64")]
    assert _short_names(one_each) == {"tcg/microvm/qemu64,+svm": "tcg", "kvm/microvm/qemu64": "kvm"}


# -- the side-by-side table laid out by lab.console, against rich's Table -------------------
CONSOLES = {"plain": {}, "colour": {"force_terminal": True, "color_system": "truecolor"}}
ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _lie(exp, serial):
    """What a lying firmware reports (as --variant lie): another CPL where it entered ring 3."""
    return "0" if exp.id.endswith(("cpl3.iretq", "cpl3.sysret")) else serial


def _synthetic(name: str, tmp_path) -> dict:
    t, k = tmp_path / "t.log", tmp_path / "k.log"
    if name == "full":
        return _report(_checks("tcg", TCG) + _checks("kvm", KVM), [_run(TCG, t), _run(KVM, k)])
    if name == "dead":
        return _dead(tmp_path, lambda exp, serial: None)
    if name == "half-dead":
        return _dead(tmp_path, lambda exp, serial: serial if exp.scope == "host" and "rdtsc" not in exp.id else None)
    if name == "lie":  # GDB reads 3 where serial says 0: the widest cells, and `(want 3)` in the wide view
        def gdb(exp, serial):
            return "3" if _lie(exp, "3") == "0" else serial if exp.scope == "host" else None

        checks = _checks("tcg", TCG, observe=_lie, gdb=gdb)
        return _report(checks + _checks("kvm", KVM, observe=_lie), [_run(TCG, t), _run(KVM, k)])
    if name == "two-tcg":  # no short column titles: the whole configuration over each scope
        return _report(_checks("tcg", TCG) + _checks("tcg", "tcg/microvm/max"),
                       [_run(TCG, t), _run("tcg/microvm/max", k)])
    if name == "odd":  # markup and an emoji code in a label (a str cell) and a value; wide, combining characters
        checks = _checks("tcg", TCG) + [
            Check("host.odd.[red]x:smile:", "tcg", "host", "odd", {}, "1", "1", "pass", config=TCG),
            Check("host.odd.wide", "tcg", "host", "odd", {}, "0", "1", "fail", reason="wide", config=TCG)]
        next(c for c in checks if c.id == "host.cpuid-vendor.leaf0").observed = "[bold]Authentic:smile:AMD"
        report = _report(checks, [_run(TCG, t)])
        wide = next(c for c in report["checks"] if c["id"] == "host.odd.wide")
        wide["observed"] = "値\\0 cafe\u0301"  # the report escapes what the firmware sends; a cell need not
        return report
    raise ValueError(name)


SYNTHETIC = ("full", "dead", "half-dead", "lie", "two-tcg", "odd")


def _render_both(report: dict, width: int, view: str, kind: str) -> tuple[str, str, bool]:
    """The report as printed (the side-by-side table laid out by lab.console where it can),
    the same with rich's Table printing every table (printed again only where the first laid
    one out: else it is the same print), and whether the first laid one out."""
    laid_out, used, outputs = con._laid_out, [], []

    def spy(console, table):
        text = laid_out(console, table)
        used.append(text is not None)
        return text

    for layout in (spy, lambda console, table: None):
        if outputs and not any(used):
            return outputs[0], outputs[0], False
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(con, "_laid_out", layout)
            out = io.StringIO()
            con.render(report, Console(file=out, width=width, **CONSOLES[kind]), view=view)
            outputs.append(out.getvalue())
    return outputs[0], outputs[1], any(used)


def _same_as_rich(report: dict, widths=(100, 120, 160, 200), views=("auto", "table", "wide")) -> list[tuple]:
    """(width, view) where the table was laid out here; asserts each output is rich's, byte
    for byte, plain and in colour, with no line ending in blanks."""
    fast_cases = []
    for width in widths:
        for view in views:
            for kind in CONSOLES:
                fast, slow, used = _render_both(report, width, view, kind)
                assert fast == slow, f"{width} columns, --view {view}, {kind}"
                assert [li for li in ESCAPE.sub("", fast).splitlines() if li != li.rstrip()] == []
                if used and kind == "plain":
                    fast_cases.append((width, view))
    return fast_cases


@pytest.mark.parametrize("name", SYNTHETIC)
def test_table_laid_out_here_prints_what_rich_table_prints(tmp_path, name):
    """Byte for byte at 100-200 columns, every view that can show the side-by-side table,
    plain and through a colour terminal's escape codes; the wide view always lays it out."""
    report = _synthetic(name, tmp_path)
    fast_cases = _same_as_rich(report)
    assert {(w, "wide") for w in (100, 120, 160, 200)} <= set(fast_cases)
    if name not in ("dead", "lie", "two-tcg"):  # these fold every column, or are wider than 100
        assert (100, "auto") in fast_cases and (100, "table") in fast_cases


def test_table_is_laid_out_here_only_where_no_cell_wraps(tmp_path):
    """The common case (auto, table that fits, wide) is laid out here; a table whose cells
    wrap (--view table narrower than it) and the scope view are rich's."""
    report = _synthetic("full", tmp_path)
    assert _render_both(report, 100, "auto", "plain")[2]
    assert _render_both(report, 60, "wide", "plain")[2]
    wrapped = _synthetic("full", tmp_path)
    vendor = next(c for c in wrapped["checks"] if c["id"] == "host.cpuid-vendor.leaf0")
    vendor["observed"] = "AuthenticAMD-and-then-some"  # wider than 100 columns at its natural width
    fast, slow, used = _render_both(wrapped, 100, "table", "plain")
    assert not used and fast == slow and "observed" not in fast  # still a table, wrapped by rich
    assert not _render_both(report, 100, "scope", "plain")[2]
    assert _same_as_rich(wrapped, widths=(80, 90, 100), views=("table",)) == []


def _fast_table(console: Console, report: dict):
    """The side-by-side table as render builds it (auto view), pinned, and its laid-out Text."""
    columns = con._columns(report)
    shown = [c for c in columns if not c.folded]
    groups, _ = con._split_skipped_rows(con._groups(report), shown)
    table = con._table(shown, groups, con._short_names(columns), wide=False)
    assert con._fits(console, table)
    return table, con._laid_out(console, table)


def test_laid_out_table_control_merged_segments_are_other_bytes(full):
    """Control for the byte comparison: the laid-out text with adjacent spans of one style
    merged (a header cell and its padding, both bold) reads the same but prints other escape
    codes: where rich's segments break is compared too, not only the text."""
    def printed(renderable_or_table, via_rich=False) -> str:
        out = io.StringIO()
        console = Console(file=out, width=100, **CONSOLES["colour"])
        if via_rich:
            con.out(console, renderable_or_table)
        else:
            console.print(con.LaidOut(renderable_or_table))
        return out.getvalue()

    table, text = _fast_table(Console(file=io.StringIO(), width=100, **CONSOLES["colour"]), full)
    assert printed(text) == printed(table, via_rich=True)
    merged: list[Span] = []
    for span in text.spans:
        if merged and merged[-1].end == span.start and merged[-1].style == span.style:
            merged[-1] = Span(merged[-1].start, span.end, span.style)
        else:
            merged.append(span)
    assert len(merged) < len(text.spans)
    joined = text.copy()
    joined.spans = merged
    assert ESCAPE.sub("", printed(joined)) == ESCAPE.sub("", printed(text))
    assert printed(joined) != printed(text)


REAL_RUNS = {  # invoke lab.run ... as the lab's own reports come out of it
    "all": RunOptions(),
    "tcg-max": RunOptions(accel="tcg", cpu="max"),
    "hang": RunOptions(accel="tcg", kernel_args=("fault=hang",), timeout=2.0),
    "lie": RunOptions(variant="lie"),
}


@pytest.fixture(scope="module", params=sorted(REAL_RUNS))
def real_report(request, tmp_path_factory):
    request.getfixturevalue("lie_artifacts" if request.param == "lie" else "artifacts")
    opts = dataclasses.replace(REAL_RUNS[request.param], runs_dir=str(tmp_path_factory.mktemp(request.param)))
    _, report = run_lab(opts, Console(file=io.StringIO(), width=100))
    return request.param, report


@pytest.mark.tcg
@pytest.mark.gdb
def test_real_reports_table_laid_out_here_prints_what_rich_table_prints(real_report, no_leftovers):
    """The same comparison on reports of real boots: --accel all, TCG with -cpu max, a dead
    boot (fault=hang), a lying firmware (--variant lie)."""
    name, report = real_report
    exits = {r["exit"] for r in report["runs"]}
    assert exits == ({"timeout"} if name == "hang" else {"ok"})
    assert (report["summary"]["fail"] > 0) == (name == "lie")  # the lie is caught: ✗ cells, `serial=.. gdb=..`
    fast_cases = _same_as_rich(report)
    assert {(w, "wide") for w in (100, 120, 160, 200)} <= set(fast_cases)
    if name != "hang":  # a dead boot folds every column: no table but the wide view's
        assert (200, "auto") in fast_cases
