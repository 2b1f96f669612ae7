"""Report formats (JUnit XML, TAP 13, JSON) and two lab runs side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from lab import report
from lab.config import ConfigError
from lab.judge import Check

pytestmark = pytest.mark.usefixtures("no_leftovers")


def sample():
    checks = [
        Check("host.rdtsc.tsd1.cpl3", "tcg", "host", "rdtsc", {"tsd": "1", "cpl": "3"}, "#GP(0)", "#GP(0)", "pass", config="tcg/m/c"),
        Check("host.rdtsc.tsd1.cpl2", "tcg", "host", "rdtsc", {"tsd": "1", "cpl": "2"}, "#GP(0)", "ok", "fail", "expected #GP(0), observed ok", config="tcg/m/c"),
        Check("host.cpl-enter.cpl1.iretq", "tcg", "host", "cpl-enter", {}, "1", None, "error", "no observation", config="tcg/m/c"),
        Check("host.rdtsc.tsd1.cpl3", "kvm", "host", "rdtsc", {}, "#GP(0)", "ok", "xfail", "kvm_pvm-rdtsc-tsd-cpl3: ...", config="kvm/m/c"),
        Check("guest-svm.cpuid-hv-bit", "kvm", "guest-svm", "cpuid-hv-bit", {}, "1", None, "skip", "no SVM", config="kvm/m/c"),
    ]
    runs = [{"config": "tcg/m/c", "log": "/runs/1/serial.log"}, {"config": "kvm/m/c", "log": "/runs/2/serial.log"}]
    return report.build("0", {"qemu": "7.2"}, runs, checks)


def test_junit_counts_and_elements(tmp_path):
    path = tmp_path / "j.xml"
    report.write_junit(sample(), path)
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("5", "1", "1", "2")
    cases = suite.findall("testcase")
    assert cases[1].find("failure").get("message") == "expected #GP(0), observed ok"
    assert "/runs/1/serial.log" in cases[1].find("failure").text  # where to look
    assert cases[2].find("error") is not None and cases[3].find("skipped") is not None


def test_tap13(tmp_path):
    lines = report.tap(sample()).splitlines()
    assert lines[:2] == ["TAP version 13", "1..5"]
    assert lines[2].startswith("ok 1 - ")
    assert lines[3].startswith("not ok 2 - ") and lines[4] == "  ---"
    assert any(line.startswith("ok 4 - ") and "# TODO xfail" in line for line in lines)
    assert any(line.startswith("ok 5 - ") and "# SKIP no SVM" in line for line in lines)


def test_summary_counts_every_status():
    assert sample()["summary"] == {"pass": 1, "fail": 1, "xfail": 1, "xpass": 0, "skip": 1, "error": 1}


@pytest.mark.tcg
def test_two_lab_runs_at_once_do_not_collide(tmp_path, artifacts):
    procs = [
        subprocess.Popen([sys.executable, "-m", "invoke", "lab.run", "--accel", "all", "--json", str(tmp_path / f"r{i}.json"),
                          "--junit", str(tmp_path / f"j{i}.xml"), "--tap"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
        assert out.startswith("TAP version 13")  # stdout is pure TAP; the table is on stderr
        assert "ring-lab" in err
    r0, r1 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2))
    assert {r["run_dir"] for r in r0["runs"]}.isdisjoint({r["run_dir"] for r in r1["runs"]})
    assert r0["summary"] == r1["summary"]
    for i in range(2):
        ET.parse(tmp_path / f"j{i}.xml")


# -- writing report files -------------------------------------------------------------------
def test_report_file_is_0644_and_no_temp_file_stays(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(sample(), path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert json.loads(path.read_text())["summary"]["fail"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_report_json_is_the_report_one_check_per_line():
    rep = sample()
    text = report.json_text(rep)
    assert json.loads(text) == rep  # the same document as any dump
    lines = text.splitlines()
    assert len(lines) == len(rep) + 2 + sum(len(v) + 1 for v in rep.values() if isinstance(v, list) and v)
    check_lines = [json.loads(line.strip().rstrip(",")) for line in lines if line.startswith('    {"id"')]
    assert check_lines == rep["checks"]  # each check whole on its own line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temp_file_is_next_to_the_target_and_removed_on_failure(tmp_path, monkeypatch):
    made = []
    real = report.tempfile.mkstemp

    def spy(**kw):
        fd, name = real(**kw)
        made.append(name)
        return fd, name

    monkeypatch.setattr(report.tempfile, "mkstemp", spy)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(report.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        report.write_junit(sample(), tmp_path / "out" / "j.xml")
    assert [os.path.dirname(m) for m in made] == [str(tmp_path / "out")]  # not cwd, not /
    assert list((tmp_path / "out").iterdir()) == []  # the temp file went with the failure


@pytest.mark.parametrize("target,message", [("missing/x.json", "does not exist"), (".", "is a folder")])
def test_check_target_refuses_and_creates_nothing(tmp_path, target, message):
    with pytest.raises(ConfigError, match=message):
        report.check_target(str(tmp_path / target), "--json")
    assert list(tmp_path.iterdir()) == []
    assert report.check_target(str(tmp_path / "ok.json"), "--json") == tmp_path / "ok.json"  # negative control
    assert list(tmp_path.iterdir()) == []
