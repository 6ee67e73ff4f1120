"""fusion-plan: counts equal the built model's, the published Llama 4 totals, FLOPs, memory, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fusion.config import SIZES, load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model
from fusion.plan import (
    PARTS,
    active_parameters,
    count_parameters,
    count_parameters_of,
    flops_per_token,
    main,
    make_plan,
    memory_per_gpu,
    muon_parameters,
    part_of,
)
from fusion.step import muon_matrices

# a timm ViT tower at 32 px under pixel shuffle, on a 3-layer debug decoder with a dense layer
TIMM_TOWER = [
    "model.moe.every=2",
    "model.n_layers=3",
    "model.vision.encoder=vit_tiny_patch16_224",
    "model.vision.img_size=32",
    "model.vision.patch_size=8",
    "model.vision.pixel_shuffle=true",
]


def built(size: str, *overrides, device="meta"):
    cfg = load_config(None, [f"model.size={size}", *overrides])
    with torch.device(device):
        model = build_model(cfg.model, ByteTokenizer())
    return cfg, model


@pytest.mark.parametrize("size", list(SIZES))
def test_counts_equal_the_built_model(size):
    # the two small ones for real, the rest on the meta device (shapes only, no memory)
    cfg, model = built(size, device="cpu" if size in ("debug", "demo") else "meta")
    counted = count_parameters(cfg.model, model.vocab_size)
    assert counted == count_parameters_of(model)
    assert sum(counted.values()) == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active = active_parameters(cfg.model, model.vocab_size)
    assert active["routed_experts"] == experts * cfg.model.moe.top_k // cfg.model.moe.n_experts


def test_counts_follow_options():
    """Tied embeddings, a timm ViT, pixel-shuffle, dense layers: the analytic count keeps up."""
    cfg, model = built(
        "debug",
        "model.tie_embeddings=true",
        *TIMM_TOWER,
        "model.vision.temporal_merge=2",
    )
    assert count_parameters(cfg.model, model.vocab_size) == count_parameters_of(model)
    cfg, model = built(
        "demo",
        "model.vision.encoder=conv-stem",
        "model.vision.width=48",
        "model.vision.patch_size=4",
        "model.vision.temporal_merge=2",
    )
    assert count_parameters(cfg.model, model.vocab_size) == count_parameters_of(model)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.size=demo"],
        ["model.size=demo", "model.fusion=late", "model.xattn_every=2"],
        ["model.size=demo", "model.dense_baseline=true", "model.vision.encoder=patch-linear"],
        ["model.size=debug", *TIMM_TOWER],
        ["model.size=scout-mini"],
    ],
)
@pytest.mark.parametrize("experts", [True, False])
def test_muon_count_equals_the_matrices_muon_steps(overrides, experts):
    """fusion-plan's Muon share of each part is what train.optimizer=muon steps in the built model."""
    cfg, model = built(overrides[0].split("=")[1], *overrides[1:])
    chosen = muon_matrices(model, experts)
    moe_layers = {b.layer_id for b in model.decoder.layers if b.moe is not None}
    built_parts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        if id(p) in chosen:
            built_parts[part_of(name, moe_layers)] += p.numel()
    assert muon_parameters(cfg.model, model.vocab_size, experts) == built_parts


def test_muon_memory_keeps_one_buffer_for_its_matrices(capsys):
    m = load_config(None, ["model.size=scout-mini"]).model
    V = ByteTokenizer().vocab_size
    n = sum(count_parameters(m, V).values())
    for precision, adam, muon_bytes in (("bf16", 12, 8), ("fp32", 8, 4)):
        for experts in (True, False):
            mu = sum(muon_parameters(m, V, experts).values())
            assert 0 < mu < n
            adamw = memory_per_gpu(m, V, 8, 1, 2, 128, precision)
            muon = memory_per_gpu(m, V, 8, 1, 2, 128, precision, "muon", experts)
            assert muon[0]["optimizer"] == pytest.approx(adam * n - (adam - muon_bytes) * mu)
            assert muon[0]["weights"] == adamw[0]["weights"] and muon[0]["grads"] == adamw[0]["grads"]
            for stage in (1, 2, 3):  # Muon is refused there: AdamW's state
                assert muon[stage] == adamw[stage]
    # the routed experts on AdamW (train.muon_experts=false) keep more state than on Muon
    assert (
        memory_per_gpu(m, V, 8, 1, 2, 128, "bf16", "muon", False)[0]["optimizer"]
        > memory_per_gpu(m, V, 8, 1, 2, 128, "bf16", "muon", True)[0]["optimizer"]
    )
    assert main(["model.size=debug", "train.optimizer=muon"]) == 0
    assert "train.optimizer=muon trains at ZeRO 0 only" in capsys.readouterr().out


@pytest.mark.parametrize(
    "size,total,active", [("llama4-scout", 109e9, 17e9), ("llama4-maverick", 400e9, 17e9)]
)
def test_llama4_totals_match_the_published_figures(size, total, active):
    plan = make_plan(load_config(None, [f"model.size={size}"]))
    assert plan["params"]["total"]["total"] == pytest.approx(total, rel=0.02)
    assert plan["params"]["active"]["total"] == pytest.approx(active, rel=0.02)


