"""A short soak in CI (the long one is `invoke soak`, 100 rounds): the full matrix, both
witnesses, several times, with no status changing between rounds and nothing left behind."""

import pytest
from rich.console import Console

from lab.cli import RunOptions
from lab.soak import soak


@pytest.mark.tcg
@pytest.mark.usefixtures("no_leftovers", "artifacts")
def test_short_soak_has_no_flake(tmp_path):
    result = soak(3, RunOptions(accel="all", witness="both", quiet=True), Console(file=open(tmp_path / "log", "w")),
                  root=tmp_path / "soak")
    assert result["rounds"] == 3
    assert result["failed_rounds"] == [] and result["flaky_checks"] == {}
    assert list((tmp_path / "soak").iterdir()) == []  # rounds that passed leave nothing


def fake_rounds(monkeypatch, statuses):
    rounds = iter(statuses)

    def fake_run_lab(opts, console):
        st = next(rounds)
        from pathlib import Path

        Path(opts.runs_dir, "run", "serial.log").parent.mkdir(parents=True)
        Path(opts.runs_dir, "run", "serial.log").write_text("@@LAB 0 hello\n")
        return (1 if st == "error" else 0), {"checks": [{"config": "tcg", "id": "host.x", "status": st,
                                                          "reason": "no observation"}]}

    monkeypatch.setattr("lab.soak.run_lab", fake_run_lab)


def test_negative_control_a_status_that_changes_is_a_flake(monkeypatch, tmp_path):
    fake_rounds(monkeypatch, ["pass", "xfail", "pass"])
    result = soak(3, RunOptions(quiet=True), Console(file=open(tmp_path / "log", "w")), root=tmp_path / "soak")
    assert result["flaky_checks"] == {"tcg host.x": {"pass": 2, "xfail": 1}}


def test_a_failed_round_keeps_its_run_folder_and_its_problems(monkeypatch, tmp_path):
    fake_rounds(monkeypatch, ["pass", "error", "pass"])
    result = soak(3, RunOptions(quiet=True), Console(file=open(tmp_path / "log", "w")), root=tmp_path / "soak")
    [bad] = result["failed_rounds"]
    assert bad["round"] == 1 and bad["problems"] == ["tcg host.x: error no observation"]
    assert sorted(p.name for p in (tmp_path / "soak").iterdir()) == ["round-1"]  # passing rounds are gone
    assert (tmp_path / "soak" / "round-1" / "run" / "serial.log").read_text().startswith("@@LAB 0")


def test_main_prints_the_failed_round_and_where_to_look(monkeypatch, tmp_path, capsys):
    from lab import soak as soak_mod

    fake_rounds(monkeypatch, ["error"])
    monkeypatch.setattr(soak_mod, "new_run_root", lambda: tmp_path / "soak")
    assert soak_mod.main(n=1) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "round 0" in out and str(tmp_path / "soak" / "round-0") in out and "host.x: error no observation" in out
    assert (tmp_path / "soak" / "soak.json").exists()


def test_bad_json_path_is_refused_before_the_first_round(monkeypatch, tmp_path):
    from lab import soak as soak_mod
    from lab.config import ConfigError

    fake_rounds(monkeypatch, [])  # any round would raise StopIteration
    with pytest.raises(ConfigError, match="does not exist"):
        soak_mod.main(n=1, json_path=str(tmp_path / "missing" / "s.json"))
