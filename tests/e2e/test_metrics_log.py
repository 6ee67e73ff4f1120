"""metrics.jsonl: one row per logged step, each reporting the whole interval since the previous row,
and a resumed run replaces (never duplicates) the rows an interrupted attempt logged past its
checkpoint. One process (fusion-train), text + image."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BIN, run_cli

pytestmark = pytest.mark.slow


def train(run_dir, text_shards, image_shards, steps: int):
    r = run_cli(
        [
            str(BIN / "fusion-train"),
            "--config",
            "configs/debug.yaml",
            f"data.text={text_shards}",
            f"data.image={image_shards}",
            "data.weights=[1,1,1]",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "train.seq_len=96",
            "train.micro_batch=1",
            f"train.steps={steps}",
            "train.log_every=3",
            "train.ckpt_every=3",
            f"run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_rows_cover_their_interval_and_a_resume_replaces_what_it_repeats(text_shards, image_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, text_shards, image_shards, steps=6)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        # one row per step of micro_batch 1 alternates text and image: each 3-step interval has both
        assert "loss/text" in r and "loss/image" in r, r
        assert r["tokens/text"] > 0 and r["tokens/image"] > 0, r
        assert min(r["loss/text"], r["loss/image"]) <= r["loss"] <= max(r["loss/text"], r["loss/image"])

    # an attempt that died after step 6's checkpoint had logged steps 7, 8 and half of 9
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 9.0}) + "\n" + json.dumps({"step": 8, "loss": 9.0}) + "\n")
        f.write('{"step": 9, "lo')
    train(run_dir, text_shards, image_shards, steps=9)  # resumes from step_6
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9] and rows[-1]["loss"] != 9.0
    replaced = (run_dir / "metrics.replaced.jsonl").read_text().splitlines()
    assert replaced[:2] == [json.dumps({"step": 7, "loss": 9.0}), json.dumps({"step": 8, "loss": 9.0})]
    assert replaced[2] == '{"step": 9, "lo'  # kept as it was, nothing lost
