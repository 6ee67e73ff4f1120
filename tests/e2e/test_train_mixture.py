"""Early fusion end to end: two CPU ranks train on text + image + video shards together."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BIN, free_port, run_cli

pytestmark = pytest.mark.slow


def test_mixture_trains_with_zero2_and_accumulation(
    text_shards, image_shards, video_shards, toy_world, tmp_path
):
    run_dir = tmp_path / "mix"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "fusion.train",
        "--config",
        "configs/debug.yaml",
        f"data.text={text_shards}",
        f"data.image={image_shards}",
        f"data.video={video_shards}",
        "data.n_frames=4",
        "data.shuffle_buffer=16",
        "data.weights=[1,1,1]",
        "train.seq_len=160",
        "train.micro_batch=3",
        "train.grad_accum=2",
        "train.zero_stage=2",
        "train.steps=30",
        "train.lr=3e-3",
        "train.warmup=3",
        "train.ckpt_every=15",
        "model.vision.lr_scale=0.5",
        f"run.dir={run_dir}",
        f"data.eval={toy_world / 'vqa_image_test'},{toy_world / 'vqa_video_test'}",
        "train.eval_every=15",
        "data.eval_limit=30",
    ]
    r = run_cli(cmd, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))  # one row per logged step
    # in-training evaluation at steps 15 and 30, on both sets, in those steps' rows; files beside
    evals = [r for r in rows if "eval/vqa_image_test/acc" in r]
    assert [r["step"] for r in evals] == [15, 30]
    for r in evals:
        assert 0 <= r["eval/vqa_image_test/acc"] <= 1 and "eval/acc/color" in r and "eval/acc/direction" in r
    latest = (run_dir / "eval" / "step_30" / "vqa_video_test.json").read_bytes()
    assert (run_dir / "eval" / "vqa_video_test.json").read_bytes() == latest
    # the two ranks shared the 30 image questions (batches of 16: one batch each); the results
    # equal one process scoring them all from the step-30 checkpoint
    alone = tmp_path / "alone"
    r = run_cli(
        [
            str(BIN / "fusion-eval"),
            "--checkpoint",
            str(run_dir / "checkpoints" / "step_30"),
            "--vqa",
            str(toy_world / "vqa_image_test"),
            "--limit",
            "30",
            "--out",
            str(alone),
            "--no-progress",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    shared = json.loads((run_dir / "eval" / "step_30" / "vqa_image_test.json").read_text())
    single = json.loads((alone / "vqa_image_test.json").read_text())
    assert shared["overall"]["n"] == 30
    assert shared["overall"] == single["overall"] and shared["by_type"] == single["by_type"]
    assert shared["examples"] == single["examples"][:8]  # the trainer keeps 8 examples, fusion-eval 16
    for key in ("loss/text", "loss/image", "loss/video"):
        first = sum(r[key] for r in rows[:3]) / 3
        last = sum(r[key] for r in rows[-3:]) / 3
        assert last < 0.75 * first, (key, first, last)
    last = rows[-1]
    # every micro-batch of 3 rows holds one row of each modality: shares sit at their targets
    for m in ("text", "image", "video"):
        assert last[f"data/target/{m}"] == pytest.approx(1 / 3)
        assert abs(last[f"data/share/{m}"] - 1 / 3) < 0.1
        assert f"router/max_load/{m}" in last
    assert (run_dir / "plots" / "expert_load.png").stat().st_size > 1000
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
