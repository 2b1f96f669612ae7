"""Reports in standard formats: the JSON contract of DESIGN.md, JUnit XML, TAP 13 and Markdown."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from .judge import Check, summarize


def build(lab_version: str, host: dict, runs: list[dict], checks: list[Check], witness: str = "both") -> dict:
    return {
        "lab_version": lab_version,
        "witness": witness,  # serial | gdb | both: who judged (docs/gdb.md)
        "host": host,
        "runs": runs,
        "checks": [c.as_dict() for c in checks],
        "summary": summarize(checks),
    }


def check_target(path: str, flag: str) -> Path:
    """A report path the user named, checked before any boot: its folder exists and takes a
    new file, and the path itself is not a folder. Raises ConfigError; creates nothing."""
    from .config import ConfigError

    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; name a file in it, e.g. {target / 'report.json'}")
    folder = target.parent
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ConfigError(f"{flag} {path}: {folder} {what}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable")
    try:  # the real test (root, read-only filesystems): create and remove a temp file there
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {folder} ({exc.strerror})") from None
    return target


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temp file in the target's own folder (a rename is atomic only within
    one filesystem), readable like any file the user writes (0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without setting it (os.umask would race other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_json(report: dict, path: Path) -> None:
    _atomic_write(path, json_text(report))


def json_text(report: dict) -> str:
    """The report as JSON, one top-level key per line and one list item (a check, a run) per
    line: as easy to grep and diff as an indented dump, and written by the C encoder (an
    indented dump goes through the pure-Python one: ~3x the time for a full run's report)."""
    parts = []
    for key, value in report.items():
        if isinstance(value, list) and value:
            body = "[\n" + ",\n".join("    " + json.dumps(item) for item in value) + "\n  ]"
        else:
            body = json.dumps(value)
        parts.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _case_name(check: dict) -> str:
    return f"{check['config'] or check['accel']}: {check['id']}"


def write_junit(report: dict, path: Path) -> None:
    """One testcase per check; fail -> <failure>, error -> <error>, skip/xfail -> <skipped>."""
    s = report["summary"]
    suite = ET.Element(
        "testsuite", name="ring-lab", tests=str(len(report["checks"])),
        failures=str(s["fail"]), errors=str(s["error"]), skipped=str(s["skip"] + s["xfail"]),
    )
    logs = {r.get("config"): r.get("log") for r in report["runs"]}
    for c in report["checks"]:
        case = ET.SubElement(suite, "testcase", classname=f"ringlab.{c['accel']}.{c['scope']}", name=_case_name(c))
        text = f"expected={c['expected']} observed={c['observed']} witnesses={c['witnesses']}\nlog: {logs.get(c['config'])}"
        if c["status"] == "fail":
            ET.SubElement(case, "failure", message=c["reason"]).text = text
        elif c["status"] == "error":
            ET.SubElement(case, "error", message=c["reason"]).text = text
        elif c["status"] in ("skip", "xfail"):
            ET.SubElement(case, "skipped", message=f"{c['status']}: {c['reason']}")
        elif c["status"] == "xpass":
            ET.SubElement(case, "system-out").text = f"xpass: {c['reason']}"
    ET.indent(suite)
    _atomic_write(path, ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n")


def _tap_text(value) -> str:
    """A TAP description's text: `#` starts a directive there, so it is escaped (TAP 13)."""
    return str(value).replace("\\", "\\\\").replace("#", "\\#")


def tap(report: dict) -> str:
    """TAP 13: skip and xfail as # SKIP / # TODO, so TAP consumers count them right; every
    line names what was expected and observed."""
    lines = ["TAP version 13", f"1..{len(report['checks'])}"]
    for n, c in enumerate(report["checks"], 1):
        ok = c["status"] in ("pass", "skip", "xfail", "xpass")
        line = f"{'ok' if ok else 'not ok'} {n} - {_tap_text(_case_name(c))}"
        if c["status"] != "skip":
            line += f": expected {_tap_text(c['expected'])}, observed {_tap_text(c['observed'])}"
        if c["status"] == "skip":
            line += f" # SKIP {c['reason']}"
        elif c["status"] in ("xfail", "xpass"):
            line += f" # TODO {c['status']}: {c['reason']}"
        lines.append(line)
        if not ok:
            lines += ["  ---", f"  status: {c['status']}", f"  expected: {json.dumps(c['expected'])}",
                      f"  observed: {json.dumps(c['observed'])}", f"  reason: {json.dumps(c['reason'])}", "  ..."]
    return "\n".join(lines) + "\n"


def _md(value) -> str:
    """A Markdown table cell: `|` and newlines would end it; backticks keep values literal."""
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """The run as Markdown: the header, the answers (lab/answers.py), the summary, then one
    table per configuration with every check (expected, observed, status, reason, rule)."""
    from .answers import answers

    h = report["host"]
    s = report["summary"]
    out = [f"# ring-lab {report['lab_version']}", "",
           f"QEMU {h['qemu']}, KVM module {h['kvm_module'] or 'none'}, witness {report.get('witness', 'both')}"
           + (f", only {', '.join(report['only'])}" if report.get("only") else ""), "",
           "**" + "  ".join(f"{k}={v}" for k, v in s.items()) + "**", ""]
    found = [a for a in answers(report) if a.lines]
    if found:
        out += ["## Answers", ""]
        for a in found:
            out.append(f"- `{a.config}`")
            out += [f"  - {_md(text)}" for _, text in a.lines]
        out.append("")
    configs = list(dict.fromkeys(c["config"] for c in report["checks"]))
    for config in configs:
        out += [f"## `{config}`", "", "| check | expected | observed | status | reason | rule |",
                "|---|---|---|---|---|---|"]
        out += [f"| `{_md(c['id'])}` | `{_md(c['expected'])}` | `{_md(c['observed'])}` | {c['status']} | "
                f"{_md(c['reason'])} | {_md(c['rule'])} |" for c in report["checks"] if c["config"] == config]
        out.append("")
    runs = report.get("runs", [])
    if runs:
        out += ["## Boots", ""]
        out += [f"- `{r['config']}`: exit {r['exit']}, {r['wall_s']} s, log `{r['log']}`" for r in runs]
        out.append("")
    return "\n".join(out)


def write_markdown(report: dict, path: Path) -> None:
    _atomic_write(path, markdown(report))
