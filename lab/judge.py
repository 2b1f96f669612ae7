"""Judge one boot: observations (serial, and GDB where it looked) against the plan.

Status only escalates toward the worse; a check with no observation is `error`; two
witnesses that disagree make the check `fail` and the report shows both values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import deviations
from .expectations import CPU_FACTS, Expectation, Facts, plan, show_fact
from .ids import check_id
from .records import Observation, Transcript

STATUSES = ("pass", "fail", "xfail", "xpass", "skip", "error")
# What a skip follows from (a check's `cause`, docs/records.md): the CPU model or engine lacks
# the feature, the host mode runs another scope, a named deviation would break the boot, or
# the run asked for other probes only (--only).
DEVIATION, NOT_ASKED = "deviation", "not-asked"
SKIP_CAUSES = ("cpu-model", "setup", DEVIATION, NOT_ASKED)
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
    cause: str = ""  # a skip's source: SKIP_CAUSES

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
        if self.status == "skip" and self.cause:
            out["cause"] = self.cause
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
    witness: str = "both",
    evidence: dict | None = None,
) -> Check:
    """`witness`: both (either witness can fail a check; they must agree), gdb (GDB's reading
    decides where it has one; the serial record only says what ran), serial (GDB unused)."""
    check = Check(
        id=exp.id, accel=facts.accel, scope=exp.scope, probe=exp.probe, params=exp.params,
        expected=exp.expected, observed=serial, status="pass", rule=exp.rule, config=config,
        details=dict(details or {}),
    )
    dev = deviations.find(facts, exp)
    if exp.skip or (dev is not None and dev.observed is None):
        check.status = "skip"
        check.reason = exp.skip or f"{dev.name}: {dev.reason}"
        check.cause = exp.skip_cause if exp.skip else DEVIATION
        return check
    if serial is not None:
        check.witnesses["serial"] = serial
    if gdb is not None and witness != "serial":
        check.witnesses["gdb"] = gdb
        if evidence:
            # What GDB saw of it (the instruction and its delivery, or the trap only) and, where the
            # accelerator keeps it from the instruction, the links of the chain it could not see.
            shown = {k: v for k, v in evidence.items() if k not in ("saw", "missing")}
            check.details["gdb.evidence"] = " ".join(f"{k}={v}" for k, v in shown.items())
            for key in ("saw", "missing"):
                if key in evidence:
                    check.details[f"gdb.{key}"] = evidence[key]
    else:
        gdb = None
    if serial is None:
        check.status, check.reason = "error", missing_reason
        return check
    if gdb == UNREACHED:
        check.status = "error"
        check.reason = "GDB witness: the session ended before it could look" + (
            f" ({evidence['error']})" if evidence and evidence.get("error") else "")
        return check
    if gdb is not None and gdb != serial and witness == "both":
        check.status = "fail"
        check.reason = f"witnesses disagree: serial={show(serial)!s} gdb={show(gdb)!s}"
        return check
    observed = gdb if (witness == "gdb" and gdb is not None) else serial
    check.observed = observed
    if exp.matches(observed):
        if dev is not None and dev.observed != deviations.ANY:  # a comparison that agrees is a pass
            check.status = "xpass"
            check.reason = f"known deviation {dev.name} did not happen: {dev.reason}"
        return check
    if dev is not None and dev.matches(observed):
        check.status, check.reason = "xfail", f"{dev.name}: {dev.reason}"
        if dev.observed == deviations.ANY:
            check.reason += f": {exp.params.get('fact', exp.probe)} configured {show(exp.expected)}, CPU {show(observed)}"
        return check
    check.status = "fail"
    by = " (GDB's reading)" if observed is gdb and gdb is not None else ""
    check.reason = f"expected {show(exp.expected)}, observed {show(observed)}{by}"
    return check


def judge(
    facts: Facts,
    transcript: Transcript,
    *,
    gdb_readings: dict | None = None,
    witness: str = "both",
    config: str = "",
    boot_exit: str = "ok",
    boot_detail: str = "",
) -> list[Check]:
    """Every planned check, plus `error` checks for anything the firmware reported that the
    plan does not know and for a boot that did not end cleanly. `gdb_readings`: check id ->
    lab.witness.Reading (or a bare value); `witness`: the run's witness mode."""
    gdb_readings = {k: (v if hasattr(v, "value") else _Bare(v)) for k, v in (gdb_readings or {}).items()}
    observed: dict[str, list] = {}
    for obs in transcript.observations + _guest_end(transcript):
        observed.setdefault(check_id(obs.scope, obs.probe, obs.params), []).append(obs)

    missing = "no observation: the probe did not report"
    if not transcript.complete or boot_exit != "ok":
        missing += f" (boot {boot_exit}: {boot_detail or '; '.join(transcript.problems)})"

    checks: list[Check] = []
    planned = plan(facts, transcript.info)
    for obs in _cpu_facts(facts, transcript):
        observed.setdefault(check_id(obs.scope, obs.probe, obs.params), []).append(obs)
    # The rules judge the CPU's facts (Facts.seen); where that changes a check's expectation
    # or skip from the configuration's, the check says which facts did.
    seen = facts.seen(transcript.info)
    configured = {e.id: e for e in plan(facts)}
    changed = "; ".join(f"{f} configured {a}, CPU {b}" for f, a, b in seen.from_cpu)
    for exp in planned:
        found = observed.get(exp.id, [])
        serial = found[0].value if found else None
        details = found[0].details if found else {}
        reading = gdb_readings.get(exp.id)
        was = configured.get(exp.id)
        if changed and was is not None and (was.expected, was.skip) != (exp.expected, exp.skip):
            details = {**details, "cpu-facts": f"judged on the CPU's facts ({changed})"}
        check = judge_one(exp, seen, serial, reading.value if reading else None, config=config,
                          details=details, missing_reason=missing, witness=witness,
                          evidence=reading.detail if reading else None)
        if len(found) > 1 and check.status not in ("skip", "error"):
            check.status, check.reason = "error", f"reported {len(found)} times"
        checks.append(check)

    known = {e.id for e in planned}
    for cid, found in observed.items():
        if cid not in known and not _informational(found[0].probe):
            o = found[0]
            checks.append(Check(cid, facts.accel, o.scope, o.probe, o.params, None, o.value, "error",
                                "observation the lab has no expectation for", config=config))

    if witness != "serial":
        # GDB saw the CPU run a probe at a point (CPL, gate) no check of this boot expects.
        for cid, reading in gdb_readings.items():
            if cid not in known:
                checks.append(Check(cid, facts.accel, cid.split(".")[0], cid.split(".")[1], {}, None, None, "fail",
                                    f"witnesses disagree: GDB saw the CPU execute {cid} ({reading.value}), "
                                    "which no record reports", witnesses={"gdb": reading.value}, config=config,
                                    details={"gdb.evidence": " ".join(f"{k}={v}" for k, v in reading.detail.items())}))
    checks.append(_integrity(facts, transcript, boot_exit, boot_detail, config))
    return checks


@dataclass
class _Bare:
    """A reading given as a bare value (tests, older callers)."""

    value: str
    detail: dict = field(default_factory=dict)


def _guest_end(t: Transcript) -> list[Observation]:
    """How the guest ended (`info guest.end=...`, with the exit code when it was cut short),
    as an observation of its scope: an unknown exit or a guest crash is then an error."""
    info = t.info
    if "guest.end" not in info or "guest.scope" not in info:
        return []
    details = {k: v for k, v in info.items() if k.startswith("guest.exit_") or k in ("guest.rip", "guest.cpl")}
    return [Observation(-1, info["guest.scope"], "guest-end", {}, info["guest.end"], details)]


def _cpu_facts(facts: Facts, t: Transcript) -> list[Observation]:
    """What the CPU answered for each fact the configuration states (`info cpuid.*`,
    firmware/cpuinfo.c), as the `cpu-fact` observations (lab/expectations.py cpu_fact_plan)."""
    seen = facts.seen(t.info)
    return [Observation(-1, "host", "cpu-fact", {"fact": f}, show_fact(seen.configured(f)), {})
            for f, (key, _) in CPU_FACTS.items() if f in facts.stated and key in t.info]


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
