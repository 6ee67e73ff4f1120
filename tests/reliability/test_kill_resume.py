"""Exact resume after SIGKILL: two CPU ranks, ZeRO-1, in fp32 and in bf16 (fp32 gradient
accumulation, DeepSpeed's BF16_Optimizer, fp32 expert master weights). The fp32 run is killed at a
random step after its second checkpoint; the bf16 run while its third checkpoint is being written
(FUSION_FAULTS=ckpt@12 stops the save after some of its files, the test kills both ranks there).
The newest complete checkpoint then has a crafted pickle in place of a DeepSpeed file; the run
resumes with train.resume=auto from the previous checkpoint, never reads the half-written one, and
reproduces the uninterrupted run bit for bit: the same losses, gradient norms, sample keys and
weights."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from fusion.checkpoint import verify_checkpoint
from fusion.faults import CKPT_MARKER
from tests.conftest import BIN, ROOT, free_port, leaked_shm_buffers, run_cli

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4
ARGS = [
    "--config",
    "configs/debug.yaml",
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.lr=3e-3",
    "train.warmup=3",
    "data.num_workers=1",
    "data.shuffle_buffer=32",
    "train.zero_stage=1",
    f"train.steps={STEPS}",
    f"train.ckpt_every={EVERY}",
    "train.keep_checkpoints=2",
    "train.debug_log=true",
    "model.moe.balance=bias",
]
# bf16: two micro-steps per step, so that the fp32 gradient accumulation is part of what resumes
PRECISION = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16", "train.grad_accum=2", "model.moe.ep_size=2"],
}


def command(run_dir, text_shards, precision: str) -> list[str]:
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "fusion.train",
        *ARGS,
        *PRECISION[precision],
        f"data.text={text_shards}",
        f"run.dir={run_dir}",
    ]


def last_rows(path, key="step") -> dict[int, dict]:
    """The last JSON line per step (a resumed run appends the steps it repeats)."""
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row or "keys" in row:
            rows[row[key]] = row
    return rows


class Payload:
    """Unpickling this runs `touch SENTINEL`."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def kill_when(cmd, run_dir, ready, env: dict | None = None, timeout: float = 600) -> str:
    """Launch, poll `ready(output so far)`, then SIGKILL the launcher and every rank at once.
    Returns the run's output."""
    log = run_dir.parent / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})},
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None and not ready(log.read_text()):
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert leaked_shm_buffers(cmd) == []  # unlinked at start-up, so a kill leaves no RAM behind
    return log.read_text()


def logged(run_dir, step: int):
    """ready() once metrics.jsonl has a row for `step`."""
    metrics = run_dir / "metrics.jsonl"

    def ready(_output: str) -> bool:
        return metrics.is_file() and any(
            json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l.strip()
        )

    return ready


