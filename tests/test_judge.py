"""The judge, and negative controls: altered observations, wrong expectations, missing
observations and disagreeing witnesses must never pass."""

import dataclasses

from lab import deviations
from lab.expectations import Expectation, Facts, plan
from lab.judge import judge, judge_one, summarize
from lab.records import checksum, parse_stream


def facts(**kw):
    base = dict(accel="tcg", kvm_module=None, vendor="AuthenticAMD", rdtscp=False, svm=False, hypervisor=True)
    base.update(kw)
    return Facts(**base)


def honest_stream(f: Facts, alter: dict[str, str] | None = None, drop: set[str] = frozenset()) -> bytes:
    """A transcript that reports exactly the architectural value for every planned check."""
    alter = alter or {}
    bodies = ["hello proto=1 kernel=test variant=normal"]
    for e in plan(f):
        if e.skip or e.id in drop:
            continue
        value = alter.get(e.id, e.expected if e.expected != ">=1" else "2")
        esc = "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "\\=" else f"\\x{ord(c):02x}" for c in value)
        params = " ".join(f"{k}={v}" for k, v in e.params.items())
        bodies.append(f"obs scope={e.scope} probe={e.probe} {params} obs={esc}".replace("  ", " "))
    bodies.append(f"end count={len(bodies)}")
    out = b""
    for i, b in enumerate(bodies):
        text = f"@@LAB {i} {b}".encode()
        out += text + f" ck={checksum(text):02x}\r\n".encode()
    return out


def statuses(checks):
    return {c.id: c.status for c in checks}


def test_honest_run_passes():
    f = facts()
    s = summarize(judge(f, parse_stream(honest_stream(f))))
    assert s["fail"] == 0 and s["error"] == 0 and s["pass"] > 30


def test_negative_control_altered_observation_fails():
    f = facts()
    checks = judge(f, parse_stream(honest_stream(f, alter={"host.rdtsc.tsd1.cpl3": "ok"})))
    assert statuses(checks)["host.rdtsc.tsd1.cpl3"] == "fail"


def test_negative_control_lying_vendor_fails():
    f = facts()
    checks = judge(f, parse_stream(honest_stream(f, alter={"host.cpuid-vendor.leaf0": "LieLieLieLie"})))
    assert statuses(checks)["host.cpuid-vendor.leaf0"] == "fail"


def test_negative_control_wrong_expectation_fails():
    f = facts()
    wrong = dataclasses.replace(f, vendor="GenuineIntel")  # the lab expects another CPU than it booted
    checks = judge(wrong, parse_stream(honest_stream(f)))
    assert statuses(checks)["host.cpuid-vendor.leaf0"] == "fail"


def test_missing_observation_is_error_never_pass():
    f = facts()
    checks = judge(f, parse_stream(honest_stream(f, drop={"host.cpl-enter.cpl3.iretq"})))
    assert statuses(checks)["host.cpl-enter.cpl3.iretq"] == "error"


def test_empty_console_is_all_error():
    f = facts()
    checks = judge(f, parse_stream(b""), boot_exit="timeout", boot_detail="no end")
    assert all(c.status in ("error", "skip") for c in checks)
    assert statuses(checks)["run.integrity"] == "error"


def test_broken_end_record_makes_the_run_an_error():
    f = facts()
    t = parse_stream(honest_stream(f).replace(b"end count", b"xxx count"))
    assert statuses(judge(f, t))["run.integrity"] == "error"


def test_unplanned_observation_is_error():
    f = facts()
    extra = Expectation("host", "rdtsc", {"tsd": "1", "cpl": "7"}, "ok", "")
    data = honest_stream(f)
    body = b"@@LAB 999 obs scope=host probe=rdtsc tsd=1 cpl=7 obs=ok"
    data += body + f" ck={checksum(body):02x}\r\n".encode()
    # After `end` nothing is read: a record there is no observation, so no check at all.
    assert extra.id not in statuses(judge(f, parse_stream(data)))
    # Inserted before `end` with the right sequence number it is judged, as an error:
    lines = honest_stream(f).splitlines(keepends=True)
    n = len(lines) - 1
    body = f"@@LAB {n} obs scope=host probe=rdtsc tsd=1 cpl=7 obs=ok".encode()
    end = f"@@LAB {n + 1} end count={n + 1}".encode()
    data = b"".join(lines[:-1]) + body + f" ck={checksum(body):02x}\r\n".encode() + end + f" ck={checksum(end):02x}\r\n".encode()
    assert statuses(judge(f, parse_stream(data)))[extra.id] == "error"


def test_known_deviation_is_xfail_with_its_name_and_xpass_when_gone():
    f = facts(accel="kvm", kvm_module="kvm_pvm")
    dev_obs = honest_stream(f, alter={"host.rdtsc.tsd1.cpl3": "ok"})
    st = statuses(judge(f, parse_stream(dev_obs)))
    assert st["host.rdtsc.tsd1.cpl3"] == "xfail"
    assert st["host.rdtsc.tsd1.cpl2"] == "pass"
    gone = statuses(judge(f, parse_stream(honest_stream(f))))
    assert gone["host.rdtsc.tsd1.cpl3"] == "xpass"


def test_deviation_does_not_excuse_a_different_wrong_value():
    f = facts(accel="kvm", kvm_module="kvm_pvm")
    st = statuses(judge(f, parse_stream(honest_stream(f, alter={"host.rdtsc.tsd1.cpl3": "#UD"}))))
    assert st["host.rdtsc.tsd1.cpl3"] == "fail"


