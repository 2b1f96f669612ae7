"""The probe catalogue (lab/catalogue.py) is the one declaration of a probe: the firmware's
table, the expectations, the witness plan and the docs derive from it, and adding a probe
is one entry."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import catalogue
from lab.build import ROOT, build_dir
from lab.expectations import Facts, plan

ENTRY = '''
CATALOGUE += (
    Probe("smsw-mem", "smsw-mem", "outcome", Stub("smsw_mem", "smsw -16(%rsp)"), (("umip", (0, 1)), ("cpl", CPLS)),
          "cpl_gate", "SDM Vol. 3A 2.5 (CR4.UMIP); SDM Vol. 2B SMSW", "SMSW to memory under CR4.UMIP",
          gate=CR4_UMIP),
)
'''


def test_the_docs_tables_are_the_catalogue():
    for name in catalogue.DOCS:
        text = (ROOT / name).read_text()
        assert text == catalogue.docs_text(text), f"{name}: run python3 -m lab.catalogue --docs"


def test_the_firmware_table_is_generated_from_the_catalogue(artifacts):
    built = {name: (build_dir("normal") / name).read_text() for name in ("probes.gen.h", "probes.gen.S")}
    assert built == catalogue.firmware_sources()
    header = built["probes.gen.h"]
    for row in catalogue.table_rows():
        assert f'"{row.probe}"' in header
    assert header.count("\n    { \"host\"") == len(catalogue.table_rows())
    for stub in catalogue.stubs():
        assert f"probe_insn_{stub.name}:" in built["probes.gen.S"]


def test_every_host_row_has_a_rule_and_a_reference():
    f = Facts("tcg", None, "AuthenticAMD", False, True, True)
    exps = {e.id: e for e in plan(f)}
    for row in catalogue.rows("host"):
        assert row.id in exps and exps[row.id].rule == row.entry.ref and row.entry.ref


def test_one_stub_name_one_body(monkeypatch):
    extra = catalogue.Probe("x", "x", "outcome", catalogue.Stub("rdtsc", "nop"), (("cpl", (0,)),), "privileged",
                            "-", "-")
    monkeypatch.setattr(catalogue, "CATALOGUE", catalogue.CATALOGUE + (extra,))
    with pytest.raises(ValueError, match="declared twice"):
        catalogue.stubs()


def copy_of_the_repository(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith("runs/"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


SCRIPT = '''
import json, sys
from pathlib import Path
from lab import build, catalogue
from lab.hostinfo import kvm_status, qemu_binary
from lab.runner import make_config, preboot, run_one
kvm = kvm_status()
cfg = make_config("tcg", build.build(), qemu=qemu_binary(), kvm=kvm, cpu=sys.argv[1])
cfg = preboot(cfg).cfg
out = run_one(cfg, Path(sys.argv[2]), kvm, "both")
docs = catalogue.docs_text((Path("docs") / "probes.md").read_text())
print(json.dumps({"checks": [c.as_dict() for c in out.checks], "args": list(cfg.kernel_args),
                  "docs": "`smsw-mem`" in docs}))
'''


@pytest.mark.tcg
@pytest.mark.gdb
@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_adding_a_probe_is_one_catalogue_entry(tmp_path, no_leftovers):
    """docs/probes.md "Adding a probe", done to a copy of the repository: one entry, no other
    file touched; the new rows are built, run, judged and witnessed."""
    repo = copy_of_the_repository(tmp_path / "repo")
    cat = repo / "lab" / "catalogue.py"
    text = cat.read_text()
    anchor = "# What the `lie` build reports instead of the truth"
    cat.write_text(text.replace(anchor, ENTRY + "\n" + anchor, 1))

    def run(cpu):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, cpu, str(tmp_path / cpu.replace(",", "_"))],
                              cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    got = run("max")  # TCG's `max` offers UMIP
    new = {c["id"]: c for c in got["checks"] if c["probe"] == "smsw-mem"}
    assert len(new) == 8 and got["docs"]
    for cid, c in new.items():
        want = "#GP(0)" if c["params"]["umip"] == "1" and c["params"]["cpl"] != "0" else "ok"
        assert c["expected"] == want and c["status"] == "pass", c
        assert c["witnesses"] == {"serial": want, "gdb": want}, c  # GDB read it from the CPU
    # A model without UMIP: the bit is reserved; the firmware skips the family on its own CPUID
    # read (firmware/probe.c), and the lab's skip says the CPU reported no UMIP.
    got = run("qemu64,+svm")
    skips = {c["reason"] for c in got["checks"] if c["probe"] == "smsw-mem"}
    assert {c["status"] for c in got["checks"] if c["probe"] == "smsw-mem"} == {"skip"}
    assert skips and all("as the CPU reported it" in r for r in skips), skips
    assert not [c for c in got["checks"] if c["status"] in ("fail", "error")]
