"""tools/profile_step.py runs the real training loop with its timers and accounts for the whole
measured wall time (no figure is asserted: timing is never a test)."""

from __future__ import annotations

import json
import sys

from tests.conftest import ROOT, run_cli


def test_phases_add_up_to_the_measured_steps(text_shards, image_shards, tmp_path):
    out, run_dir = tmp_path / "profile.json", tmp_path / "run"
    r = run_cli(
        [
            sys.executable,
            str(ROOT / "tools" / "profile_step.py"),
            "--config",
            "configs/debug.yaml",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
            "--run-dir",
            str(run_dir),
            f"data.text={text_shards}",
            f"data.image={image_shards}",
            "data.weights=[1,1,0]",
            "train.seq_len=64",
            "train.micro_batch=2",
            "data.num_workers=0",
        ],
        env={"DS_ACCELERATOR": "cpu"},
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    shares = res["shares"]
    assert {
        "data",
        "forward",
        "forward: vision",
        "forward: attention",
        "forward: ffn / moe",
        "backward",
        "optimizer",
    } <= set(shares)
    assert abs(sum(shares.values()) - 1) < 1e-6  # "other" is the remainder: nothing unaccounted
    assert all(v >= 0 for k, v in shares.items() if not k.startswith("other"))
    assert res["world"] == 1 and res["steps"] == 2 and len(res["per_rank"]) == 1
    assert 0 <= res["padding"] < 1 and 0 < res["loss_tokens"] <= 1
    assert "ms per step" in r.stdout and not run_dir.exists()
