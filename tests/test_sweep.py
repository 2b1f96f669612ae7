"""The sweep (lab/sweep.py, tests/sweep): planning, one configuration, merging, the outputs
(table, JUnit, HTML in a real headless Chromium), bad input, and that how the sweep is
spread (pytest-xdist, execnet popen gateways, pytest-split shards) does not change the
merged matrix. The sweep itself runs only when asked (`pytest tests/sweep`, `invoke lab.sweep`)."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from lab import report, sweep, sweep_merge
from lab.build import ROOT
from lab.config import ConfigError
from lab.judge import Check
from lab.runner import NO_LONG_MODE, preboot
from lab.sweep_html import page

pytestmark = pytest.mark.usefixtures("no_leftovers")

KVM_DEV = {"tsd": "1", "cpl": "3"}  # the params of the kvm_pvm-rdtsc-tsd-cpl3 deviation


# -- synthetic per-configuration reports ----------------------------------------------------------
def fake_report(accel: str, cpu: str, statuses: list[str], *, skip: str | None = None, tweak: str = "",
                retry: dict | None = None, deviation: bool = False) -> dict:
    label = f"{accel}/microvm/{cpu}"
    checks = [Check(f"host.p{i}", accel, "host", f"p{i}", {}, "1", "1" if s == "pass" else "0", s, f"why {i}",
                    config=label) for i, s in enumerate(statuses)]
    if deviation:
        checks.append(Check("host.rdtsc.tsd1.cpl3", accel, "host", "rdtsc", KVM_DEV, "#GP(0)", "ok", "xfail",
                            "kvm_pvm-rdtsc-tsd-cpl3: ...", config=label))
    run = {"accel": accel, "cpu": cpu, "config": label, "repro": f"qemu-system-x86_64 -cpu {cpu}", "run_dir": "/r"}
    rep = report.build("0", {"qemu": "7.2", "kvm_module": "kvm_pvm"}, [run], checks)
    rep[sweep.SWEEP_KEY] = {"accel": accel, "cpu": cpu, "tweak": tweak, "retry": retry, "skip": skip,
                            "unavailable_features": []}
    return rep


def write(folder: Path, rep: dict) -> None:
    meta = rep[sweep.SWEEP_KEY]
    folder.mkdir(parents=True, exist_ok=True)
    report.write_json(rep, folder / f"{sweep.SweepConfig(meta['accel'], meta['cpu']).slug}.json")


def _with_values_and_skips(rep: dict) -> dict:
    """A vendor check and two skips sharing a reason (the page shows the one, groups the others)."""
    label = rep["runs"][0]["config"]
    rep["checks"] += [Check("host.cpuid-vendor.leaf0", "tcg", "host", "cpuid-vendor", {"leaf": "0"}, "AuthenticAMD",
                            "AuthenticAMD", "pass", config=label).as_dict(),
                      *(Check(f"host.p{i}", "tcg", "host", f"p{i}", {}, "1", None, "skip", "not run here",
                              config=label).as_dict() for i in (1, 2))]
    return rep


@pytest.fixture
def two_folders(tmp_path):
    """Two workers' folders: passes, a known deviation, a skip, a fail, an error, a retry."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, _with_values_and_skips(fake_report("tcg", "qemu64", ["pass"])))
    write(a, fake_report("kvm", "qemu64", ["pass", "skip"], deviation=True))
    write(a, fake_report("tcg", "qemu32", [], skip=NO_LONG_MODE))
    write(b, fake_report("tcg", "EPYC", ["pass", "fail"]))
    write(b, fake_report("kvm", "EPYC", ["error", "pass"], retry={"cpu": "EPYC,-arch-capabilities", "why": "x"}))
    write(b, fake_report("kvm", "qemu64,kvm=off", ["pass"], tweak="kvm"))
    return a, b


# -- planning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [lambda: sweep.parse_tweaks("vendor,nosuch"), lambda: sweep.parse_accels("bochs"),
                                  lambda: sweep.parse_accels(",")])
def test_unknown_choices_are_user_errors(call):
    with pytest.raises(ConfigError):
        call()


