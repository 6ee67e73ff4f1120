"""Each Llama 4 text feature on its own: NoPE layers, chunked attention, temperature tuning, QK norm,
Llama 3 RoPE scaling, the MoE layer against transformers' Llama4TextMoe, the named sizes."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.config import load_config
from fusion.data.sequence import Packer, collate
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.decoder import (
    Attention,
    Rotary,
    attention_temperature,
    chunked_mask,
    document_mask,
    rope_frequencies,
    uses_rope,
)
from fusion.model.fusion import build_model
from fusion.model.moe import MoE


def model_of(*overrides, device="cpu"):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=debug", *overrides])
    with torch.device(device):
        return cfg, build_model(cfg.model, ByteTokenizer())


def test_nope_layers_follow_llama4_pattern():
    # transformers' default: no_rope_layers[i] = int((i + 1) % interval != 0), 1 meaning RoPE
    assert [int(uses_rope(i, 4)) for i in range(12)] == [int((i + 1) % 4 != 0) for i in range(12)]
    assert all(uses_rope(i, 0) for i in range(12))
    _, model = model_of("model.n_layers=8", "model.nope_every=4", "model.attn_chunk=16")
    layers = model.decoder.layers
    assert [b.use_rope for b in layers] == [True, True, True, False] * 2
    assert [b.chunked for b in layers] == [True, True, True, False] * 2  # NoPE layers attend fully


def reference_chunked_mask(positions, doc_ids, chunk):
    B, T = positions.shape
    m = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                m[b, 0, i, j] = (
                    j <= i
                    and doc_ids[b, i] == doc_ids[b, j]
                    and positions[b, i] // chunk == positions[b, j] // chunk
                )
    return m


def test_chunked_mask_equals_reference():
    # two packed documents (positions restart at 0) and padding, chunks of 3
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1]])
    got = chunked_mask(positions, 3, doc_ids)
    assert torch.equal(got, reference_chunked_mask(positions, doc_ids, 3))
    # without documents it is Llama 4's chunked causal mask on absolute positions
    pos = torch.arange(10)[None]
    assert torch.equal(chunked_mask(pos, 4), reference_chunked_mask(pos, torch.zeros_like(pos), 4))
    # a chunk as long as the sequence is the plain document mask
    assert torch.equal(chunked_mask(positions, 100, doc_ids), document_mask(doc_ids))


def test_nope_layers_ignore_rope_and_rope_layers_do_not():
    cfg = load_config(None, ["model.size=debug"]).model
    torch.manual_seed(0)
    x = torch.randn(1, 12, cfg.dim)
    pos = torch.arange(12)[None]
    rot_a, rot_b = Rotary(16, 10000.0), Rotary(16, 10.0)
    for use_rope in (False, True):
        torch.manual_seed(1)
        attn = Attention(cfg, use_rope=use_rope)
        ya = attn(x, *rot_a(pos), None)
        yb = attn(x, *rot_b(pos), None)
        assert torch.allclose(ya, yb) != use_rope


def test_temperature_tuning_formula():
    floor_scale, scale = 8, 0.1
    pos = torch.arange(40)[None]
    t = attention_temperature(pos, floor_scale, scale)[0, 0, :, 0]
    for p in range(40):
        assert t[p].item() == pytest.approx(1 + scale * math.log(1 + math.floor((p + 1) / floor_scale)))
    assert torch.all(t[: floor_scale - 1] == 1.0) and t[floor_scale - 1] > 1.0
    # on a NoPE layer the scale multiplies the queries: same as scaling wq for that position
    cfg = load_config(None, ["model.size=debug"]).model
    torch.manual_seed(0)
    attn = Attention(cfg, use_rope=False)
    x = torch.randn(1, 40, cfg.dim)
    y = attn(x, None, None, None, attention_temperature(pos, floor_scale, 0.0))
    assert torch.allclose(y, attn(x, None, None, None))  # attn_scale 0: no change
    y = attn(x, None, None, None, attention_temperature(pos, floor_scale, scale))
    assert torch.allclose(y[:, : floor_scale - 1], attn(x, None, None, None)[:, : floor_scale - 1], atol=1e-6)
    assert not torch.allclose(y[:, floor_scale:], attn(x, None, None, None)[:, floor_scale:])


def test_qk_norm_makes_rope_layers_scale_free():
    cfg = load_config(None, ["model.size=debug", "model.qk_norm=true"]).model
    torch.manual_seed(0)
    x = torch.randn(1, 10, cfg.dim)
    cos, sin = Rotary(16, 10000.0)(torch.arange(10)[None])
    for use_rope in (True, False):  # Llama 4 normalises on RoPE layers only
        torch.manual_seed(1)
        attn = Attention(cfg, use_rope=use_rope)
        with torch.no_grad():  # q, k well above the norm's eps
            attn.wq.weight.normal_(std=0.5)
            attn.wk.weight.normal_(std=0.5)
        y = attn(x, cos, sin, None)
        with torch.no_grad():
            attn.wq.weight *= 10
            attn.wk.weight *= 3
        assert torch.allclose(y, attn(x, cos, sin, None), atol=1e-5) == use_rope


def test_packed_documents_stay_apart_with_chunks_and_nope():
    """Chunks count from each document's start: a document alone gives the logits it gets packed."""
    _, model = model_of(
        "model.n_layers=4",
        "model.nope_every=2",
        "model.attn_chunk=4",
        "model.qk_norm=true",
        "model.floor_scale=3",
        "model.attn_scale=0.5",
        "model.moe.path=loop",
    )
    model.eval()
    p = Packer(seq_len=24, pad_id=0)
    p.add(list(range(1, 8)))  # doc 0: 6 positions: doc 1 starts mid-chunk
    p.add(list(range(20, 39)))  # doc 1: 18 positions
    b = collate(p.ready)
    with torch.no_grad():
        packed = model(b["input_ids"], positions=b["positions"], doc_ids=b["doc_ids"])
        alone = model(b["input_ids"][:, 6:])
    assert torch.allclose(alone[0], packed[0, 6:], atol=1e-5)
    # and the chunking is real: a model without it differs on the same document
    _, full = model_of(
        "model.n_layers=4",
        "model.nope_every=2",
        "model.qk_norm=true",
        "model.floor_scale=3",
        "model.attn_scale=0.5",
        "model.moe.path=loop",
    )
    with torch.no_grad():
        assert not torch.allclose(full.eval()(b["input_ids"][:, 6:]), alone, atol=1e-4)


