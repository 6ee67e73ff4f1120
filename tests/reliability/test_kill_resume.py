"""Exact resume after SIGKILL (issue #8): two CPU ranks, ZeRO-1, fp32. A run killed at a random step
after its second checkpoint, whose newest checkpoint then has a crafted pickle in place of a
DeepSpeed file, resumes with train.resume=auto from the previous checkpoint and reproduces the
uninterrupted run bit for bit: the same losses, gradient norms, sample keys and weights."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time

import pytest

from fusion.checkpoint import verify_checkpoint
from tests.conftest import BIN, ROOT, free_port, leaked_shm_buffers, run_cli

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4
ARGS = ["--config", "configs/debug.yaml", "train.seq_len=64", "train.micro_batch=4", "train.lr=3e-3",
        "train.warmup=3", "data.num_workers=1", "data.shuffle_buffer=32", "train.zero_stage=1",
        "train.precision=fp32", f"train.steps={STEPS}", f"train.ckpt_every={EVERY}",
        "train.keep_checkpoints=2", "train.debug_log=true", "model.moe.balance=bias"]


def command(run_dir, text_shards) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            "--module", "fusion.train", *ARGS, f"data.text={text_shards}", f"run.dir={run_dir}"]


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


def kill_when_logged(cmd, run_dir, step: int, timeout: float = 600) -> None:
    """Launch, wait for metrics of `step`, then SIGKILL the launcher and every rank at once."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with open(run_dir.parent / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and any(json.loads(l)["step"] >= step
                                             for l in metrics.read_text().splitlines() if l.strip()):
                    break
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (run_dir.parent / "killed.log").read_text()[-3000:]
    assert leaked_shm_buffers(cmd) == []  # unlinked at start-up, so a kill leaves no RAM behind


@pytest.fixture(scope="module")
def runs(text_shards, tmp_path_factory):
    full = tmp_path_factory.mktemp("full") / "run"
    r = run_cli(command(full, text_shards), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    killed = tmp_path_factory.mktemp("killed") / "run"
    kill_at = random.randint(2 * EVERY + 1, 3 * EVERY - 2)  # after the step-8 checkpoint
    kill_when_logged(command(killed, text_shards), killed, kill_at)
    ckpts = killed / "checkpoints"
    steps_logged = max(last_rows(killed / "metrics.jsonl"))
    assert steps_logged < STEPS, f"the run finished before it was killed (kill_at={kill_at})"
    assert (ckpts / "latest").read_text() == "step_8"

    # the newest checkpoint gets a crafted pickle in place of DeepSpeed's model file, and a save
    # that was "interrupted" leaves a half-written directory behind
    sentinel = killed.parent / "SENTINEL"
    (ckpts / "step_8" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"x": Payload(sentinel)}))
    (ckpts / ".step_12.tmp").mkdir(exist_ok=True)
    (ckpts / ".step_12.tmp" / "rank0.json").write_text("{")
    resumed = run_cli(command(killed, text_shards), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"full": full, "killed": killed, "kill_at": kill_at, "sentinel": sentinel,
            "stdout": resumed.stdout}


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
        assert {"rank0.json", "rank1.json", "model.safetensors", "model.json", "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt",  # ZeRO-1 partitions: loaded weights-only
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(manifest["files"])
        assert manifest["step"] == int(tag.split("_")[1]) and manifest["world_size"] == 2
    # the re-saved checkpoints equal the uninterrupted run's, byte for byte where it is ours
    full = runs["full"] / "checkpoints" / "step_12"
    assert (ckpts / "step_12" / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