@pytest.mark.tcg
def test_plan_lists_qemus_models_then_tweaks(qemu, kvm):
    cfgs = sweep.plan(qemu, kvm, accels="tcg", models="qemu*,486,host", tweaks="lm,no-lm,kvm")
    assert [c.cpu for c in cfgs] == ["486", "host", "qemu32", "qemu64", "qemu32,+lm,+syscall", "qemu64,-lm"]
    assert [c.tweak for c in cfgs][-2:] == ["lm", "no-lm"]  # `kvm` is a KVM-only tweak
    assert cfgs[1].unavailable == ("kvm",)  # QEMU's own word on `host` under TCG
    with_versions = sweep.plan(qemu, kvm, accels="tcg", models="qemu64*", tweaks="none", versions=True)
    assert [c.cpu for c in with_versions] == ["qemu64", "qemu64-v1"]


# -- one configuration ---------------------------------------------------------------------------
@pytest.mark.tcg
def test_a_pre_boot_skip_is_the_sweeps_skip_and_nothing_boots(tmp_path, artifacts, qemu, kvm, monkeypatch):
    """What the host kernel can run on is the runner's decision from QOM (lab/runner.py
    preboot); the sweep takes its skips as they are and boots nothing for them. The runner
    has no QEMU model to skip today (no long mode boots the 32-bit host), so one is made here."""
    why = "the host kernel cannot run this model (a pre-boot decision made by this test)"

    def deciding(cfg):
        pre = preboot(cfg)
        if cfg.cpu == "qemu64,-lm":
            pre.skip = why
        return pre

    monkeypatch.setattr(sweep, "preboot", deciding)
    for cpu, skip in (("qemu64,-lm", why), ("qemu64", None)):
        cfg = sweep.SweepConfig("tcg", cpu)
        rep = sweep.run_config(cfg, art=artifacts, qemu=qemu, kvm=kvm, out_dir=tmp_path, witness="serial")
        assert rep[sweep.SWEEP_KEY]["skip"] == skip, cpu
        assert (tmp_path / "runs" / cfg.slug).exists() == (skip is None), cpu  # a skip never boots
    assert [c["status"] for c in json.loads((tmp_path / "tcg__qemu64_-lm.json").read_text())["checks"]] == ["skip"]


@pytest.mark.tcg
def test_a_model_qemu_refuses_is_a_skip_in_qemus_words(tmp_path, artifacts, qemu, kvm):
    [cfg] = sweep.plan(qemu, kvm, accels="tcg", models="host", tweaks="none")
    assert cfg.unavailable  # QEMU itself lists what is missing
    rep = sweep.run_config(cfg, art=artifacts, qemu=qemu, kvm=kvm, out_dir=tmp_path, witness="serial")
    assert "CPU model 'host' requires KVM" in rep[sweep.SWEEP_KEY]["skip"]


@pytest.mark.tcg
def test_a_refusal_qemu_did_not_announce_is_an_error(tmp_path, artifacts, kvm):
    """Negative control for the skip above: the same refusal without QEMU's listing of
    unavailable features stays an error."""
    cfg = sweep.SweepConfig("tcg", "host")
    rep = sweep.run_config(cfg, art=artifacts, qemu=shutil.which("qemu-system-x86_64"), kvm=kvm,
                           out_dir=tmp_path, witness="serial")
    assert rep[sweep.SWEEP_KEY]["skip"] is None
    assert [c["status"] for c in sweep.bad_checks(rep)] == ["error"]


@pytest.mark.tcg
def test_any_other_refusal_of_a_model_with_unavailable_features_is_an_error(tmp_path, artifacts, qemu, kvm):
    """Under KVM most models list unavailable features and still run: a refusal for any other
    reason (here a property QEMU does not know) must not hide behind that list."""
    cfg = sweep.SweepConfig("tcg", "qemu64,nosuchprop=on", unavailable=("pni",))
    rep = sweep.run_config(cfg, art=artifacts, qemu=qemu, kvm=kvm, out_dir=tmp_path, witness="serial")
    assert rep[sweep.SWEEP_KEY]["skip"] is None
    [bad] = sweep.bad_checks(rep)
    assert bad["status"] == "error" and "nosuchprop" in bad["reason"]


