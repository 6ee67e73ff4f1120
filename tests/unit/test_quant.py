"""Weight-only int4 (fusion/eval/int4.py, fusion-eval --quantize int4): the per-weight error bound, the
bytes it takes, a quantised model's logits close to the original's, and the CLI report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fusion.checkpoint import export_model
from fusion.config import load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.eval import cli
from fusion.eval.int4 import (
    Int4Experts,
    Int4Linear,
    dequantize_int4,
    quantize_int4,
    quantize_model,
    weight_bytes,
)
from fusion.model.fusion import build_model
from fusion.schema import IGNORE
from tests import conftest

TOK = ByteTokenizer()


def groups_of(w, G):
    K = w.shape[-1]
    pad = (-K) % G
    x = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], -1) if pad else w
    return x.unflatten(-1, (-1, G))


@pytest.mark.parametrize("shape,G", [((64, 128), 64), ((8, 100), 32), ((3, 16, 48), 16), ((5, 7), 64)])
def test_dequantised_weights_are_within_half_a_step(shape, G):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # columns of many scales
    w[0, : G // 2] = 0.25  # a constant run
    codes, scale, offset = quantize_int4(w, G)
    n_groups = -(-shape[-1] // G)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == n_groups * G // 2
    assert scale.dtype == offset.dtype == torch.float16 and scale.shape[-1] == n_groups
    back = dequantize_int4(codes, scale, offset, shape[-1])
    assert back.shape == w.shape
    err = (groups_of(w, G) - groups_of(back, G)).abs()  # (..., n_groups, G)
    bound = scale.float()[..., None] / 2
    assert (err <= bound * (1 + 1e-3) + 1e-7).all()
    # and the bound is tight enough to matter: 16 levels over each group's range
    rng = groups_of(w, G).amax(-1) - groups_of(w, G).amin(-1)
    assert (scale.float() <= rng / 15 * 1.01 + 1e-7).all()


def test_odd_group_sizes_are_refused():
    with pytest.raises(ValueError, match="--group-size"):
        quantize_int4(torch.randn(4, 8), 7)


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.size=debug", "model.moe.top_k=2", "model.moe.path=loop", *overrides])
    model = build_model(cfg.model, TOK).eval()
    model.tokenizer = TOK
    return cfg, model


def text_rows(n=8, T=48, seed=0):
    return conftest.text_rows(TOK, n, T, seed)


TRAINED: dict = {}


def trained(*overrides):
    """A debug model trained for a few steps on toy sentences (random weights have no logits
    worth keeping close); cached per variant, returned as a fresh copy."""
    if overrides not in TRAINED:
        cfg, model = make(*overrides)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(15):
            ids, labels = text_rows(seed=step)
            out = model(ids, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        TRAINED[overrides] = (cfg, model.eval())
    cfg, model = TRAINED[overrides]
    return cfg, copy.deepcopy(model)


def test_experts_keep_their_layout():
    _, model = make()
    experts = model.moe_layers[0].experts
    q = Int4Experts(experts, 32)
    for name in ("w1", "w2", "w3"):
        full, deq = getattr(experts, name), getattr(q, name)
        assert deq.shape == full.shape and deq.dtype == full.dtype
        assert (deq - full).abs().max() < 0.1 * full.abs().max()
    x = torch.randn(10, experts.w1.shape[1])
    counts = torch.tensor([3, 0, 5, 2])
    assert torch.allclose(q.forward_loop(x, counts), q.forward_grouped(x, counts), atol=1e-5)
    assert not list(q.parameters())  # nothing full-precision left


@pytest.mark.parametrize("over", [(), ("model.dense_baseline=true",)])
def test_quantised_model_logits_stay_close(over):
    _, model = trained(*over)
    ids, labels = text_rows(seed=99)
    with torch.no_grad():
        ref = model(ids)
        before = weight_bytes(model)
        report = quantize_model(model, 32)
        out = model(ids)
    # what was replaced, and only that
    kinds = {type(m) for m in model.modules()}
    assert Int4Linear in kinds and (Int4Experts in kinds) == (over == ())
    assert isinstance(model.decoder.output, torch.nn.Linear)
    assert isinstance(model.decoder.tok_embeddings, torch.nn.Embedding)
    assert all(isinstance(b.moe.router.gate, torch.nn.Linear) for b in model.decoder.layers if b.moe)
    # memory: 4 bits a weight plus an fp16 scale and offset per 32 weights, instead of 32 bits
    assert report["bytes_after"] == pytest.approx(report["params"] * (0.5 + 4 / 32), rel=0.02)
    assert weight_bytes(model) == before - report["bytes_before"] + report["bytes_after"]
    # logits where a prediction is scored: close, and the same top choice almost everywhere
    mask = labels != IGNORE
    rel = (out - ref)[mask].norm() / (ref - ref.mean(-1, keepdim=True))[mask].norm()
    assert rel < 0.08, float(rel)
    agree = (out.argmax(-1) == ref.argmax(-1))[mask].float().mean()
    assert agree > 0.9, float(agree)


def test_late_fusion_blocks_are_quantised():
    _, model = make("model.fusion=late")
    quantize_model(model, 32)
    block = model.late.blocks[0]
    assert isinstance(block.attn.wq, Int4Linear) and isinstance(block.ffn.w2, Int4Linear)
    assert block.attn_gate.dtype == torch.float32  # gates and norms stay


def test_smaller_groups_are_more_accurate():
    errs = []
    for G in (16, 64, 256):
        _, model = make()
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = model(ids)
            quantize_model(model, G)
            errs.append(float((model(ids) - ref).norm()))
    assert errs[0] < errs[1] < errs[2], errs


def test_fusion_eval_reports_int4_beside_the_original(toy_world, tmp_path, capsys):
    cfg, model = make("model.vision.img_size=32", "model.vision.patch_size=8")
    ckpt = tmp_path / "ckpt"
    export_model(model, cfg, ckpt)
    out = tmp_path / "eval"
    vqa_dir = toy_world / "vqa_image_test"
    rc = cli.main(
        [
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--vqa",
            str(vqa_dir),
            "--limit",
            "6",
            "--examples",
            "0",
            "--no-progress",
            "--device",
            "cpu",
            "--quantize",
            "int4",
            "--group-size",
            "32",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "int4 (group 32): acc" in printed and "MiB" in printed
    result = json.loads((out / "vqa_image_test.json").read_text())
    q = result["int4"]
    assert result["dtype"] == "float32" and q["group_size"] == 32
    assert q["overall"]["n"] == result["overall"]["n"] == 6 and 0 <= q["overall"]["acc"] <= 1
    assert q["overall"]["blind_acc"] is not None and set(q["by_type"]) == set(result["by_type"])
    assert (
        q["weight_bytes"]
        == result["weight_bytes"] - q["quantized"]["bytes_before"] + q["quantized"]["bytes_after"]
    )
    assert q["weight_bytes"] < 0.8 * result["weight_bytes"]
    assert (
        cli.main(
            [
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--vqa",
                str(vqa_dir),
                "--quantize",
                "int4",
                "--group-size",
                "5",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-size" in err[0]
