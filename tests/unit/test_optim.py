"""`train.optimizer`: Muon for the hidden matrices, AdamW for the rest (fusion/optim.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from fusion.config import ConfigError, VisionConfig, load_config
from fusion.optim import Muon, build_optimizer, orthogonalize
from fusion.step import param_groups
from tests.conftest import ROOT, run_cli
from tests.unit.test_fusion import make


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (3, 64, 96), (2, 96, 64)])
def test_orthogonalize_gives_every_direction_about_the_same_size(shape):
    """U V^T of each matrix (a stack is a batch): its singular values end near 1 whatever the
    input's spectrum (here spread over four orders of magnitude), and its directions are g's."""
    gen = torch.Generator().manual_seed(0)
    m, n = shape[-2:]
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*shape[:-2], m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(*shape[:-2], n, k, generator=gen))
    s = torch.logspace(0, -4, k)
    g = u @ torch.diag_embed(s.expand(*shape[:-2], k)) @ v.mT
    o = orthogonalize(g)
    assert o.shape == g.shape
    sv = torch.linalg.svdvals(o)
    assert sv[..., : k // 2].min() > 0.6 and sv.max() < 1.25  # the strong half of the spectrum: ~1
    # the same singular vectors as g: U^T o V is (close to) diagonal and positive
    core = u.mT @ o @ v
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-3 and torch.diagonal(core, dim1=-2, dim2=-1).min() > 0
    if len(shape) == 3:  # a stack is each matrix on its own
        torch.testing.assert_close(o[1], orthogonalize(g[1]), rtol=1e-5, atol=1e-5)


def test_the_adamw_groups_step_exactly_as_torch_adamw():
    gen = torch.Generator().manual_seed(1)
    a = [
        torch.randn(8, 5, generator=gen, requires_grad=True),
        torch.randn(5, generator=gen, requires_grad=True),
    ]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    groups = [{"params": [a[0]], "weight_decay": 0.1}, {"params": [a[1]], "weight_decay": 0.0}]
    ours = Muon(groups, lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(
        [{"params": [b[0]], "weight_decay": 0.1}, {"params": [b[1]], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(ours.state[a[0]]["step"]) == 5


def test_a_muon_step_moves_a_matrix_by_about_an_adamw_step():
    """Moonlight's scale: 0.2 * sqrt(max(rows, cols)) makes the update's RMS about 0.2 * lr for
    any shape, so one learning rate serves the Muon and the AdamW groups; decay is decoupled."""
    gen = torch.Generator().manual_seed(2)
    for shape in [(64, 256), (256, 64), (4, 32, 128)]:
        w = torch.randn(shape, generator=gen, requires_grad=True)
        before = w.detach().clone()
        opt = Muon([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=1e-2)
        w.grad = torch.randn(shape, generator=gen)
        opt.step()
        rms = (w.detach() - before).pow(2).mean().sqrt().item()
        assert 0.6 * 0.2 * 1e-2 < rms < 1.2 * 0.2 * 1e-2, (shape, rms)
        assert opt.state[w]["momentum_buffer"].shape == w.shape
    w = torch.ones(16, 16, requires_grad=True)
    w.grad = torch.zeros(16, 16)
    Muon([{"params": [w], "muon": True}], lr=0.5, weight_decay=0.1).step()
    torch.testing.assert_close(w.detach(), torch.full((16, 16), 0.95))  # no gradient: decay alone


def test_muon_refuses_a_vector():
    with pytest.raises(ValueError, match="matrices"):
        Muon([{"params": [torch.zeros(4, requires_grad=True)], "muon": True}])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    _, model = make("model.vision.encoder=conv-stem")
    owner = {id(p): name for name, p in model.named_parameters()}
    groups = param_groups(model, 0.1, VisionConfig(lr_scale=2.0), muon=True)
    muon = sorted(owner[id(p)] for g in groups if g["muon"] for p in g["params"])
    adamw = sorted(owner[id(p)] for g in groups if not g["muon"] for p in g["params"])
    assert sorted(muon + adamw) == sorted(owner.values())  # every parameter once
    for name in muon:
        assert any(
            k in name for k in (".attn.w", ".ffn.w", ".moe.experts.", ".moe.shared.", "vision.projector.")
        ), name
    for name in adamw:
        assert not any(k in name for k in (".attn.w", ".ffn.w", ".moe.experts.", ".moe.shared.")), name
    assert any(".moe.experts.w1" in n for n in muon) and any("vision.projector" in n for n in muon)
    for kept in ("decoder.tok_embeddings.weight", "decoder.output.weight", "vision.encoder.convs.0.weight"):
        assert kept in adamw
    assert any(".router.gate." in n for n in adamw)
    by_name = {g["name"]: g for g in groups}
    assert by_name["vision_decay_muon"]["lr_scale"] == 2.0 and by_name["experts"]["muon"]
    # `train.muon_experts=false`: the routed experts go back to AdamW, the rest stays on Muon
    no_experts = {
        g["name"]: g for g in param_groups(model, 0.1, VisionConfig(), muon=True, muon_experts=False)
    }
    assert not no_experts["experts"]["muon"] and no_experts["decay_muon"]["muon"]
    assert sum(len(g["params"]) for g in no_experts.values() if g["muon"]) == len(muon) - sum(
        ".moe.experts." in n for n in muon
    )
    # without muon: the groups as before, none marked
    plain = param_groups(model, 0.1, VisionConfig(lr_scale=2.0))
    assert not any(g["muon"] for g in plain) and not any(g["name"].endswith("_muon") for g in plain)
    opt = build_optimizer([g for g in groups if g["name"] != "experts"], "muon", 1e-3, (0.9, 0.95), 0.1)
    assert isinstance(opt, Muon)


def test_muon_is_refused_under_zero_and_an_unknown_optimizer_is_named():
    assert load_config("configs/debug.yaml", ["train.optimizer=muon"]).train.optimizer == "muon"
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config("configs/debug.yaml", ["train.optimizer=muon", "train.zero_stage=1"])
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config("configs/debug.yaml", ["train.optimizer=lion"])


def test_bench_muon_prints_the_cost_by_kind_and_the_three_steps():
    """tools/bench_muon.py runs on a shipped config (no figure is asserted: timing is never a test)."""
    r = run_cli(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_muon.py"),
            "--config",
            "configs/debug.yaml",
            "--repeat",
            "1",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("routed experts", "attention", "all ", "adamw", "muon, experts on AdamW"):
        assert line in r.stdout, r.stdout