def fake_qemu(tmp_path: Path, always: bool) -> str:
    """QEMU that aborts as KVM does on a model needing `-arch-capabilities` (QEMU's message,
    docs/platform.md), then runs the real QEMU once the fix is in the -cpu string (unless `always`)."""
    real = shutil.which("qemu-system-x86_64")
    script = tmp_path / "qemu-msr"
    cond = "true" if always else '! printf "%s" "$*" | grep -q -- "-arch-capabilities"'
    script.write_text(f"""#!/bin/sh
if printf '%s' "$*" | grep -q -- '-accel kvm -cpu' && {cond}; then
  echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x20000000" >&2
  echo "qemu-system-x86_64: ../target/i386/kvm/kvm.c:2930: kvm_buf_set_msrs: Assertion failed." >&2
  exit 134
fi
exec {real} "$@"
""")
    script.chmod(0o755)
    return str(script)


@pytest.mark.kvm
def test_msr_10a_refusal_is_retried_with_the_documented_fix(tmp_path, artifacts, kvm):
    qemu = fake_qemu(tmp_path, always=False)
    cfg = sweep.SweepConfig("kvm", "qemu64")
    rep = sweep.run_config(cfg, art=artifacts, qemu=qemu, kvm=kvm, out_dir=tmp_path / "s", witness="serial")
    retry = rep[sweep.SWEEP_KEY]["retry"]
    assert retry["cpu"] == "qemu64,-arch-capabilities" and "MSR 0x10a" in retry["why"]
    assert rep["runs"][0]["cpu"] == "qemu64,-arch-capabilities"
    assert not sweep.bad_checks(rep)
    cell = sweep_merge.merge([tmp_path / "s"])["cells"]["qemu64"]["kvm"]
    assert cell["retry"] and sweep_merge.cell_text(cell).endswith("ʳ")


@pytest.mark.kvm
def test_msr_10a_refusal_that_the_fix_does_not_cure_is_an_error(tmp_path, artifacts, kvm):
    qemu = fake_qemu(tmp_path, always=True)
    rep = sweep.run_config(sweep.SweepConfig("kvm", "qemu64"), art=artifacts, qemu=qemu, kvm=kvm,
                           out_dir=tmp_path / "s", witness="serial")
    assert rep[sweep.SWEEP_KEY]["retry"] is not None
    assert [c["status"] for c in sweep.bad_checks(rep)] == ["error"]


# -- merging and outputs -------------------------------------------------------------------------
def test_merge_counts_statuses_deviations_and_retries(two_folders):
    merged = sweep_merge.merge(list(two_folders))
    cells = merged["cells"]
    assert [r["model"] for r in merged["rows"]] == ["EPYC", "qemu32", "qemu64", "qemu64,kvm=off"]
    assert cells["qemu64"]["tcg"]["status"] == "pass"
    assert cells["qemu64"]["kvm"]["status"] == "xfail"
    assert cells["qemu64"]["kvm"]["deviations"] == ["kvm_pvm-rdtsc-tsd-cpl3"]
    assert cells["qemu64"]["kvm"]["counts"]["skip"] == 1 and cells["qemu64"]["kvm"]["counts"]["xfail"] == 1
    assert cells["qemu32"]["tcg"]["status"] == "skip" and cells["qemu32"]["tcg"]["skip"] == NO_LONG_MODE
    assert cells["EPYC"]["tcg"]["status"] == "fail" and cells["EPYC"]["kvm"]["status"] == "error"
    assert cells["EPYC"]["kvm"]["retry"]["cpu"] == "EPYC,-arch-capabilities"
    assert merged["rows"][-1]["tweak"] == "kvm" and "tcg" not in cells["qemu64,kvm=off"]
    assert merged["summary"]["by_status"] == {"pass": 2, "fail": 1, "xfail": 1, "xpass": 0, "skip": 1, "error": 1}
    assert merged["deviations"]["kvm_pvm-rdtsc-tsd-cpl3"]["configs"] == 1
    assert sweep_merge.exit_status(merged) == 1


