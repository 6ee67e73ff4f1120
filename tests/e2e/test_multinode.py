"""Multi-node launch for real on one machine: two DeepSpeed launchers, each acting as one node
of a two-line hostfile (`--no_ssh --node_rank 0/1`, loopback master), train one run together
with the experts split between the two nodes (ep_size=2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.conftest import BIN, ROOT, free_port

pytestmark = pytest.mark.slow

STEPS = 6


def test_two_launchers_as_two_nodes_train_one_run(text_shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run = tmp_path / "run"
    port = free_port()
    # one rank per "node" on a 2-core machine: one intra-op thread each
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [
            str(BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--module",
            "fusion.train",
            "--config",
            "configs/debug.yaml",
            f"data.text={text_shards}",
            f"run.dir={run}",
            f"train.steps={STEPS}",
            "train.seq_len=64",
            "train.micro_batch=4",
            "train.warmup=2",
            "data.num_workers=1",
            "data.shuffle_buffer=32",
            "model.moe.ep_size=2",
            "model.moe.top_k=2",
            "train.zero_stage=1",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # only the process groups this test started
                os.killpg(p.pid, signal.SIGKILL)
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node}:\n{out[-4000:]}"
        # each launcher started exactly its own rank of a two-rank world
        assert "dist_world_size=2" in out and f"--node_rank={node}" in out, out[-2000:]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    final = run / "checkpoints" / f"step_{STEPS}"
    assert (final / "rank0.json").is_file() and (final / "rank1.json").is_file()
    assert sorted(f.name for f in final.glob("experts-*.safetensors")) == [
        "experts-00000-of-00002.safetensors",
        "experts-00001-of-00002.safetensors",
    ]
