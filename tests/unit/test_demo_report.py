"""tools/demo_report.py: the demo's table and its two bars (README, "What the demo shows") read
from fusion-eval's SET.json files."""

from __future__ import annotations

import json
import sys

from tests.conftest import ROOT, run_cli


def _result(overall: float, by_type: dict[str, float], blind: float | None = 0.35) -> dict:
    def row(acc: float) -> dict:
        return {"acc": acc, "n": 60, "chance": 0.3, "blind_acc": blind}

    return {"overall": row(overall), "by_type": {t: row(a) for t, a in by_type.items()}}


def _report(tmp_path, results: dict[str, dict], *extra: str):
    (tmp_path / "run" / "eval").mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        (tmp_path / "run" / "eval" / f"{name}.json").write_text(json.dumps(res))
    sets = [str(tmp_path / "toy" / name) for name in results]
    cmd = [sys.executable, str(ROOT / "tools" / "demo_report.py"), "--run", str(tmp_path / "run")]
    return run_cli([*cmd, "--vqa", *sets, *extra])


def _bar_lines(out: str) -> dict[tuple[str, str], str]:
    """(bar, set) -> 'met' / 'missed'."""
    lines = [line for line in out.splitlines() if line.startswith(("promise:", "goal:"))]
    return {(line.split(":")[0], line.split()[1].rstrip(":")): line.rsplit(" ", 1)[1] for line in lines}


def test_each_bar_is_met_or_missed_by_the_overall_and_the_weakest_type(tmp_path):
    image = _result(0.96, {"color": 0.95, "shape": 0.91, "count": 1.0})
    video = _result(0.97, {"direction": 0.97})
    r = _report(tmp_path, {"vqa_image_test": image, "vqa_video_test": video})
    assert r.returncode == 0, r.stderr
    assert _bar_lines(r.stdout) == {
        ("promise", "vqa_image_test"): "met",
        ("promise", "vqa_video_test"): "met",
        ("goal", "vqa_image_test"): "met",
        ("goal", "vqa_video_test"): "met",
    }

    # One weak type misses the goal (not the promise) though the overall is above both bars.
    image = _result(0.96, {"color": 0.95, "shape": 0.817, "count": 1.0})
    r = _report(tmp_path, {"vqa_image_test": image})
    bars = _bar_lines(r.stdout)
    assert bars == {("promise", "vqa_image_test"): "met", ("goal", "vqa_image_test"): "missed"}
    assert "weakest type shape 0.817" in r.stdout

    # Below the promise's overall; a set no bar names is tabled and not judged.
    image = _result(0.84, {"color": 0.9, "shape": 0.8})
    other = _result(0.5, {"color": 0.5})
    r = _report(tmp_path, {"vqa_image_test": image, "vqa_image_compositional": other})
    assert _bar_lines(r.stdout) == {
        ("promise", "vqa_image_test"): "missed",
        ("goal", "vqa_image_test"): "missed",
    }
    assert "vqa_image_compositional   color" in r.stdout


def test_a_run_evaluated_without_blind_and_a_missing_set(tmp_path):
    r = _report(
        tmp_path, {"vqa_video_test": _result(0.99, {"direction": 0.99}, blind=None)}, "--started", "0"
    )
    assert r.returncode == 0, r.stderr
    assert "make demo took" in r.stdout
    row = next(
        line for line in r.stdout.splitlines() if line.startswith("vqa_video_test") and "direction" in line
    )
    assert row.split()[3:5] == ["0.990", "-"]

    cmd = [sys.executable, str(ROOT / "tools" / "demo_report.py"), "--run", str(tmp_path / "run")]
    r = run_cli([*cmd, "--vqa", str(tmp_path / "toy" / "vqa_image_test")])
    assert r.returncode == 1
    assert f"no evaluation at {tmp_path / 'run' / 'eval' / 'vqa_image_test.json'}" in r.stderr
