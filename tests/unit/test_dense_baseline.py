"""model.dense_baseline: every MoE layer becomes a dense SwiGLU with the MoE layer's active width,
so MoE vs dense at equal active parameters (router gate excluded) is one switch."""

from __future__ import annotations

import pytest
import torch

from fusion.config import ConfigError, dense_baseline_ffn_dim, load_config, moe_layer_ids
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model
from fusion.plan import active_parameters, count_parameters, count_parameters_of, flops_per_token, make_plan

CASES = [
    ("debug",),
    ("demo",),
    ("debug", "model.moe.top_k=2", "model.moe.n_shared=0"),
    ("demo", "model.moe.top_k=2", "model.moe.n_shared=2", "model.moe.n_experts=8"),
    ("scout-mini",),
    ("maverick-mini",),
]


def build(size, *overrides):
    cfg = load_config(None, [f"model.size={size}", *overrides])
    with torch.device("cpu" if size in ("debug", "demo") else "meta"):
        torch.manual_seed(0)
        return cfg, build_model(cfg.model, ByteTokenizer())


def router_gates(m) -> int:
    """The E x D router matrices of the MoE model: what the dense baseline has no counterpart for."""
    return len(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts)) * m.moe.n_experts * m.dim


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_active_parameters_equal_from_the_plan_and_the_built_model(case):
    size, *over = case
    moe_cfg, moe = build(size, *over)
    dense_cfg, dense = build(size, *over, "model.dense_baseline=true")
    V = moe.vocab_size
    # the built dense model: every parameter is active
    n_dense = sum(p.numel() for p in dense.parameters())
    # the built MoE model's active parameters: routed experts count top_k / E, router gates none
    m = moe_cfg.model
    active_moe = sum(
        p.numel() * (m.moe.top_k / m.moe.n_experts if ".moe.experts." in name else 1)
        for name, p in moe.named_parameters()
    )
    gates = sum(p.numel() for name, p in moe.named_parameters() if name.endswith(".router.gate.weight"))
    assert gates == router_gates(m) > 0
    assert n_dense == active_moe - gates
    # fusion-plan says the same, and its part counts equal the built dense model's
    assert count_parameters(dense_cfg.model, V) == count_parameters_of(dense)
    plan_moe, plan_dense = make_plan(moe_cfg), make_plan(dense_cfg)
    assert plan_dense["params"]["active"]["total"] == plan_moe["params"]["active"]["total"] - gates
    assert plan_dense["params"]["total"]["total"] == n_dense
    # and the FLOPs per token differ by the router's matmul only
    T = 256
    assert flops_per_token(dense_cfg.model, V, T) == pytest.approx(flops_per_token(m, V, T) - 6 * gates)


def test_dense_layers_have_the_moe_layers_active_width():
    cfg, model = build("demo", "model.dense_baseline=true", "model.moe.top_k=2")
    assert model.moe_layers == []
    moe_ids = moe_layer_ids(cfg.model.n_layers, cfg.model.moe.every, cfg.model.moe.n_experts)
    width = dense_baseline_ffn_dim(cfg.model.moe)
    assert width == (2 + 1) * cfg.model.moe.moe_ffn_dim
    for i, block in enumerate(model.decoder.layers):
        assert block.moe is None
        assert block.ffn.w1.out_features == (width if i in moe_ids else cfg.model.ffn_dim)
    active = active_parameters(cfg.model, model.vocab_size)
    assert active["router"] == active["routed_experts"] == active["shared_experts"] == 0


def test_dense_baseline_trains_and_needs_moe_layers():
    cfg, model = build("debug", "model.dense_baseline=true")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 16:] = ids[:, :16]  # the second half repeats the first: learnable
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids.roll(-1, 1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.lm_loss))
    assert losses[-1] < 0.7 * losses[0]
    assert float(out.aux_loss) == 0 and float(out.z_loss) == 0
    with pytest.raises(ConfigError, match="model.dense_baseline"):
        load_config(None, ["model.dense_baseline=true", "model.moe.n_experts=0"])


@pytest.mark.parametrize(
    "switch,key",
    [("model.dense_baseline=true", "model.dense_baseline"), ("model.fusion=late", "model.fusion")],
)
def test_to_hf_refuses_the_research_switches(switch, key):
    """A Hugging Face Llama 4 text model has neither: fusion-convert to-hf says so instead of
    dropping weights."""
    from fusion.convert import ConvertError, hf_config_from_model
    from fusion.schema import SpecialIds

    cfg = load_config(None, ["model.size=debug", switch])
    with pytest.raises(ConvertError, match=key):
        hf_config_from_model(cfg.model, 265, SpecialIds.of(ByteTokenizer()))
