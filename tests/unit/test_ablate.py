"""tools/ablate.py: every run of a grid gets the same training FLOPs, and the demo's grid plans on
a fresh checkout (its vocabulary comes from the toy world the grid makes, not from data/toy)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture
def ablate(monkeypatch):
    """A fresh copy of the tool's module (main() sets its grids' seeds and budget)."""
    spec = importlib.util.spec_from_file_location("ablate_tool", ROOT / "tools" / "ablate.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rows(out: str) -> dict[str, tuple[int, float, float]]:
    """name -> (steps, FLOPs per token, FLOPs) from the dry run's lines."""
    rows = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) == 10 and f[2] == "steps":
            rows[f[0]] = (int(f[1]), float(f[3]), float(f[5]))
    return rows


def test_demo_grid_plans_without_data_toy(ablate, tmp_path, monkeypatch, capsys):
    # a small world of the same kinds (extra colours too) stands in for the demo's 40,000 pictures
    monkeypatch.setattr(ablate.GRIDS["demo"], "toy", {**ablate.TOY_SMALL, "extra-colors": "white"})
    monkeypatch.chdir(tmp_path)  # no data/toy/tokenizer.json here, as on a fresh clone
    work = tmp_path / "work"
    assert ablate.main(["--grid", "demo", "--dry-run", "--work", str(work)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 4 * 2  # four models, the grid's two seeds
    # the config's own steps are early fusion + MoE's budget; every run gets that many FLOPs
    assert rows["early-moe-s0"][0] == 1300
    budget = rows["early-moe-s0"][2]
    for name, (steps, fpt, flops) in rows.items():
        assert flops == pytest.approx(budget, rel=0.01), name
        assert steps * fpt * 16 * 256 == pytest.approx(budget, rel=0.01), name  # 16 rows of 256
    # late fusion's cross-attention costs more per token: fewer steps for the same FLOPs
    assert rows["late-moe-s0"][0] < rows["early-moe-s0"][0]
    assert (work / "toy" / "tokenizer.json").is_file() and not list(work.glob("*-s0"))


def test_cpu_grid_dry_run_trains_nothing(ablate, tmp_path, capsys):
    work = tmp_path / "work"
    assert ablate.main(["--dry-run", "--seeds", "1", "--work", str(work)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert sorted(rows) == ["early-dense-s0", "early-moe-s0", "late-dense-s0", "late-moe-s0"]
    assert not work.exists()
