"""The lab's three questions, answered from one run's checks (README "What the experiment says"):
does RDTSC fault at CPL3 with CR4.TSD=1; which vendor string and hypervisor signature the host
and its guest see; is the host kernel itself a guest, and what sits below the guest.

Every answer is read from the checks' ids, observed values and statuses (lab/report.py's
dict), never written ahead: a check that fails, a deviation, a skip or another engine changes
the sentence. Nothing here judges; the status in brackets is the judge's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .console import SCOPE_TITLE

RDTSC_ROW = "rdtsc.tsd1.cpl3"  # SDM Vol. 2B RDTSC: #GP(0) if CR4.TSD=1 and CPL>0
VENDOR_ROW, HV_BIT_ROW, SIGNATURE_ROW = "cpuid-vendor.leaf0", "cpuid-hv-bit", "cpuid-hv-signature"
# Who answers CPUID 0x40000000 with these bytes (EBX, ECX, EDX; APM Vol. 3 App. E), as the
# report shows them (lab/judge.py show()).
KNOWN_SIGNATURES = {
    "TCGTCGTCGTCG": "QEMU's TCG",
    "KVMKVMKVM\\0\\0\\0": "KVM",
    "Microsoft Hv": "Hyper-V",
    "VMwareVMware": "VMware",
    "XenVMMXenVMM": "Xen",
    "VBoxVBoxVBox": "VirtualBox",
    "bhyve bhyve ": "bhyve",
    "ACRNACRNACRN": "ACRN",
}
ZEROS = "\\0" * 12
# How each guest scope's host runs the guest (firmware/README.md).
GUEST_HOST = {"guest-svm": "the lab's host kernel through SVM",
              "guest-vmx": "the lab's host kernel through VMX",
              "guest-soft": "the lab's software host (ring compression)"}


@dataclass
class Answer:
    config: str
    lines: list[tuple[str, str]]  # (worst status of the line's checks, text); [] : nothing observed


def _verdict(check: dict) -> str:
    """The judge's word for a check, readable without colour."""
    st = check["status"]
    if st == "pass":
        return "pass"
    if st in ("xfail", "xpass"):
        return f"xfail: {check['reason'].split(':', 1)[0]}" if st == "xfail" else "xpass"
    if st == "fail":
        if check["reason"].startswith("witnesses disagree"):  # the value is in doubt, not the rule
            return f"FAIL: {check['reason']}"
        return f"FAIL, the rule says {check['expected']}"
    if st == "skip":
        return f"not run: {check['reason']}"
    return f"ERROR: {check['reason'].split(' (', 1)[0]}"  # the boot's own cause is printed below the table


WORSE = ("pass", "skip", "xpass", "xfail", "fail", "error")


def _worst(checks: list[dict]) -> str:
    return max((c["status"] for c in checks), key=WORSE.index, default="skip")


def _ran(checks: dict[str, dict], scope: str) -> bool:
    """A guest scope ran when any of its checks is not a skip."""
    return any(k.startswith(scope + ".") and c["status"] != "skip" for k, c in checks.items())


def _title(scope: str) -> str:
    return SCOPE_TITLE.get(scope, scope)


def _rdtsc(checks: dict[str, dict], scopes: list[str]) -> tuple[str, str]:
    found = [(s, checks[f"{s}.{RDTSC_ROW}"]) for s in scopes if f"{s}.{RDTSC_ROW}" in checks]
    if not found:
        return "skip", "RDTSC at CPL3, CR4.TSD=1: not checked in this run"
    groups: dict[tuple, list[str]] = {}
    for s, c in found:
        groups.setdefault((c["observed"], c["status"], _verdict(c)), []).append(s)
    parts = []
    for (observed, status, verdict), where in groups.items():
        if status == "skip" or observed is None:
            what = "no answer"
        elif observed.startswith("#"):
            what = f"faults {observed}"
        elif observed == "ok":
            what = "ok, no fault"
        else:
            what = f"observed {observed}"
        parts.append(f"{what} in {', '.join(_title(s) for s in where)} [{verdict}]")
    return _worst([c for _, c in found]), f"RDTSC at CPL3, CR4.TSD=1 ({RDTSC_ROW}): " + "; ".join(parts)