def test_flops_per_token_is_six_times_matmul_params_plus_attention():
    cfg, model = built("debug", "model.n_layers=4", "model.moe.every=2", "model.moe.top_k=2", device="cpu")
    m, V, T = cfg.model, model.vocab_size, 64
    # independent count from the built model: every 2-D weight but the embedding lookup multiplies;
    # routed experts by top_k / E; the vision tower is not part of a decoder token's cost
    matmul = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.startswith("vision.") or "tok_embeddings" in name:
            continue
        matmul += p.numel() * (m.moe.top_k / m.moe.n_experts if ".moe.experts." in name else 1)
    attn = 6 * m.n_layers * m.dim * T
    assert flops_per_token(m, V, T) == pytest.approx(6 * matmul + attn)
    # chunked layers pay for their chunk only; NoPE layers keep the full context
    chunked = load_config(
        None,
        [
            "model.size=debug",
            "model.n_layers=4",
            "model.moe.every=2",
            "model.moe.top_k=2",
            "model.attn_chunk=16",
            "model.nope_every=4",
        ],
    ).model
    assert flops_per_token(chunked, V, T) == pytest.approx(6 * matmul + 6 * m.dim * (3 * 16 + T))


def test_train_logs_mfu_from_the_same_count():
    from fusion.metrics import flops_per_token as train_flops

    cfg, model = built("scout-mini", device="meta")
    assert train_flops(model, cfg) == flops_per_token(cfg.model, model.vocab_size, cfg.train.seq_len)


def test_memory_by_zero_stage_world_and_ep():
    m = load_config(None, ["model.size=scout-mini"]).model
    V = ByteTokenizer().vocab_size
    n = sum(count_parameters(m, V).values())
    one = memory_per_gpu(m, V, world=1, ep_size=1, micro_batch=2, seq_len=128, precision="bf16")
    # one rank: nothing to split, 2 + 2 + 12 bytes per parameter
    for stage in range(4):
        assert one[stage]["weights"] == 2 * n and one[stage]["optimizer"] == 12 * n
    eight = memory_per_gpu(m, V, world=8, ep_size=1, micro_batch=2, seq_len=128, precision="bf16")
    assert eight[0]["total"] == one[0]["total"]
    # ZeRO splits what DeepSpeed holds; routed experts are trained outside it (fusion/parallel/),
    # so every rank keeps all of its local experts' weights, grads and Adam states at every stage
    experts = count_parameters(m, V)["routed_experts"]
    rest = n - experts
    assert eight[1]["optimizer"] == pytest.approx(12 * (rest / 8 + experts))
    assert (
        eight[2]["grads"] == pytest.approx(2 * (rest / 8 + experts)) and eight[1]["grads"] == one[0]["grads"]
    )
    assert eight[3]["weights"] == pytest.approx(2 * (rest / 8 + experts))
    totals = [eight[s]["total"] for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    # experts sharded over 4 ranks: a rank holds a quarter of them, at every stage
    ep = memory_per_gpu(m, V, world=8, ep_size=4, micro_batch=2, seq_len=128, precision="bf16")
    for stage in range(4):
        for kind, size in (("weights", 2), ("grads", 2), ("optimizer", 12)):
            assert eight[stage][kind] - ep[stage][kind] == pytest.approx(size * experts * 3 / 4)
    # a dense model of the same size is split by ZeRO as a whole
    dense = load_config(None, ["model.size=scout-mini", "model.moe.n_experts=0"]).model
    nd = sum(count_parameters(dense, V).values())
    assert memory_per_gpu(dense, V, world=8, ep_size=1, micro_batch=2, seq_len=128, precision="bf16")[1][
        "optimizer"
    ] == pytest.approx(12 * nd / 8)
    # activations grow with the micro-batch; checkpointing keeps less
    big = memory_per_gpu(m, V, world=8, ep_size=1, micro_batch=4, seq_len=128, precision="bf16")
    assert big[0]["activations"] == pytest.approx(2 * eight[0]["activations"])
    assert eight[0]["activations_ckpt"] < eight[0]["activations"]


def test_cli_table_json_and_errors(capsys):
    assert main(["model.size=llama4-maverick", "--world", "64", "--ep-size", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["params"]["total"]) == set(PARTS) | {"total"}
    assert plan["memory"]["ep_size"] == 8 and set(plan["memory"]["bytes"]) == {"0", "1", "2", "3"}
    # configs/demo.yaml names the toy world's tokenizer, which `fusion-data toy` writes: without it
    # the plan says which file is missing; with the byte tokenizer it plans the same model
    assert main(["--config", "configs/demo.yaml", "data.tokenizer=missing/tokenizer.json"]) == 2
    assert "missing/tokenizer.json" in capsys.readouterr().err
    assert main(["--config", "configs/demo.yaml", "data.tokenizer=byte", "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "training FLOPs per token" in out and "ZeRO" in out
    assert main(["model.moe.n_expert=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.moe.n_expert" in err[0]
    assert main(["model.size=debug", "--world", "6", "--ep-size", "4"]) == 2
    assert "--ep-size" in capsys.readouterr().err
    # options may follow overrides
    assert main(["model.size=debug", "--world", "2", "train.seq_len=64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["world"] == 2


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.vision.encoder=not_a_model", "'not_a_model' is not a timm model name"),
        ("model.vision.encoder=resnet18", "must be a ViT-style timm model"),
        ("data.tokenizer=BAD", "is not a tokenizer.json"),
    ],
)
def test_cli_bad_encoder_or_tokenizer_is_one_line(override, names, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"vocab": {"a": 1')
    assert main(["model.size=debug", override.replace("BAD", str(bad))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err


@pytest.mark.parametrize(
    "module, argv",
    [
        ("fusion.plan", ["model.size=llama4-maverick", "--world", "64"]),
        ("fusion.data.build", ["stats", "STATS_DIR"]),
    ],
)
def test_output_into_a_closed_pipe_is_no_traceback(module, argv, text_shards):
    import sys

    from tests.unit.test_eval_cli import run_into_closed_pipe

    argv = [str(text_shards) if a == "STATS_DIR" else a for a in argv]
    r = run_into_closed_pipe([sys.executable, "-m", module, *argv])
    assert r.stderr == "" and r.returncode == 141, r.stderr