def test_deviation_is_keyed_by_the_detected_module():
    f = facts(accel="kvm", kvm_module="kvm_amd")  # hardware KVM: the architecture must hold
    st = statuses(judge(f, parse_stream(honest_stream(f, alter={"host.rdtsc.tsd1.cpl3": "ok"}))))
    assert st["host.rdtsc.tsd1.cpl3"] == "fail"


def test_probes_that_would_hang_qemu_are_skipped_with_reason():
    f = facts(accel="kvm", kvm_module="kvm_pvm")
    # kvm_pvm's KVM internal errors: IRETQ to IOPL 3, RDTSCP, and at CPL1 LAR/LSL/VERR/VERW, call gates, INT n
    assert deviations.skipped_probes("kvm", "kvm_pvm") == ["iopl=3", "pg-call", "pg-int", "pg-jmp", "pg-lar", "pg-lsl",
                                                           "pg-verr", "pg-verw", "rdtscp"]
    assert deviations.skipped_probes("kvm", "kvm_intel") == deviations.skipped_probes("kvm", "kvm_amd") == []
    # A hang that depends on the model is decided only with the model's facts.
    assert deviations.skipped_probes("tcg", None) == []
    assert deviations.skipped_probes("tcg", None, lambda f: False) == ["cr4-reserved"]
    assert deviations.skipped_probes("tcg", None, lambda f: True) == []
    assert deviations.skipped_probes("tcg", "kvm_pvm") == []
    assert deviations.skipped_probes("kvm", "kvm_intel") == []
    checks = judge(f, parse_stream(honest_stream(f)))
    rdtscp = [c for c in checks if c.probe == "rdtscp"]
    assert rdtscp and all(c.status == "skip" and "kvm_pvm" in c.reason for c in rdtscp)


def test_witnesses_disagree_fails_and_shows_both():
    f = facts()
    e = Expectation("host", "rdtsc", {"tsd": "1", "cpl": "3"}, "#GP(0)", "rule")
    c = judge_one(e, f, "#GP(0)", "ok")
    assert c.status == "fail" and "serial=#GP(0)" in c.reason and "gdb=ok" in c.reason
    assert judge_one(e, f, "#GP(0)", "#GP(0)").status == "pass"


def test_unreached_breakpoint_is_error():
    f = facts()
    e = Expectation("host", "cpuid-vendor", {"leaf": "0"}, "AuthenticAMD", "rule")
    assert judge_one(e, f, "AuthenticAMD", "unreached").status == "error"


def test_a_deviation_applies_only_where_the_rule_expects_something_else():
    # kvm_pvm's RDPMC is #GP(0) in every case: where the CPU enumerates no counter (Intel,
    # CPUID.0AH version 0) the rule says #GP(0) too, so the check passes (no xpass by accident);
    # on AMD64 (PerfCtr0-3 always) the rule says `ok` and it is an xfail.
    none = facts(accel="kvm", kvm_module="kvm_pvm", vendor="GenuineIntel", family=6, max_leaf=0xd,
                 pmu_version=0, pmu_counters=0)
    exp = next(e for e in plan(none) if e.id == "host.rdpmc.counter0.pce1.cpl0")
    assert exp.expected == "#GP(0)" and deviations.find(none, exp) is None
    amd = facts(accel="kvm", kvm_module="kvm_pvm", vendor="AuthenticAMD", family=15)
    exp = next(e for e in plan(amd) if e.id == "host.rdpmc.counter0.pce1.cpl0")
    assert exp.expected == "ok" and deviations.find(amd, exp).name == "kvm_pvm-rdpmc-gp"


def test_cpl3_cpuid_faulting_deviation_follows_the_host_cpus_own_faulting():
    """kvm_pvm runs CPL3 natively: CPUID there faults only on a host CPU that faults it (an
    Intel host did, this AMD host does not). Keyed on the detected flag, never on the host's
    name; a hardware KVM emulates faulting at every CPL whatever the host (the rule)."""
    cid = "host.cpuid.faulting1.cpl3"
    native = facts(accel="kvm", kvm_module="kvm_pvm", host_cpuid_fault=False)
    st = statuses(judge(native, parse_stream(honest_stream(native, alter={cid: "ok"}))))
    assert st[cid] == "xfail" and st["host.cpuid.faulting1.cpl2"] == "pass"
    assert statuses(judge(native, parse_stream(honest_stream(native))))[cid] == "xpass"
    # negative controls: a host that faults CPUID itself, or a hardware KVM, must fault at CPL3
    for f in (facts(accel="kvm", kvm_module="kvm_pvm", host_cpuid_fault=True),
              facts(accel="kvm", kvm_module="kvm_amd", host_cpuid_fault=False),
              facts(accel="kvm", kvm_module="kvm_intel", host_cpuid_fault=True)):
        assert statuses(judge(f, parse_stream(honest_stream(f, alter={cid: "ok"}))))[cid] == "fail"


def test_host_cpu_flags_reads_the_first_flags_line(tmp_path):
    from lab.hostinfo import host_cpu_flags
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu tsc cpuid_fault\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert host_cpu_flags(str(info)) == {"fpu", "tsc", "cpuid_fault"}
    assert host_cpu_flags(str(tmp_path / "absent")) == frozenset()
