"""Named model sizes (`model.size`): the one place model shapes are defined. Explicit `model.*`
keys override them."""

from __future__ import annotations

from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU
    "debug": dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=256,
        moe=dict(n_experts=4, top_k=1, n_shared=1, every=1, moe_ffn_dim=128),
    ),
    # minutes on 2 CPU cores
    "demo": dict(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=512,
        moe=dict(n_experts=4, top_k=1, n_shared=1, every=2, moe_ffn_dim=256),
    ),
    # one GPU
    "small": dict(
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_dim=3072,
        moe=dict(n_experts=16, top_k=1, n_shared=1, every=2, moe_ffn_dim=1536),
    ),
    # Scout's shape at small scale: 16 coarse experts in every layer, top-1 + 1 shared; NoPE every
    # 4th layer, 512-token chunks elsewhere, QK norm
    "scout-mini": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=2048,
        nope_every=4,
        attn_chunk=512,
        qk_norm=True,
        floor_scale=512,
        moe=dict(
            n_experts=16, top_k=1, n_shared=1, every=1, moe_ffn_dim=1024, score="sigmoid", gate_on="input"
        ),
    ),
    # Maverick's shape at small scale: many fine-grained experts every other layer, top-1 + 1 shared;
    # NoPE every 4th layer, 512-token chunks elsewhere, no QK norm (as Maverick)
    "maverick-mini": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=4096,
        nope_every=4,
        attn_chunk=512,
        qk_norm=False,
        floor_scale=512,
        moe=dict(
            n_experts=64, top_k=1, n_shared=1, every=2, moe_ffn_dim=1024, score="sigmoid", gate_on="input"
        ),
    ),
    # The published text models (Hugging Face meta-llama/Llama-4-Scout-17B-16E and
    # Llama-4-Maverick-17B-128E config.json, text_config). Far too big to train here: build them on
    # the meta device to count (fusion-plan), or start from their weights (fusion-convert from-hf).
    "llama4-scout": dict(
        vocab_size=202048,
        dim=5120,
        n_layers=48,
        n_heads=40,
        n_kv_heads=8,
        ffn_dim=16384,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_ctx=8192,
        nope_every=4,
        attn_chunk=8192,
        qk_norm=True,
        temp_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        moe=dict(
            n_experts=16, top_k=1, n_shared=1, every=1, moe_ffn_dim=8192, score="sigmoid", gate_on="input"
        ),
    ),
    "llama4-maverick": dict(
        vocab_size=202048,
        dim=5120,
        n_layers=48,
        n_heads=40,
        n_kv_heads=8,
        ffn_dim=16384,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_factor=1.0,
        nope_every=4,
        attn_chunk=8192,
        qk_norm=False,
        temp_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        moe=dict(
            n_experts=128, top_k=1, n_shared=1, every=2, moe_ffn_dim=8192, score="sigmoid", gate_on="input"
        ),
    ),
}