def test_deviations_are_named_as_the_judge_named_them(tmp_path):
    rep = fake_report("kvm", "qemu64", [])
    label = "kvm/microvm/qemu64"
    rep["checks"] = [c.as_dict() for c in [
        Check("a", "kvm", "host", "x", {}, "1", "3", "xfail", "kvm_pvm-syscall-cpl3: stays at CPL3", config=label),
        Check("b", "kvm", "host", "y", {}, "1", "1", "xpass",
              "known deviation kvm_pvm-rdtscp-emulation did not happen: ...", config=label),
        Check("c", "kvm", "host", "z", {}, None, None, "skip", "no SVM: the software host runs it", config=label),
        Check("d", "kvm", "host", "w", {}, "1", "0", "fail", "kvm_pvm-rdtsc-tsd-cpl3: not a deviation here",
              config=label),
    ]]
    write(tmp_path, rep)
    cell = sweep_merge.merge([tmp_path])["cells"]["qemu64"]["kvm"]
    assert cell["deviations"] == ["kvm_pvm-rdtscp-emulation", "kvm_pvm-syscall-cpl3"]


def test_a_dead_boot_is_explained_by_its_cause_not_a_wall_of_errors():
    checks = [{"id": f"host.p{i}", "status": "error", "reason": "no observation"} for i in range(40)]
    checks.append({"id": "run.integrity", "status": "error", "reason": "boot exit-code: firmware exited with code 3"})
    lines = sweep.bad_lines(checks + [{"id": "host.x", "status": "pass", "reason": ""}])
    assert lines[0].startswith("error run.integrity: boot exit-code") and len(lines) == 5
    assert lines[-1] == "... and 37 more in the report"


def test_merge_exit_status_is_clean_only_without_fail_and_error(tmp_path):
    write(tmp_path, fake_report("tcg", "qemu64", ["pass"]))
    write(tmp_path, fake_report("tcg", "qemu32", [], skip=NO_LONG_MODE))
    assert sweep_merge.exit_status(sweep_merge.merge([tmp_path])) == 0
    write(tmp_path, fake_report("tcg", "EPYC", ["pass", "error"]))  # negative control
    assert sweep_merge.exit_status(sweep_merge.merge([tmp_path])) == 1


def test_merge_refuses_two_reports_for_one_configuration(tmp_path):
    write(tmp_path / "a", fake_report("tcg", "qemu64", ["pass"]))
    write(tmp_path / "b", fake_report("tcg", "qemu64", ["fail"]))
    with pytest.raises(ConfigError, match="two reports"):
        sweep_merge.merge([tmp_path / "a", tmp_path / "b"])
    assert sweep_merge.merge([tmp_path / "a", tmp_path / "a"])["summary"]["configs"] == 1  # same folder twice


def test_an_engine_skipped_as_a_whole_fills_its_column(tmp_path):
    write(tmp_path, fake_report("tcg", "qemu64", ["pass"]))
    write(tmp_path, fake_report("tcg", "EPYC", ["pass"]))
    write(tmp_path, fake_report("kvm", "*", [], skip="KVM not usable: no /dev/kvm"))
    merged = sweep_merge.merge([tmp_path])
    assert set(merged["cells"]) == {"qemu64", "EPYC"}
    assert all(c["kvm"]["skip"] == "KVM not usable: no /dev/kvm" for c in merged["cells"].values())


@pytest.mark.parametrize("width", [80, 100, 120])
def test_table_fits_the_terminal_without_cutting_a_model(two_folders, width):
    merged = sweep_merge.merge(list(two_folders))
    out = io.StringIO()
    sweep_merge.render(merged, Console(file=out, width=width, color_system=None))
    table = [ln for ln in out.getvalue().splitlines() if ln.startswith(("│", "┃", "┏", "└", "┡"))]
    assert table and all(len(ln) <= width for ln in table)
    for row in merged["rows"]:
        assert any(f"│{row['model']} " in ln for ln in table)


