"""Judge one boot: observations (serial, and GDB where it looked) against the plan.

Status only escalates toward the worse; a check with no observation is `error`; two
witnesses that disagree make the check `fail` and the report shows both values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import deviations
from .expectations import Expectation, Facts, plan
from .ids import check_id
from .records import Observation, Transcript

STATUSES = ("pass", "fail", "xfail", "xpass", "skip", "error")
UNREACHED = "unreached"


@dataclass
class Check:
    id: str
    accel: str
    scope: str
    probe: str
    params: dict[str, str]
    expected: str | None
    observed: str | None
    status: str
    reason: str = ""
    rule: str = ""
    witnesses: dict[str, str] = field(default_factory=dict)
    config: str = ""
    details: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "id": self.id,
            "accel": self.accel,
            "config": self.config,
            "scope": self.scope,
            "probe": self.probe,
            "params": self.params,
            "expected": show(self.expected),
            "observed": show(self.observed),
            "witnesses": {k: show(v) for k, v in self.witnesses.items()},
            "status": self.status,
            "reason": self.reason,
            "rule": self.rule,
        }
        if self.details:
            out["details"] = self.details
        return out


def show(value: str | None) -> str | None:
    """Bytes as people read them: NUL as \\0, other unprintables as \\xHH."""
    if value is None:
        return None
    out = []
    for ch in value:
        if ch == "\0":
            out.append("\\0")
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "".join(out)


def judge_one(
    exp: Expectation,
    facts: Facts,
    serial: str | None,
    gdb: str | None,
    *,
    config: str = "",
    details: dict[str, str] | None = None,
    missing_reason: str = "no observation: the probe did not report",
) -> Check:
    check = Check(
        id=exp.id, accel=facts.accel, scope=exp.scope, probe=exp.probe, params=exp.params,
        expected=exp.expected, observed=serial, status="pass", rule=exp.rule, config=config,
        details=details or {},
    )
    dev = deviations.find(facts, exp)
    if exp.skip or (dev is not None and dev.observed is None):
        check.status = "skip"
        check.reason = exp.skip or f"{dev.name}: {dev.reason}"
        return check
    if serial is not None:
        check.witnesses["serial"] = serial
    if gdb is not None:
        check.witnesses["gdb"] = gdb
    if serial is None:
        check.status, check.reason = "error", missing_reason
        return check
    if gdb == UNREACHED:
        check.status = "error"
        check.reason = "GDB witness: breakpoint never reached"
        return check
    if gdb is not None and gdb != serial:
        check.status = "fail"
        check.reason = f"witnesses disagree: serial={show(serial)!s} gdb={show(gdb)!s}"
        return check
    if exp.matches(serial):
        if dev is not None:
            check.status = "xpass"
            check.reason = f"known deviation {dev.name} did not happen: {dev.reason}"
        return check
    if dev is not None and serial == dev.observed:
        check.status, check.reason = "xfail", f"{dev.name}: {dev.reason}"
        return check
    check.status = "fail"
    check.reason = f"expected {show(exp.expected)}, observed {show(serial)}"
    return check


def judge(
    facts: Facts,
    transcript: Transcript,
    *,
    gdb_readings: dict[str, str] | None = None,
    config: str = "",
    boot_exit: str = "ok",
    boot_detail: str = "",
) -> list[Check]:
    """Every planned check, plus `error` checks for anything the firmware reported that the
    plan does not know and for a boot that did not end cleanly."""
    gdb_readings = gdb_readings or {}
    observed: dict[str, list] = {}
    for obs in transcript.observations + _guest_end(transcript):
        observed.setdefault(check_id(obs.scope, obs.probe, obs.params), []).append(obs)

    missing = "no observation: the probe did not report"
    if not transcript.complete or boot_exit != "ok":
        missing += f" (boot {boot_exit}: {boot_detail or '; '.join(transcript.problems)})"

    checks: list[Check] = []
    planned = plan(facts)
    for exp in planned:
        found = observed.get(exp.id, [])
        serial = found[0].value if found else None
        details = found[0].details if found else {}
        check = judge_one(exp, facts, serial, gdb_readings.get(exp.id), config=config,
                          details=details, missing_reason=missing)
        if len(found) > 1 and check.status not in ("skip", "error"):
            check.status, check.reason = "error", f"reported {len(found)} times"
        checks.append(check)

    known = {e.id for e in planned}
    for cid, found in observed.items():
        if cid not in known and not _informational(found[0].probe):
            o = found[0]
            checks.append(Check(cid, facts.accel, o.scope, o.probe, o.params, None, o.value, "error",
                                "observation the lab has no expectation for", config=config))

    checks.append(_integrity(facts, transcript, boot_exit, boot_detail, config))
    return checks


def _guest_end(t: Transcript) -> list[Observation]:
    """How the guest ended (`info guest.end=...`, with the exit code when it was cut short),
    as an observation of its scope: an unknown exit or a guest crash is then an error."""
    info = t.info
    if "guest.end" not in info or "guest.scope" not in info:
        return []
    details = {k: v for k, v in info.items() if k.startswith("guest.exit_") or k in ("guest.rip", "guest.cpl")}
    return [Observation(-1, info["guest.scope"], "guest-end", {}, info["guest.end"], details)]


def _informational(probe: str) -> bool:
    """Records reported for the reader (e.g. extra exit reasons, costs), not judged."""
    return probe in ("vmexit", "trap", "cost")


def _integrity(facts: Facts, t: Transcript, boot_exit: str, detail: str, config: str) -> Check:
    """The boot itself: a clean end record and a clean QEMU exit."""
    ok = t.complete and not t.problems and boot_exit == "ok"
    reason = "" if ok else "; ".join([f"boot {boot_exit}: {detail}"] * (boot_exit != "ok") + t.problems)
    extra = t.info.get("unexpected_exception")
    if extra:
        reason += f"; firmware reported an unexpected exception {extra}"
    return Check(
        id="run.integrity", accel=facts.accel, scope="host", probe="run", params={},
        expected="complete", observed="complete" if ok else boot_exit if boot_exit != "ok" else "incomplete",
        status="pass" if ok else "error", reason=reason.strip("; "),
        rule="docs/records.md: consecutive records, valid checksums, an `end` record, isa-debug-exit 0",
        config=config,
    )


def summarize(checks: list[Check]) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for c in checks:
        out[c.status] += 1
    return out
