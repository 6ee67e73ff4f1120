"""Two CPU ranks through the DeepSpeed launcher: the loss falls, checkpoints resume."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BIN, free_port, leaked_shm_buffers, run_cli

pytestmark = pytest.mark.slow

COMMON = [
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.lr=3e-3",
    "train.warmup=3",
    "data.num_workers=1",
    "data.shuffle_buffer=32",
]


def launch(config_args: list[str], nproc: int = 2):
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        "--module",
        "fusion.train",
        "--config",
        "configs/debug.yaml",
        *COMMON,
        *config_args,
    ]
    r = run_cli(cmd, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # DeepSpeed never removes its 66 MiB-per-rank shm buffers; fusion.train unlinks them
    assert leaked_shm_buffers(cmd) == []
    return r


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(text_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    launch([f"data.text={text_shards}", "train.steps=30", "train.ckpt_every=15", f"run.dir={run_dir}"])
    return run_dir


def test_loss_falls_and_router_metrics_logged(trained):
    rows = metrics(trained)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    for r in rows:
        for key in (
            "loss/text",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "aux_loss",
            "z_loss",
            "router/max_load",
            "router/dead_experts",
            "tokens/text",
        ):
            assert key in r, key
        assert r["router/max_load"] >= 1.0
    assert (trained / "config.yaml").is_file() and any((trained / "tb").iterdir())
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_30"
    for step in (15, 30):
        d = trained / "checkpoints" / f"step_{step}"
        assert (d / "rank0.json").is_file() and (d / "rank1.json").is_file()


def test_resume_continues_where_it_stopped(trained, text_shards, tmp_path):
    """Resuming from step 15 into a fresh run dir reproduces the original steps 16..30."""
    run2 = tmp_path / "r2"
    r = launch(
        [
            f"data.text={text_shards}",
            "train.steps=30",
            f"run.dir={run2}",
            f"train.resume={trained / 'checkpoints' / 'step_15'}",
        ]
    )
    assert "resumed from" in r.stdout
    original = {row["step"]: row["loss"] for row in metrics(trained)}
    resumed = metrics(run2)
    assert [row["step"] for row in resumed] == list(range(16, 31))
    for row in resumed:
        assert row["loss"] == pytest.approx(original[row["step"]], rel=1e-5, abs=1e-6)


def test_auto_resume_extends_a_finished_run(trained, text_shards):
    launch([f"data.text={text_shards}", "train.steps=33", f"run.dir={trained}"])
    steps = [r["step"] for r in metrics(trained)]
    assert steps[-3:] == [31, 32, 33]
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_33"