def test_junit_has_one_case_per_configuration(two_folders, tmp_path):
    merged = sweep_merge.merge(list(two_folders))
    sweep_merge.write_junit(merged, tmp_path / "m.xml")
    suite = ET.parse(tmp_path / "m.xml").getroot()
    counts = (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped"))
    assert counts == ("6", "1", "1", "1")
    epyc_kvm = suite.find("testcase[@name='EPYC'][@classname='ringlab.sweep.kvm']")
    assert "reproduce: qemu-system-x86_64 -cpu EPYC" in epyc_kvm.find("error").text
    assert "retried as -cpu EPYC,-arch-capabilities" in epyc_kvm.find("system-out").text


def test_html_is_one_static_file(two_folders, tmp_path):
    a, b = two_folders
    write(a, fake_report("tcg", "evil", ["fail"]))
    rep = json.loads((a / "tcg__evil.json").read_text())
    rep["checks"][0]["reason"] = "</script><script>alert(1)</script>"
    report.write_json(rep, a / "tcg__evil.json")
    text = page(sweep_merge.merge([a, b]))
    assert text.count('<tr class="model"') == 5
    assert text.count("</script>") == 2  # a reason cannot end the data element
    assert not re.search(r"""(src|href)=|https?://|@import""", text)  # no external assets


def test_a_partial_sweep_says_so_and_fails_unless_told(two_folders, tmp_path):
    a, b = two_folders
    planned = sorted(p.stem for p in sweep.report_files([a, b])) + ["tcg__Haswell"]
    report.write_json({"configs": planned}, a / sweep.PLAN_NAME)
    merged = sweep_merge.merge([a, b])
    assert merged["completeness"]["partial"] and merged["completeness"]["missing"] == ["tcg__Haswell"]
    console = Console(record=True, width=100)
    sweep_merge.render(merged, console)
    assert "partial sweep: 6 of 7 planned configurations reported; missing: tcg__Haswell" in console.export_text()
    assert 'id="partial"' in page(merged)
    ok = sweep_merge.merge([a])  # a's plan is the whole plan: b's reports are missing from a alone
    assert ok["completeness"]["missing"] == sorted(p.stem for p in sweep.report_files([b])) + ["tcg__Haswell"]
    # only fails and errors count with --partial; without it the partial sweep fails by itself
    clean = tmp_path / "clean"
    write(clean, fake_report("tcg", "qemu64", ["pass"]))
    report.write_json({"configs": ["tcg__qemu64", "tcg__EPYC"]}, clean / sweep.PLAN_NAME)
    merged = sweep_merge.merge([clean])
    assert sweep_merge.exit_status(merged) == 1 and sweep_merge.exit_status(merged, partial_ok=True) == 0
    # negative control: the whole plan reported is not partial
    report.write_json({"configs": ["tcg__qemu64"]}, clean / sweep.PLAN_NAME)
    assert sweep_merge.exit_status(sweep_merge.merge([clean])) == 0


def test_merge_partial_option_through_invoke(tmp_path):
    clean = tmp_path / "clean"
    write(clean, fake_report("tcg", "qemu64", ["pass"]))
    report.write_json({"configs": ["tcg__qemu64", "tcg__EPYC"]}, clean / sweep.PLAN_NAME)
    proc = run_invoke("lab.merge", "--dir", str(clean))
    assert proc.returncode == 1 and "partial sweep: 1 of 2" in proc.stdout
    proc = run_invoke("lab.merge", "--dir", str(clean), "--partial")
    assert proc.returncode == 0 and "partial sweep: 1 of 2" in proc.stdout


def test_a_boot_that_times_out_is_retried_once_with_a_longer_timeout(tmp_path, monkeypatch):
    calls = []

    def attempt(cfg, cpu, art, qemu, kvm, run_dir, witness, timeout_s, meta, retry=True):
        calls.append((run_dir.name, timeout_s))
        rep = fake_report(cfg.accel, cpu, ["pass"] if len(calls) > 1 else ["error"])
        rep["runs"][0]["exit"] = "ok" if len(calls) > 1 else "timeout"
        rep["runs"][0]["exit_detail"] = "" if len(calls) > 1 else "no `end` record within 15.0 s"
        return rep

    monkeypatch.setattr(sweep, "_attempt", attempt)
    rep = sweep.run_config(sweep.SweepConfig("tcg", "qemu64"), art=None, qemu="q", kvm=None, out_dir=tmp_path / "s",
                           timeout_s=15.0)
    assert calls == [("tcg__qemu64", 15.0), ("tcg__qemu64-timeout-retry", 15.0 * sweep.TIMEOUT_RETRY_FACTOR)]
    t = rep[sweep.SWEEP_KEY]["timeout_retry"]
    assert t["timeout_s"] == 15.0 and "within 15.0 s" in t["why"] and not sweep.bad_checks(rep)
    cell = sweep_merge.merge([tmp_path / "s"])["cells"]["qemu64"]["tcg"]
    console = Console(record=True, width=200)
    sweep_merge.render({**sweep_merge.merge([tmp_path / "s"])}, console)
    assert sweep_merge.cell_text(cell).endswith("ʳ") and "retried tcg qemu64 after a timeout" in console.export_text()
    # negative control: a boot that ends in time is not retried; one that times out twice stays an error
    calls.clear()
    monkeypatch.setattr(sweep, "_attempt", lambda *a, **k: (calls.append(1), fake_report("tcg", "qemu64", ["pass"]))[1])
    rep = sweep.run_config(sweep.SweepConfig("tcg", "qemu64"), art=None, qemu="q", kvm=None, out_dir=tmp_path / "t")
    assert calls == [1] and "timeout_retry" not in rep[sweep.SWEEP_KEY]

    def always_timeout(cfg, cpu, *a, **k):
        rep = fake_report("tcg", cpu, ["error"])
        rep["runs"][0]["exit"] = "timeout"
        return rep

    monkeypatch.setattr(sweep, "_attempt", always_timeout)
    rep = sweep.run_config(sweep.SweepConfig("tcg", "qemu64"), art=None, qemu="q", kvm=None, out_dir=tmp_path / "u")
    assert [c["status"] for c in sweep.bad_checks(rep)] == ["error"]


# -- the page in a real browser ------------------------------------------------------------------
CHROMIUM = shutil.which("chromium")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"]


def chromium(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"  # a fresh profile per run
    return subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)


def dom_problems(dom: str, merged: dict, shown: str) -> list[str]:
    rows = re.findall(r'<tr class="model" data-model="([^"]*)"', dom)
    want = [r["model"] for r in merged["rows"]]
    problems = [] if rows == want else [f"rows {rows} != models {want}"]
    detail = re.search(r'<div id="detail" data-shown="([^"]*)">([^<]*)', dom)
    if not detail or detail.group(1) != shown or "reproduce:" not in detail.group(2):
        problems.append(f"the script did not show {shown}: {detail.group(0) if detail else 'no detail box'}")
    return problems


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium; invoke setup)")
def test_page_opens_in_headless_chromium_with_one_row_per_model(two_folders, tmp_path):
    merged = sweep_merge.merge(list(two_folders))
    html = tmp_path / "matrix.html"
    html.write_text(page(merged))
    url = f"{html.as_uri()}#kvm/EPYC"  # the link form of a click on that cell
    shot = tmp_path / "shot.png"
    proc = chromium(tmp_path, "shot", f"--screenshot={shot}", "--window-size=1000,800", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    dom = chromium(tmp_path, "dom", "--dump-dom", url).stdout
    assert dom_problems(dom, merged, "kvm/EPYC") == []
    assert "retried as -cpu EPYC,-arch-capabilities" in dom and "error host.p0: why 0" in dom
    assert re.findall(r'<td class="cell [^"]*\bselected\b[^"]*" data-key="([^"]+)"', dom) == ["kvm/EPYC"]
    assert 'id="legend"' in dom and "nothing failed; a named deviation showed" in dom
    assert 'class="blank" title="tcg did not run qemu64,kvm=off in this sweep' in dom and 'id="blank-note"' in dom

    # A click selects the cell, puts it in the URL and shows its CPUID values and grouped skips.
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page(merged).replace("</body>", "<script>document.querySelector('td[data-key=\"tcg/qemu64\"]')"
                                            ".click(); document.title = location.hash;</script></body>"))
    dom = chromium(tmp_path, "click", "--dump-dom", clicked.as_uri()).stdout
    assert "<title>#tcg/qemu64</title>" in dom and dom_problems(dom, merged, "tcg/qemu64") == []
    assert re.findall(r'<td class="cell [^"]*\bselected\b[^"]*" data-key="([^"]+)"', dom) == ["tcg/qemu64"]
    assert "CPUID seen: host.cpuid-vendor.leaf0=AuthenticAMD" in dom
    assert "skip x2 (e.g. host.p1): not run here" in dom  # two skips, one reason: one line

    # Negative control: a page that lost a model's row, and a link to no configuration.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'<tr class="model" data-model="qemu32">.*?</tr>', "", page(merged), count=1))
    dom = chromium(tmp_path, "broken", "--dump-dom", f"{broken.as_uri()}#tcg/nosuch").stdout
    problems = dom_problems(dom, merged, "tcg/nosuch")
    assert len(problems) == 2 and "rows" in problems[0]
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "profile-") not in ps  # no Chromium left behind