def both_ranks_paused(step: int):
    """ready() once both ranks have announced that they stopped in the checkpoint of `step`."""

    def ready(output: str) -> bool:
        return all(CKPT_MARKER.format(step=step, rank=r, path="") in output for r in (0, 1))

    return ready


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def runs(request, text_shards, tmp_path_factory):
    precision = request.param
    full = tmp_path_factory.mktemp(f"full_{precision}") / "run"
    r = run_cli(command(full, text_shards, precision), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    killed = tmp_path_factory.mktemp(f"killed_{precision}") / "run"
    ckpts = killed / "checkpoints"
    half = ckpts / f".step_{STEPS}.tmp"
    if precision == "fp32":
        kill_at = random.randint(2 * EVERY + 1, 3 * EVERY - 2)  # after the step-8 checkpoint
        kill_when(command(killed, text_shards, precision), killed, logged(killed, kill_at))
        steps_logged = max(last_rows(killed / "metrics.jsonl"))
        assert steps_logged < STEPS, f"the run finished before it was killed (kill_at={kill_at})"
        # a save that was "interrupted" leaves a half-written directory behind
        half.mkdir(exist_ok=True)
        (half / "rank0.json").write_text("{")
    else:
        # SIGKILL while the last checkpoint is being written: each rank has written its expert
        # shard and its state, rank 0 the exported model; DeepSpeed's files and the manifest are not
        out = kill_when(
            command(killed, text_shards, precision),
            killed,
            both_ranks_paused(STEPS),
            env={"FUSION_FAULTS": f"ckpt@{STEPS}"},
        )
        assert both_ranks_paused(STEPS)(out), out[-3000:]
        written = sorted(p.name for p in half.iterdir())
        assert {
            "rank0.json",
            "rank1.json",
            "model.safetensors",
            "experts-00000-of-00002.safetensors",
            "experts-00001-of-00002.safetensors",
        } <= set(written), written
        assert "manifest.json" not in written and "mp_rank_00_model_states.pt" not in written, written
        assert not (ckpts / f"step_{STEPS}").exists()
    assert half.is_dir()
    assert (ckpts / "latest").read_text() == "step_8"

    # the newest complete checkpoint gets a crafted pickle in place of DeepSpeed's model file
    sentinel = killed.parent / "SENTINEL"
    (ckpts / "step_8" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"x": Payload(sentinel)}))
    resumed = run_cli(command(killed, text_shards, precision), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {
        "full": full,
        "killed": killed,
        "sentinel": sentinel,
        "stdout": resumed.stdout,
        "precision": precision,
    }


def test_killed_run_resumes_bitwise_from_the_previous_good_checkpoint(runs):
    full, killed = runs["full"], runs["killed"]
    out = runs["stdout"]
    # step_8 is refused, naming the altered file, and step_4 is used
    assert "refusing checkpoint" in out and "step_8: file mp_rank_00_model_states.pt" in out, out[-3000:]
    assert f"resumed from {killed / 'checkpoints' / 'step_4'} at step 4" in out
    assert not runs["sentinel"].exists()

    want, got = last_rows(full / "metrics.jsonl"), last_rows(killed / "metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(EVERY + 1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "router/max_load"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    for rank in (0, 1):
        want_dbg = last_rows(full / "debug" / f"rank{rank}.jsonl")
        got_dbg = last_rows(killed / "debug" / f"rank{rank}.jsonl")
        for step in range(EVERY + 1, STEPS + 1):
            assert got_dbg[step]["keys"] and got_dbg[step]["keys"] == want_dbg[step]["keys"], (rank, step)
            assert got_dbg[step]["weights"] == want_dbg[step]["weights"], (rank, step)


def test_checkpoints_after_resume_are_complete_and_pruned(runs):
    ckpts = runs["killed"] / "checkpoints"
    # the tampered step_8 was replaced by the resumed run's own; step_4 pruned (keep 2); the
    # half-written directory removed (DeepSpeed also leaves its zero_to_fp32.py helper scripts here)
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_12", "step_8"]
    assert (ckpts / "latest").read_text() == "step_12"
    for tag in ("step_8", "step_12"):
        manifest = verify_checkpoint(ckpts / tag)
        optim = "bf16_zero" if runs["precision"] == "bf16" else "zero"  # BF16_Optimizer's files
        assert {
            "rank0.json",
            "rank1.json",
            "model.safetensors",
            "model.json",
            "mp_rank_00_model_states.pt",
            f"{optim}_pp_rank_0_mp_rank_00_optim_states.pt",  # ZeRO-1 partitions: loaded weights-only
            f"{optim}_pp_rank_1_mp_rank_00_optim_states.pt",
        } <= set(manifest["files"])
        assert manifest["step"] == int(tag.split("_")[1]) and manifest["world_size"] == 2
    # the re-saved checkpoints equal the uninterrupted run's, byte for byte where it is ours
    full = runs["full"] / "checkpoints" / "step_12"
    assert (ckpts / "step_12" / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    # the experts' files hold their fp32 weights (the bf16 run's master weights) and AdamW moments:
    # the same tensors (their header's metadata is not written in a fixed order)
    shards = sorted(p.name for p in full.glob("experts-*.safetensors"))
    assert shards and shards == sorted(p.name for p in (ckpts / "step_12").glob("experts-*.safetensors"))
    for name in shards:
        want, got = load_file(str(full / name)), load_file(str(ckpts / "step_12" / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
