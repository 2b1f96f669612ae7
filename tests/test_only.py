"""Asking one question: `--only`, `lab.judge` (re-judging a saved run), `--markdown`, TAP values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab import config, deviations, rejudge
from lab.cli import RunOptions, run_lab, validate
from lab.config import ConfigError
from lab.report import markdown, tap

ROOT = config.Path(__file__).resolve().parent.parent


def _run(tmp_path, accel="tcg", **kw):
    opts = RunOptions(accel=accel, witness="serial", quiet=True, runs_dir=str(tmp_path / "runs"), **kw)
    return run_lab(opts)


@pytest.fixture(scope="module")
def tsc_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("only")
    status, rep = _run(tmp, only="tsc,cpuid-vendor")
    return status, rep


def test_only_runs_and_judges_just_those_families(tsc_run):
    status, rep = tsc_run
    assert status == 0 and rep["summary"]["error"] == 0 and rep["only"] == ["tsc", "cpuid-vendor"]
    probes = {c["probe"] for c in rep["checks"]}
    assert probes == {"rdtsc", "rdtscp", "rdtsc-intercepted", "cpuid-vendor", "guest-end", "run"}, probes
    assert any(c["id"] == "guest-svm.rdtsc.tsd1.cpl3" for c in rep["checks"])  # the guest's own probes too
    # the firmware was told to leave the rest out, so nothing else ran (no error for what was not asked)
    cmdline = rep["runs"][0]["firmware"].get("cmdline", "") or " ".join(rep["runs"][0]["command"])
    assert "priv" in cmdline.split("skip=")[1].split()[0].split(",")


def test_without_only_the_same_families_are_errors_when_skipped(tmp_path):
    """Negative control: `--kernel-arg skip=priv` alone leaves the priv checks planned and unobserved."""
    status, rep = _run(tmp_path, kernel_args=("skip=priv",))
    assert status == 1 and any(c["probe"] == "priv-insn" and c["status"] == "error" for c in rep["checks"])


def test_only_a_glob_keeps_exactly_its_checks(tmp_path):
    status, rep = _run(tmp_path, only="rdtsc.tsd1.*")
    kept = {c["id"] for c in rep["checks"] if c["probe"] != "run" and c["probe"] != "guest-end"}
    assert kept and all(".rdtsc.tsd1." in cid for cid in kept), kept
    assert status == 0


@pytest.mark.parametrize("bad", ["", "nosuch", "tsc,", "rdtc", "host.nothing.*", "a b"])
def test_bad_only_is_one_error_before_any_work(tmp_path, bad):
    with pytest.raises(ConfigError, match="--only"):
        validate(RunOptions(only=bad, runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_markdown_path_is_checked_and_not_shared(tmp_path):
    with pytest.raises(ConfigError, match="--markdown"):
        validate(RunOptions(markdown=str(tmp_path / "no" / "x.md")))
    with pytest.raises(ConfigError, match="same file"):
        validate(RunOptions(markdown=str(tmp_path / "r"), json=str(tmp_path / "r")))
    with pytest.raises(ConfigError, match="--markdown ''"):
        validate(RunOptions(markdown=""))


def test_markdown_report_has_the_answers_and_every_check(tsc_run):
    _, rep = tsc_run
    text = markdown(rep)
    assert "## Answers" in text and "RDTSC at CPL3, CR4.TSD=1" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(rep["checks"])
    assert "| `host.rdtsc.tsd1.cpl3` | `#GP(0)` | `#GP(0)` | pass |" in text


def test_tap_lines_carry_expected_and_observed(tsc_run):
    _, rep = tsc_run
    lines = tap(rep).splitlines()
    line = next(line for line in lines if "host.rdtsc.tsd1.cpl3" in line)
    # `#` starts a TAP directive: the values' `#` is escaped, so the line is still a plain `ok`
    assert line.endswith(": expected \\#GP(0), observed \\#GP(0)") and " # " not in line


def test_rejudge_a_saved_run_gives_its_verdicts_back(tmp_path):
    """Every usable accelerator: KVM's deviations depend on the host the run was made on (its
    report's `host`, e.g. host_cpuid_fault), which the re-judging reads back."""
    status, rep = _run(tmp_path, accel="all")
    root = config.Path(rep["runs"][0]["run_dir"]).parent
    again, saved = rejudge.rejudge(str(root))
    assert rejudge.changes(again, saved) == []
    assert again["summary"] == saved["summary"]
    one, _ = rejudge.rejudge(rep["runs"][0]["log"])  # a boot's serial.log alone
    assert [c["status"] for c in one["checks"]] == [c["status"] for c in saved["checks"]
                                                    if c["config"] == rep["runs"][0]["config"]]


def test_rejudge_uses_todays_rules(tmp_path, monkeypatch):
    """Negative control: a deviation removed since the run turns its xfail into a fail."""
    status, rep = _run(tmp_path)
    xfails = [c for c in rep["checks"] if c["status"] == "xfail"]
    assert xfails, "TCG on QEMU 7.2 has named deviations (RDPMC)"
    monkeypatch.setattr(deviations, "find", lambda facts, exp: None)
    again, saved = rejudge.rejudge(str(config.Path(rep["runs"][0]["run_dir"]).parent))
    changed = rejudge.changes(again, saved)
    assert {(cid, before, now) for _, cid, before, now in changed} >= {(c["id"], "xfail", "fail") for c in xfails}


def test_lab_judge_task_bad_input_is_one_error_line(tmp_path):
    for args in (["lab.judge", str(tmp_path / "none")], ["lab.judge", str(tmp_path)], ["lab.judge", ""]):
        proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    (tmp_path / "report.json").write_text(json.dumps({"runs": []}))
    proc = subprocess.run([sys.executable, "-m", "invoke", "lab.judge", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "lists no boot" in proc.stderr
