"""A short soak in CI (the long one is `invoke soak`, 100 rounds): the full matrix, both
witnesses, several times, with no status changing between rounds and nothing left behind."""

import pytest
from rich.console import Console

from lab.cli import RunOptions
from lab.soak import soak


@pytest.mark.tcg
@pytest.mark.usefixtures("no_leftovers", "artifacts")
def test_short_soak_has_no_flake(tmp_path):
    result = soak(3, RunOptions(accel="all", witness="both", quiet=True), Console(file=open(tmp_path / "log", "w")))
    assert result["rounds"] == 3
    assert result["failed_rounds"] == [] and result["flaky_checks"] == {}


def test_negative_control_a_status_that_changes_is_a_flake(monkeypatch, tmp_path):
    rounds = iter(["pass", "xfail", "pass"])

    def fake_run_lab(opts, console):
        st = next(rounds)
        return 0, {"checks": [{"config": "tcg", "id": "host.x", "status": st, "reason": ""}]}

    monkeypatch.setattr("lab.soak.run_lab", fake_run_lab)
    result = soak(3, RunOptions(quiet=True), Console(file=open(tmp_path / "log", "w")))
    assert result["flaky_checks"] == {"tcg host.x": {"pass": 2, "xfail": 1}}
