"""The GPU dry run (fusion/dryrun/): the real training step of shipped configs on meta tensors
with a process group that has no CPU backend, at world size 2 with expert parallelism 2, bf16,
the fast MoE path, and FlexAttention forward on fake CUDA tensors.

What this tier leaves unchecked (DeepSpeed's engine cannot run on meta tensors: building it places
the module on its accelerator's device and flattens parameter data): DeepSpeed's own gradient
reduction and ZeRO partitioning, its bf16 optimizer and its own host syncs; numerics; compiled
kernels; NCCL itself. The stand-in engine makes the same calls in the same order.

Each of the three crashes a GPU run had at step 1 is put back (monkeypatched) and must fail here:
a CPU tensor in the step statistics' all-reduce, a CPU tensor in checkpoint selection's broadcast,
and `.numpy()` of the device's expert-load tensor at the first checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from fusion.config import load_config
from fusion.dryrun import DryRunError, dry_run
from tests.conftest import BIN, run_cli

# the reads the step is allowed (fusion.dist.fetch reasons): boundaries and expert parallelism
ALLOWED = {
    "optimizer step: skip decision (non-finite loss or gradient)",
    "expert parallelism: rows per rank for the all-to-all",
    "logging: the interval's losses, tokens and router loads",
    "logging: grad_norm",
    "checkpoint: the expert-load heatmap",
    "evaluation: the questions' results from every rank",
}


def small(*extra: str):
    return load_config(
        "configs/small.yaml",
        [
            "model.moe.ep_size=2",
            "model.moe.path=fast",
            "model.attn_impl=flex",
            "train.micro_batch=3",
            "train.grad_accum=2",
            *extra,
        ],
    )


def llama4(*extra: str):
    """NoPE every 4th layer, 64-token chunks on the others, QK norm, temperature tuning, and
    activation checkpointing (the MoE layers' recompute)."""
    return load_config(
        None,
        [
            "model.size=scout-mini",
            "model.n_layers=4",
            "model.attn_chunk=64",
            "model.floor_scale=64",
            "model.moe.ep_size=2",
            "model.moe.path=fast",
            "model.vision.encoder=conv-stem",
            "model.vision.patch_size=8",
            "train.seq_len=256",
            "train.micro_batch=3",
            "train.grad_accum=2",
            "train.activation_checkpointing=1",
            "data.n_frames=4",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def small_report():
    return dry_run(small(), 2, "configs/small.yaml")


def test_small_config_runs_a_whole_step_on_the_stand_in(small_report):
    r = small_report
    text = r.format()
    assert set(r.host_reads) <= ALLOWED, set(r.host_reads) - ALLOWED
    # one skip decision per optimizer step, one logging read, and the dispatcher's counts
    assert r.host_reads["optimizer step: skip decision (non-finite loss or gradient)"] == 1
    assert r.host_reads["expert parallelism: rows per rank for the all-to-all"] > 0
    assert all(" meta " in c for c in r.collectives), r.collectives
    assert any(c.startswith("all_to_all bfloat16") for c in r.collectives), r.collectives
    assert any(c.startswith("all_reduce float64") for c in r.collectives)  # the step statistics
    assert any(c.startswith("broadcast") for c in r.collectives)  # checkpoint selection
    # shapes per part: embeddings, vision, attention, the MoE router (fp32), logits in bf16
    assert r.shapes["decoder.tok_embeddings"] == "(3, 1024, 768) bfloat16"
    assert r.shapes["decoder.layers.*.moe.router"].endswith("float32")
    assert "_grouped_mm" in r.kernels and "bfloat16" in r.kernels["_grouped_mm"]
    assert "fake CUDA" in text and "flex" in text
    assert "memory per GPU" in text and "<- train.zero_stage" in text


def test_llama4_options_run_on_the_stand_in():
    r = dry_run(llama4(), 2, "scout-mini")
    assert set(r.host_reads) <= ALLOWED
    assert r.shapes["decoder.layers.*.attn"].startswith("(3, 256, 512)")


def test_muon_steps_the_experts_and_matrices_on_the_device():
    """`train.optimizer=muon`: the Newton-Schulz iterations of the expert stacks (sharded over
    ep 2) and of the dense matrices run on the device, with no host read."""
    r = dry_run(llama4("train.optimizer=muon"), 2, "scout-mini muon")
    assert set(r.host_reads) <= ALLOWED, set(r.host_reads) - ALLOWED
    assert r.host_reads["optimizer step: skip decision (non-finite loss or gradient)"] == 1


def test_a_dense_model_at_world_one():
    """Also the per-document loss averages: their counts stay on the device."""
    cfg = load_config("configs/debug.yaml", ["model.moe.n_experts=0", "train.loss_average=square"])
    r = dry_run(cfg, 1, "dense")
    assert "expert parallelism: rows per rank for the all-to-all" not in r.host_reads


# ---------------------------------------------------------------------------------------------
# the tier is real: the GPU run's step-1 crashes, put back, fail here
# ---------------------------------------------------------------------------------------------


def test_cpu_step_statistics_fail(monkeypatch):
    import torch.distributed as tdist

    from fusion.metrics import StepStats

    def reduce_on_cpu(self):  # the old loop: a 12-slot CPU tensor handed to all_reduce
        stats = torch.zeros(12, dtype=torch.float64)
        tdist.all_reduce(stats)
        return {}

    monkeypatch.setattr(StepStats, "reduce", reduce_on_cpu)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dry_run(llama4(), 2)


def test_cpu_checkpoint_broadcast_fails(monkeypatch):
    import torch.distributed as tdist

    from fusion import dist

    def broadcast_on_cpu(payload, src=0):  # the old choose_checkpoint: a CPU uint8 buffer
        data = torch.zeros(1 << 16, dtype=torch.uint8)
        tdist.broadcast(data, src=src)
        return payload

    monkeypatch.setattr(dist, "broadcast_bytes", broadcast_on_cpu)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dry_run(llama4(), 2)


def test_numpy_of_device_load_fails(monkeypatch):
    import fusion.metrics

    monkeypatch.setattr(fusion.metrics, "host_load", lambda run_load: run_load.numpy())
    with pytest.raises((RuntimeError, TypeError, NotImplementedError), match="meta"):
        dry_run(llama4(), 2)


def test_a_host_sync_in_the_micro_step_fails(monkeypatch):
    """bincount sizes its output from the data: a sync on a GPU, an error on meta."""
    from fusion.model.fusion import FusionModel

    loss = FusionModel.loss

    def loss_with_bincount(self, logits, labels, *args):
        out = loss(self, logits, labels, *args)
        out.loss_count = torch.bincount(labels.flatten().clamp(min=0)).float()[:3]
        return out

    monkeypatch.setattr(FusionModel, "loss", loss_with_bincount)
    with pytest.raises((RuntimeError, NotImplementedError)):
        dry_run(llama4(), 2)


def test_a_wrong_dtype_fails(monkeypatch):
    """A matrix product left in fp32 in a bf16 run (here: after the output head) is refused."""
    from fusion.model.decoder import Decoder

    forward = Decoder.forward

    def fp32_head(self, h, *args, **kwargs):
        logits, aux, z = forward(self, h, *args, **kwargs)
        return logits.float() @ torch.eye(logits.shape[-1], device=logits.device), aux, z

    monkeypatch.setattr(Decoder, "forward", fp32_head)
    with pytest.raises(DryRunError, match="dtype"):
        dry_run(llama4(), 2)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_command_on_llama4_scout_at_world_64():
    """The published Scout shape (107 B parameters) at 8k tokens, 16-way expert parallelism, 64
    ranks: one rank's view on meta tensors, on this machine."""
    r = run_cli(
        [
            str(BIN / "fusion-train"),
            "--dry-run",
            "--world",
            "64",
            "model.size=llama4-scout",
            "train.seq_len=8192",
            "train.micro_batch=1",
            "model.moe.ep_size=16",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "as rank 0 of 64" in r.stdout
    assert "decoder.tok_embeddings" in r.stdout and "(1, 8192, 5120) bfloat16" in r.stdout
    assert "all_to_all bfloat16 meta over 16 ranks" in r.stdout
    assert "memory per GPU" in r.stdout


def test_dry_run_command_names_what_a_gpu_run_would_hit():
    """fp32 on a GPU: `torch._grouped_mm` takes bf16 only, so the fast path falls back to a
    per-expert loop that reads its group offsets on the host in every MoE layer."""
    r = run_cli(
        [
            str(BIN / "fusion-train"),
            "--config",
            "configs/debug.yaml",
            "--dry-run",
            "train.precision=fp32",
            "model.moe.path=fast",
        ],
        timeout=300,
    )
    assert r.returncode == 1, r.stdout[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("fusion-train: dry run: a host sync inside the step") and "fast.py" in line, line


def test_world_without_dry_run_is_refused():
    r = run_cli([str(BIN / "fusion-train"), "--config", "configs/debug.yaml", "--world", "4"])
    assert r.returncode == 2 and "--world is for --dry-run" in r.stderr