@pytest.mark.parametrize("factor,low,high", [(8.0, 1.0, 4.0), (16.0, 1.0, 1.0), (1.0, 1.0, 4.0)])
def test_rope_scaling_matches_transformers(factor, low, high):
    """Scout's Llama 3 scaling as the Hugging Face config has it (8/1/4), as Meta's reference has it
    (16/1/1), and none."""
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = rope_frequencies(128, 500000.0, factor, low, high, 8192)
    kind = "default" if factor == 1.0 else "llama3"
    rope = {"rope_type": kind, "rope_theta": 500000.0}
    if kind == "llama3":
        rope.update(
            factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=8192
        )
    hf_cfg = Llama4TextConfig(hidden_size=5120, num_attention_heads=40, head_dim=128, rope_parameters=rope)
    if kind == "default":
        expected = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert torch.allclose(ours, expected, rtol=1e-6)
    if factor != 1.0:
        assert ours[-1] == pytest.approx(expected[-1]) and ours[-1] < ours[0] / 1e4


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_matches_transformers_llama4_text_moe(top_k):
    """Router top-k on logits, sigmoid of the chosen logit scaling the expert input, one shared expert."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    hf_cfg = Llama4TextConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=top_k
    )
    torch.manual_seed(0)
    ref = Llama4TextMoe(hf_cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cfg = load_config(
        None,
        [
            "model.size=debug",
            "model.dim=32",
            "model.moe.n_experts=4",
            f"model.moe.top_k={top_k}",
            "model.moe.moe_ffn_dim=48",
            "model.moe.balance=none",
        ],
    ).model
    for path in ("loop", "grouped"):
        cfg.moe.path = path
        moe = MoE(32, cfg.moe).eval()
        with torch.no_grad():
            moe.router.gate.weight.copy_(ref.router.weight)
            moe.experts.w1.copy_(ref.experts.gate_up_proj[..., :48])
            moe.experts.w3.copy_(ref.experts.gate_up_proj[..., 48:])
            moe.experts.w2.copy_(ref.experts.down_proj)
            moe.shared.w1.weight.copy_(ref.shared_expert.gate_proj.weight)
            moe.shared.w3.weight.copy_(ref.shared_expert.up_proj.weight)
            moe.shared.w2.weight.copy_(ref.shared_expert.down_proj.weight)
            x = torch.randn(2, 9, 32)
            want, _ = ref(x)
            got, _, _ = moe(x)
        assert torch.allclose(got.reshape(-1, 32), want, atol=1e-5), path


def test_llama4_named_sizes_have_the_published_shapes():
    cfg, scout = model_of("model.size=llama4-scout", device="meta")
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.dim // m.n_heads) == (5120, 48, 40, 8, 128)
    assert scout.vocab_size == 202048 and len(scout.moe_layers) == 48
    assert [i for i, b in enumerate(scout.decoder.layers) if not b.use_rope] == list(range(3, 48, 4))
    assert all(b.attn.qk_norm == b.use_rope for b in scout.decoder.layers)
    assert tuple(scout.moe_layers[0].experts.w1.shape) == (16, 5120, 8192)
    assert scout.moe_layers[0].shared.w1.weight.shape == (8192, 5120)

    cfg, maverick = model_of("model.size=llama4-maverick", device="meta")
    layers = maverick.decoder.layers
    assert [i for i, b in enumerate(layers) if b.moe is not None] == list(range(1, 48, 2))
    assert tuple(layers[1].moe.experts.w1.shape) == (128, 5120, 8192)
    assert layers[0].ffn.w1.weight.shape == (16384, 5120)  # dense layers: their own, wider FFN
    assert not any(b.attn.qk_norm for b in layers) and all(b.chunked == b.use_rope for b in layers)


def test_mini_sizes_mirror_scout_and_maverick():
    cfg, scout = model_of("model.size=scout-mini", device="meta")
    moe = cfg.model.moe
    assert len(scout.moe_layers) == cfg.model.n_layers  # every layer
    assert (moe.n_experts, moe.top_k, moe.n_shared, moe.score, moe.gate_on) == (16, 1, 1, "sigmoid", "input")
    assert cfg.model.nope_every and cfg.model.attn_chunk and cfg.model.qk_norm

    cfg, maverick = model_of("model.size=maverick-mini", device="meta")
    moe = cfg.model.moe
    assert [b.moe is not None for b in maverick.decoder.layers] == [False, True] * (cfg.model.n_layers // 2)
    assert moe.n_experts > 16 and (moe.top_k, moe.n_shared) == (1, 1)
    assert cfg.model.nope_every and cfg.model.attn_chunk and not cfg.model.qk_norm
