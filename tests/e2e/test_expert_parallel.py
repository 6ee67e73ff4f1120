"""Expert parallelism on two CPU ranks (gloo) through the DeepSpeed launcher: ep_size=2 trains
exactly like ep_size=1, and checkpoints move between the two with every expert and its optimizer
state."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, free_port, run_cli

pytestmark = pytest.mark.slow

STEPS = 20
# top-2 of 4 experts with the aux-free bias on; clipping at 1.0 is active (the norm starts near 2)
COMMON = [
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.lr=3e-3",
    "train.warmup=3",
    "train.precision=fp32",
    "train.grad_clip=1.0",
    "data.num_workers=1",
    "data.shuffle_buffer=32",
    "model.moe.n_experts=4",
    "model.moe.top_k=2",
    "model.moe.balance=bias",
    f"train.steps={STEPS}",
    "train.ckpt_every=10",
]
COMPARED = ("loss", "grad_norm", "router/max_load", "router/dead_experts", "z_loss")


def launch(args: list[str]):
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
        *COMMON,
        *args,
    ]
    r = run_cli(cmd, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def assert_same_steps(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for s in steps:
        for key in COMPARED:
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5, abs=1e-5), (s, key, a[s][key], b[s][key])


@pytest.fixture(scope="module")
def ep1(text_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("ep1") / "run"
    launch([f"data.text={text_shards}", "model.moe.ep_size=1", "train.zero_stage=0", f"run.dir={run}"])
    return run


@pytest.fixture(scope="module")
def ep2(text_shards, tmp_path_factory):
    # ZeRO 2 here (ZeRO 0 for ep1): the expert norm must join DeepSpeed's partitioned norm
    run = tmp_path_factory.mktemp("ep2") / "run"
    launch([f"data.text={text_shards}", "model.moe.ep_size=2", "train.zero_stage=2", f"run.dir={run}"])
    return run


def test_ep2_trains_exactly_like_ep1(ep1, ep2):
    a, b = metrics(ep1), metrics(ep2)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert_same_steps(a, b, range(1, STEPS + 1))
    assert max(r["grad_norm"] for r in a.values()) > 1.0  # clipping was in play
    assert a[STEPS]["loss"] < 0.8 * a[1]["loss"]


def expert_files(step_dir) -> list:
    return sorted(step_dir.glob("experts-*.safetensors"))


def test_expert_shards_hold_every_expert_and_its_optimizer_state(ep1, ep2):
    d1, d2 = ep1 / "checkpoints" / "step_10", ep2 / "checkpoints" / "step_10"
    assert [f.name for f in expert_files(d1)] == ["experts-00000-of-00001.safetensors"]
    assert [f.name for f in expert_files(d2)] == [
        "experts-00000-of-00002.safetensors",
        "experts-00001-of-00002.safetensors",
    ]
    whole = load_file(str(expert_files(d1)[0]))
    halves = [load_file(str(f)) for f in expert_files(d2)]
    assert set(whole) == set(halves[0]) == set(halves[1])
    kinds = {k.split("/")[0] for k in whole}
    assert kinds == {"param", "exp_avg", "exp_avg_sq", "step"}
    n_layers = 2  # configs/debug.yaml: every layer is MoE
    assert len([k for k in whole if k.startswith("param/")]) == 3 * n_layers  # w1, w2, w3 per layer
    for key, full in whole.items():
        if key.startswith("step/"):
            assert float(full) == float(halves[0][key]) == float(halves[1][key]) == 10
            continue
        assert full.shape[0] == 4 and halves[0][key].shape[0] == 2  # every expert, split in two
        torch.testing.assert_close(torch.cat([halves[0][key], halves[1][key]]), full, rtol=1e-4, atol=1e-6)
    # the exported model holds every expert too, gathered from both ranks
    m1, m2 = (load_file(str(d / "model.safetensors")) for d in (d1, d2))
    assert m1.keys() == m2.keys()
    for key in m1:
        torch.testing.assert_close(m2[key], m1[key], rtol=1e-4, atol=1e-6)
    assert m1["decoder.layers.0.moe.experts.w1"].shape[0] == 4


@pytest.mark.parametrize("source,target", [("ep2", 1), ("ep1", 2)])
def test_checkpoint_resumes_at_the_other_ep_size(source, target, ep1, ep2, text_shards, tmp_path):
    """Resharded weights and optimizer state: the resumed steps 11..20 repeat the original run.
    The ep1 -> ep2 resume also recomputes every layer (activation checkpointing) on the way."""
    src = {"ep1": ep1, "ep2": ep2}[source]
    zero = 0 if source == "ep1" else 2
    run = tmp_path / "resumed"
    extra = ["train.activation_checkpointing=1"] if target == 2 else []
    r = launch(
        [
            f"data.text={text_shards}",
            f"model.moe.ep_size={target}",
            f"train.zero_stage={zero}",
            f"run.dir={run}",
            f"train.resume={src / 'checkpoints' / 'step_10'}",
            *extra,
        ]
    )
    assert "resumed from" in r.stdout
    original, resumed = metrics(src), metrics(run)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_same_steps(original, resumed, range(11, STEPS + 1))
    final_src = load_file(str(src / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    final = load_file(str(run / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    assert final.keys() == final_src.keys()
    for key in final:
        torch.testing.assert_close(final[key], final_src[key], rtol=1e-4, atol=1e-5)
    n_files = len(expert_files(run / "checkpoints" / f"step_{STEPS}"))
    assert n_files == target


def test_muon_run_resumes_exactly_with_the_experts_momentum(text_shards, tmp_path):
    """`train.optimizer=muon` at ep 2: each shard keeps its experts' Muon momentum (and the
    AdamW state of the rest goes through DeepSpeed's checkpoint); resumed from step 10, steps
    11..20 repeat the run. Muon also trains: the loss falls as AdamW's does."""
    first, resumed = tmp_path / "muon", tmp_path / "resumed"
    args = [f"data.text={text_shards}", "model.moe.ep_size=2", "train.zero_stage=0", "train.optimizer=muon"]
    launch([*args, f"run.dir={first}"])
    shard = load_file(str(expert_files(first / "checkpoints" / "step_10")[0]))
    assert {k.split("/")[0] for k in shard} == {"param", "momentum_buffer"}
    assert all(shard[f"momentum_buffer/{k[6:]}"].abs().sum() > 0 for k in shard if k.startswith("param/"))
    r = launch([*args, f"run.dir={resumed}", f"train.resume={first / 'checkpoints' / 'step_10'}"])
    assert "resumed from" in r.stdout
    a, b = metrics(first), metrics(resumed)
    assert sorted(b) == list(range(11, STEPS + 1))
    assert_same_steps(a, b, range(11, STEPS + 1))
    assert a[STEPS]["loss"] < 0.8 * a[1]["loss"]


def test_muon_trains_in_bf16_at_zero_0(text_shards, tmp_path):
    """bf16 without ZeRO: DeepSpeed's unfused optimizer keeps a whole fp32 master per parameter,
    so Muon steps whole matrices there too; the experts' fp32 masters carry its momentum."""
    run = tmp_path / "bf16"
    launch(
        [
            f"data.text={text_shards}",
            "model.moe.ep_size=2",
            "train.zero_stage=0",
            "train.optimizer=muon",
            "train.precision=bf16",
            f"run.dir={run}",
        ]
    )
    a = metrics(run)
    assert sorted(a) == list(range(1, STEPS + 1))
    assert a[STEPS]["loss"] < 0.8 * a[1]["loss"]
    shard = load_file(str(expert_files(run / "checkpoints" / f"step_{STEPS}")[0]))
    assert any(k.startswith("momentum_buffer/") for k in shard)
    assert all(v.dtype == torch.float32 for v in shard.values())