# -- the front doors: bad input ------------------------------------------------------------------
def run_invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ["--accel", "bochs"], ["--tweaks", "nosuch"], ["--witness", "eyes"], ["--workers", "many"],
    ["--timeout", "abc"], ["--splits", "2"], ["--splits", "2", "--group", "3"], ["--variant", "truth"],
    ["--models", "NoSuchModel*"], ["--qemu", "/nonexistent/qemu"],
])
def test_sweep_bad_input_is_one_error_line_and_nothing_created(tmp_path, args):
    out = tmp_path / "sweep"
    proc = run_invoke("lab.sweep", "--out", str(out), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_sweep_out_must_be_a_new_folder(tmp_path, two_folders):
    for out, why in [(tmp_path / "no" / "such", "does not exist"), (two_folders[0], "already holds")]:
        proc = run_invoke("lab.sweep", "--out", str(out))
        assert proc.returncode == 2 and why in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("folder", [None, "/nonexistent/sweep", "EMPTY"])
def test_merge_bad_input_is_one_error_line(tmp_path, folder):
    args = [] if folder is None else ["--dir", str(tmp_path) if folder == "EMPTY" else folder]
    proc = run_invoke("lab.merge", *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written into an empty folder


@pytest.mark.tcg
def test_the_front_door_runs_pytest_then_merges(tmp_path):
    out = tmp_path / "sweep"
    proc = run_invoke("lab.sweep", "--accel", "tcg", "--models", "qemu64,kvm64", "--tweaks", "none",
                      "--witness", "serial", "--workers", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "-m pytest tests/sweep" in proc.stdout and "configurations=2" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["runs", "tcg__kvm64.json", "tcg__qemu64.json", sweep.PLAN_NAME, *sweep_merge.MERGED_NAMES])
    assert json.loads((out / sweep.PLAN_NAME).read_text())["configs"] == ["tcg__kvm64", "tcg__qemu64"]
    assert "partial" not in proc.stdout


@pytest.mark.tcg
def test_sigterm_stops_the_sweep_and_leaves_no_qemu(tmp_path):
    qemu = tmp_path / "qemu-sweep"  # a name of our own, to find this test's QEMUs in ps
    qemu.symlink_to(shutil.which("qemu-system-x86_64"))
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "lab.sweep", "--accel", "tcg", "--tweaks", "none",
                             "--witness", "serial", "--qemu", str(qemu), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.is_dir() and sweep.report_files([out])) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "sweep stopped" in text, text[-2000:]

    def ours() -> list[str]:
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
        return [row for row in ps.splitlines() if str(qemu) in row]

    deadline = time.monotonic() + 5  # a QEMU in the middle of its exit may still be listed
    while ours() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ours() == [], text[-2000:]


def test_merge_writes_json_junit_html_and_fails_on_a_fail(two_folders, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    proc = run_invoke("lab.merge", "--dir", str(two_folders[0]), "--dir", str(two_folders[1]), "--out", str(out))
    assert proc.returncode == 1, proc.stderr  # EPYC fails and errs
    assert sorted(p.name for p in out.iterdir()) == sorted(sweep_merge.MERGED_NAMES)
    assert json.loads((out / "matrix.json").read_text())["summary"]["configs"] == 6


# -- the sweep run itself, spread four ways --------------------------------------------------------
SUBSET = ["--sweep-models=qemu64,Haswell", "--sweep-tweaks=none", "--sweep-witness=serial"]


def sweep_pytest(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", sweep.SWEEP_TESTS, "-q", "-p", "no:cacheprovider", "-p",
           "no:hypothesispytest", f"--sweep-dir={out}", *SUBSET, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.tcg
@pytest.mark.timeout(400)
def test_spreading_the_sweep_does_not_change_the_matrix(tmp_path, artifacts):
    runs = {
        "single": [[]],
        "xdist": [["-n", "2"]],
        "popen-gateways": [["--tx", "2*popen", "--dist", "load"]],
        "split": [["--splits", "2", "--group", "1", f"--durations-path={sweep.DURATIONS}"],
                  ["--splits", "2", "--group", "2", f"--durations-path={sweep.DURATIONS}"]],
    }
    views = {}
    for name, shards in runs.items():
        folders = []
        for i, args in enumerate(shards):
            folder = tmp_path / f"{name}-{i}"
            proc = sweep_pytest(folder, *args)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
            folders.append(folder)
        if name == "split":  # each shard ran a part, together all of it
            parts = [len(sweep.report_files([f])) for f in folders]
            assert all(parts) and sum(parts) == len(sweep.report_files(folders))
            one_shard = sweep_merge.matrix_view(sweep_merge.merge(folders[:1]))  # negative control: a shard missing
        workers = {json.loads(p.read_text())[sweep.SWEEP_KEY]["worker"] for p in sweep.report_files(folders)}
        assert workers == ({"gw0", "gw1"} if name in ("xdist", "popen-gateways") else {""}), name  # really spread
        views[name] = sweep_merge.matrix_view(sweep_merge.merge(folders))
    assert views["single"]["qemu64"]["tcg"][0] in ("pass", "xfail") and len(views["single"]) == 2
    for name, view in views.items():
        assert view == views["single"], name
    assert one_shard != views["single"]


@pytest.mark.tcg
def test_a_failing_configuration_fails_its_sweep_test(tmp_path, lie_artifacts):
    """Negative control: a kernel that lies fails the sweep test and its matrix cell."""
    proc = subprocess.run([sys.executable, "-m", "pytest", sweep.SWEEP_TESTS, "-q", "-p", "no:cacheprovider",
                           f"--sweep-dir={tmp_path}", "--sweep-accel=tcg", "--sweep-models=qemu64",
                           "--sweep-tweaks=none", "--sweep-witness=serial", "--sweep-variant=lie"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-2000:]
    merged = sweep_merge.merge([tmp_path])
    assert merged["cells"]["qemu64"]["tcg"]["status"] == "fail" and sweep_merge.exit_status(merged) == 1


def test_the_committed_durations_name_the_sweep_tests():
    durations = json.loads((ROOT / sweep.DURATIONS).read_text())
    assert durations and all(k.startswith("tests/sweep/test_sweep.py::test_config[") for k in durations)
    assert any("[tcg-qemu64]" in k for k in durations) and any("[kvm-qemu64]" in k for k in durations)


@pytest.mark.tcg
def test_the_sweep_is_collected_only_when_asked(tmp_path):
    def collect(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120).stdout

    assert "test_config[" not in collect("-m", "sweep")  # the default run: not even collected
    asked = collect(sweep.SWEEP_TESTS, f"--sweep-dir={tmp_path}", "--sweep-accel=tcg", "--sweep-models=qemu64",
                    "--sweep-tweaks=none")
    assert "tests/sweep/test_sweep.py::test_config[tcg-qemu64]" in asked


def test_tweaks_set_both_vendors_explicitly_under_kvm():
    """KVM gives a model the host's vendor: only tweaks naming each vendor make both vendors'
    rules run under KVM whatever the host is."""
    from lab.sweep import TWEAKS
    kvm = [t.cpu for t in TWEAKS if "kvm" in t.accels]
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        assert any(f"vendor={vendor},kvm=off" in c for c in kvm)
        assert any(c == f"qemu64,vendor={vendor}" for c in kvm)
