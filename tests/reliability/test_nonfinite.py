"""Non-finite guard: NaN injected into the loss, one gradient (on one rank only) and the
router logits skips the optimizer step on both ranks alike, keeps the LR schedule and the router
biases consistent, is counted in metrics.jsonl, and after train.max_nonfinite in a row the run
stops with a clear message and an intact last checkpoint."""

from __future__ import annotations

import json
import math

import pytest

from fusion.checkpoint import verify_checkpoint
from fusion.config import load_config
from fusion.step import lr_at
from tests.conftest import BIN, free_port, run_cli

pytestmark = pytest.mark.slow

ARGS = [
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.lr=3e-3",
    "train.warmup=3",
    "data.num_workers=1",
    "data.shuffle_buffer=32",
    "train.precision=fp32",
    "train.steps=12",
    "train.ckpt_every=4",
    "train.max_nonfinite=2",
    "train.debug_log=true",
    "model.moe.balance=bias",
]
# step 2: rank 0's loss; step 4: a gradient on rank 1 only; step 6: rank 0's router logits;
# steps 8 and 9: the loss on both ranks -> two in a row stops the run after step 9
FAULTS = "loss@2:0,grad@4:1,router@6:0,loss@8,loss@9"
SKIPPED = {2, 4, 6, 8, 9}


def test_nonfinite_steps_are_skipped_alike_counted_and_stop_the_run(text_shards, tmp_path):
    run = tmp_path / "run"
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
        *ARGS,
        f"data.text={text_shards}",
        f"run.dir={run}",
    ]
    r = run_cli(cmd, timeout=900, env={"FUSION_FAULTS": FAULTS})
    assert r.returncode != 0
    assert (
        "2 optimizer steps in a row had a non-finite loss or gradient norm (config key "
        "'train.max_nonfinite'=2); stopped at step 9"
    ) in r.stderr, r.stderr[-3000:]
    assert "step_8, is intact" in r.stderr

    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 10))
    cfg = load_config("configs/debug.yaml", ARGS)
    skips = 0
    for row in rows:
        skips += row["step"] in SKIPPED
        assert row["nonfinite_skips"] == skips, row
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, cfg), rel=1e-12)  # schedule goes on
        # the injected loss NaN hits what backward sees; NaN router logits poison the logged loss too
        assert math.isnan(row["loss"]) == (row["step"] == 6)

    debug = [
        [json.loads(l) for l in (run / "debug" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [d["step"] for d in debug[0]] == [d["step"] for d in debug[1]] == list(range(1, 10))
    previous = None
    for d0, d1 in zip(*debug):
        # the ranks agree on the decision and hold identical weights and router biases throughout
        assert d0["skipped"] == d1["skipped"] == (d0["step"] in SKIPPED)
        assert d0["weights"] == d1["weights"], d0["step"]
        assert math.isfinite(d0["weights"])
        if previous is not None:
            # a skipped step changes nothing; any other step does
            assert (d0["weights"] == previous) == d0["skipped"], d0["step"]
        previous = d0["weights"]

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_8"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_4", "step_8"]
    for tag in ("step_4", "step_8"):
        verify_checkpoint(ckpts / tag)
