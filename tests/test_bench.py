"""`invoke bench` without timing anything: targets are figures (exit 1 only with --check),
and the README's performance block is generated from a bench.json."""

from __future__ import annotations

import json

import pytest

from lab import bench
from lab.config import ConfigError


MET = round(bench.TARGETS["full_run_s"] * 0.9, 2)  # figures on either side of the targets
MISSED = round(bench.TARGETS["full_run_s"] * 1.5, 2)


def figures(full_s: float = MET) -> dict:
    st = lambda m: {"median": m, "min": m, "max": m, "n": 5}  # noqa: E731
    r = {"rounds": 5, "date": "2026-11-29", "kvm_module": "kvm_pvm", "targets": bench.TARGETS, "full_run_s": st(full_s),
         "accels": {"tcg": {"floor_s": st(0.064), "lab_serial_s": st(0.062), "lab_gdb_s": st(0.34),
                            "pc_serial_s": st(0.1), "naive_s": st(3.7), "naive_boots": 55, "lab_over_floor": 0.969,
                            "gdb_added_s": bench.TARGETS["gdb_added_s"] / 2, "naive_over_lab": 59.7, "pc_over_microvm": 1.66,
                            "guest_costs_cycles": {"cost.cpuid.native_cycles": 86, "cost.cpuid.vmexit_cycles": 27462}}}}
    r["verdicts"] = bench._verdicts(r)
    return r


def test_block_shows_the_figures():
    block = bench.readme_block(figures())
    gdb = bench.TARGETS["gdb_added_s"] / 2
    assert f"| TCG | 0.064 s | 0.062 s (0.97x floor) | {gdb:+.2f} s | 3.7 s (60x lab, 55 boots) | 1.7x microvm |" in block
    assert f"{MET:.2f} s wall" in block and "86 TSC cycles native, 27,462 through #VMEXIT" in block
    assert f"full run <= {bench.TARGETS['full_run_s']} s: {MET} (met)" in block
    missed = bench.readme_block(figures(full_s=MISSED))  # a missed target shows as a figure
    assert f"full run <= {bench.TARGETS['full_run_s']} s: {MISSED} (missed)" in missed
    assert "load average" not in block
    assert "stops a boot" not in block  # a bench.json from before the per-stop figures
    per_stop = {**figures()}
    per_stop["accels"] = {"tcg": {**figures()["accels"]["tcg"], "gdb_stops": 166, "gdb_per_stop_ms": 1.81}}
    assert "GDB witness: TCG 166 stops a boot, 1.81 ms a stop." in bench.readme_block(per_stop)
    per_stop["accels"]["tcg"].update(gdb_bare_stops=180, gdb_bare_stop_ms=1.2, gdb_reading_s=0.09)
    assert ("GDB witness: TCG 166 stops a boot, 1.81 ms a stop (the plan's stops reading nothing: 180 stops, "
            "1.20 ms a stop; the reading adds +0.09 s a boot).") in bench.readme_block(per_stop)
    assert "load average 3.9 on 2 cores" in bench.readme_block({**figures(), "load_1min": 3.9, "cores": 2})


def test_update_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{bench.README_BEGIN}\nold figures\n{bench.README_END}\nafter\n")
    bench.update_readme_block(readme, figures())
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{bench.README_END}\nafter\n")
    assert "old figures" not in text and f"{MET:.2f} s wall" in text
    bench.update_readme_block(readme, figures(full_s=MISSED))  # idempotent: the block is found again
    assert f"{MISSED:.2f} s wall" in readme.read_text() and f"{MET:.2f} s wall" not in readme.read_text()


def test_update_needs_exactly_one_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ConfigError, match="exactly one block"):
        bench.update_readme_block(readme, figures())
    assert readme.read_text() == "# no markers\n"


def test_the_project_readme_has_the_block():
    text = (bench.ROOT / "README.md").read_text()
    assert text.count(bench.README_BEGIN) == 1 and text.count(bench.README_END) == 1


@pytest.mark.parametrize("full_s,check,status", [(MISSED, False, 0), (MISSED, True, 1), (MET, True, 0)])
def test_missed_target_fails_only_with_check(tmp_path, full_s, check, status):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(figures(full_s)))
    assert bench.main(check=check, from_json=str(path)) == status


def test_from_json_that_is_not_a_bench_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a bench.json"):
        bench.main(from_json=str(path))


def test_last_bench_is_the_newest(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    with pytest.raises(ConfigError, match="no bench under runs/"):
        bench.last_bench()
    for stamp in ("20260101-000000-7", "20260102-000000-3"):
        folder = tmp_path / "runs" / f"bench-{stamp}"
        folder.mkdir(parents=True)
        (folder / "bench.json").write_text(json.dumps(figures()))
    assert bench.last_bench() == tmp_path / "runs" / "bench-20260102-000000-3" / "bench.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.README_BEGIN}\n{bench.README_END}\n")
    assert bench.main(update_readme=True, from_json="last") == 0
    assert f"{MET:.2f} s wall" in readme.read_text()