def _vendor_signature(checks: dict[str, dict], scopes: list[str]) -> tuple[str, str]:
    parts, seen = [], []
    for s in scopes:
        vendor, sig = checks.get(f"{s}.{VENDOR_ROW}"), checks.get(f"{s}.{SIGNATURE_ROW}")
        got = [c for c in (vendor, sig) if c is not None and c["status"] != "skip"]
        if not got:
            continue
        seen += got
        values = " ".join(c["observed"] or "—" for c in got)
        bad = [f"{c['id'].split('.', 1)[1]} {_verdict(c)}" for c in got if c["status"] != "pass"]
        parts.append(f"{_title(s)} {values}" + (f" [{'; '.join(bad)}]" if bad else ""))
    if not parts:
        return "skip", "vendor, hypervisor signature: not checked in this run"
    tail = " [pass]" if all(c["status"] == "pass" for c in seen) else ""
    return _worst(seen), "vendor, signature: " + "; ".join(parts) + tail


def _hypervisor_name(signature: str | None) -> str:
    if signature is None:
        return "no signature read"
    if signature == ZEROS:
        return "leaf 0x40000000 all zeros: it does not name itself"
    return KNOWN_SIGNATURES.get(signature, f"a hypervisor signing {signature}")


def _host_a_guest(checks: dict[str, dict]) -> tuple[str, str]:
    """CPUID.1:ECX[31] (APM Vol. 3 E.3.2) and leaf 0x40000000 (APM Vol. 3 App. E) as the host reads them."""
    bit, sig = checks.get(f"host.{HV_BIT_ROW}"), checks.get(f"host.{SIGNATURE_ROW}")
    used = [c for c in (bit, sig) if c is not None]
    if bit is None or bit["status"] == "skip" or bit["observed"] is None:
        text = "host itself a guest? not checked in this run"
    elif bit["observed"] == "1":
        got = sig["observed"] if sig and sig["status"] != "skip" else None
        text = f"host itself a guest? yes: hypervisor bit 1, leaf 0x40000000 {got or '—'} ({_hypervisor_name(got)})"
    elif bit["observed"] == "0":
        text = "host itself a guest? no sign of it: hypervisor bit 0"
    else:
        text = f"host itself a guest? the hypervisor bit reads {bit['observed']}"
    bad = [f"{c['id'].split('.', 1)[1]} {_verdict(c)}" for c in used if c["status"] != "pass"]
    text += f" [{'; '.join(bad)}]" if bad else " [pass]" if used else ""
    return _worst(used), text


def _below(checks: dict[str, dict], scopes: list[str]) -> tuple[str, str]:
    """The guest's host (the scope that ran) and the guest kernel's CPL as its CS reads it."""
    guests = [s for s in scopes if s != "host" and _ran(checks, s)]
    if not guests:
        return "skip", "below the guest: no guest ran"
    names, used = [], []
    for s in guests:
        cpl = next((c for k, c in checks.items() if k.startswith(f"{s}.cpl-enter.") and not k.endswith(".iretq")), None)
        at = ""
        if cpl is not None and cpl["observed"] is not None:
            used.append(cpl)
            at = f"guest kernel at CPL{cpl['observed']}" + (f" [{_verdict(cpl)}]" if cpl["status"] != "pass" else "")
        host = GUEST_HOST.get(s, s)
        names.append(f"{host[:-1]}; {at})" if host.endswith(")") and at else f"{host} ({at})" if at else host)
    text = "below the guest: " + "; ".join(names)
    bit, sig = checks.get(f"host.{HV_BIT_ROW}"), checks.get(f"host.{SIGNATURE_ROW}")
    if bit is not None and bit["observed"] == "1" and sig is not None and sig["observed"] is not None:
        text += f", below it {_hypervisor_name(sig['observed'])}"
    return _worst(used) if used else "pass", text


def answers(report: dict) -> list[Answer]:
    """Per configuration (in the report's order): the three answers, each with its status."""
    by_config: dict[str, dict[str, dict]] = {}
    for c in report["checks"]:
        by_config.setdefault(c["config"], {})[c["id"]] = c
    out = []
    for config, checks in by_config.items():
        scopes = list(dict.fromkeys(k.split(".", 1)[0] for k in checks if not k.startswith("run.")))
        if not scopes:
            continue  # a configuration that never booted: its own line says why
        scopes = [s for s in scopes if s == "host" or _ran(checks, s)]
        asked = [c for k, c in checks.items() if k.split(".", 1)[-1] in (RDTSC_ROW, VENDOR_ROW, HV_BIT_ROW, SIGNATURE_ROW)]
        if asked and all(c["observed"] is None for c in asked):
            out.append(Answer(config, []))  # a boot that died or a run of other probes: said once
            continue
        out.append(Answer(config, [_rdtsc(checks, scopes), _vendor_signature(checks, scopes),
                                   _host_a_guest(checks), _below(checks, scopes)]))
    return out
