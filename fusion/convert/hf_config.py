"""config.json both ways: the fusion `model.*` values of a Hugging Face Llama 4 text config
(`read_hf_text_config`, `model_overrides_from_hf`) and the Llama 4 text config of a fusion decoder
(`hf_config_from_model`). Each direction refuses, naming the key, what the other side cannot hold.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusion.config import ModelConfig, moe_layer_ids
from fusion.convert.errors import ConvertError

CONFIG = "config.json"
ARCHITECTURES = ("Llama4ForCausalLM", "Llama4TextModel", "Llama4ForConditionalGeneration")


def read_hf_text_config(hf_dir: Path) -> tuple[dict, str]:
    """(the text model's config dict, the architecture) of `hf_dir`'s config.json; refuses a file
    that is not a Llama 4 text or conditional-generation config."""
    path = hf_dir / CONFIG
    if not path.is_file():
        raise ConvertError(f"{path} not found: HF_DIR must hold a Hugging Face Llama 4 config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch and arch not in ARCHITECTURES:
        raise ConvertError(f"{path}: 'architectures' is {arch}; expected one of {', '.join(ARCHITECTURES)}")
    if "text_config" in cfg:
        tc = cfg["text_config"]
        arch = arch or "Llama4ForConditionalGeneration"
    else:
        tc = cfg
    if tc.get("model_type") not in (None, "llama4_text", "llama4"):
        raise ConvertError(f"{path}: model_type is {tc.get('model_type')!r}, not a Llama 4 text model")
    return tc, arch or "Llama4ForCausalLM"


def _rope_params(tc: dict, path: Path) -> dict:
    """rope_theta and Llama 3 scaling from either layout: `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (transformers 4 and the published configs)."""
    params = dict(tc.get("rope_parameters") or {})
    if not params:
        params = dict(tc.get("rope_scaling") or {})
        params.setdefault("rope_theta", tc.get("rope_theta", 500000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ConvertError(f"{path}: rope type {kind!r} is not supported (default or llama3)")
    out = {"rope_theta": float(params.get("rope_theta", tc.get("rope_theta", 500000.0)))}
    if kind == "llama3":
        out.update(
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            rope_original_ctx=int(params.get("original_max_position_embeddings", 8192)),
        )
    return out


def _attention_layout(tc: dict, L: int, path: Path) -> tuple[int, int]:
    """(nope_every, attn_chunk) of the config's NoPE layers and chunked attention; refuses a layout
    fusion cannot build (NoPE layers other than one every k, chunking other than the RoPE layers)."""
    # NoPE layers: fusion places them every nope_every layers, as Llama 4's no_rope_layer_interval
    no_rope = tc.get("no_rope_layers") or []
    interval = tc.get("no_rope_layer_interval", 4)
    if not no_rope:
        no_rope = [int((i + 1) % interval != 0) for i in range(L)]
    nope_ids = [i for i, r in enumerate(no_rope) if not r]
    nope_every = nope_ids[0] + 1 if nope_ids else 0
    if nope_ids != [i for i in range(L) if nope_every and (i + 1) % nope_every == 0]:
        raise ConvertError(
            f"{path}: key 'no_rope_layers' puts NoPE layers at {nope_ids}; fusion supports "
            f"one every k layers (k-1, 2k-1, ...)"
        )

    chunk = tc.get("attention_chunk_size") or 0
    types = tc.get("layer_types")
    if types:
        expect = ["chunked_attention" if r and chunk else "full_attention" for r in no_rope]
        if list(types) != expect:
            raise ConvertError(
                f"{path}: key 'layer_types' is {types}; fusion chunks exactly the RoPE layers "
                f"when attention_chunk_size is set"
            )
    return nope_every, chunk


def _moe_layer_ids(tc: dict, L: int, path: Path) -> list[int]:
    """The config's MoE layer ids (`moe_layers`, else every `interleave_moe_layer_step`); refuses
    any placement other than one every k layers."""
    step = tc.get("interleave_moe_layer_step", 1)
    moe_ids = tc.get("moe_layers")
    if moe_ids is None:
        moe_ids = list(range(step - 1, L, step))
    if list(moe_ids) and list(moe_ids) != list(range(moe_ids[0], L, moe_ids[0] + 1)):
        raise ConvertError(
            f"{path}: key 'moe_layers' is {moe_ids}; fusion supports MoE layers every k "
            f"layers (k-1, 2k-1, ...)"
        )
    return moe_ids


def model_overrides_from_hf(tc: dict, path: Path) -> dict:
    """The fusion `model.*` values of a Hugging Face Llama 4 text config; refuses what differs."""

    def need(key):
        if key not in tc:
            raise ConvertError(f"{path}: key '{key}' is missing")
        return tc[key]

    L, D, Hq = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
    Hkv = tc.get("num_key_value_heads") or Hq
    head_dim = tc.get("head_dim") or D // Hq
    if head_dim * Hq != D:
        raise ConvertError(
            f"{path}: key 'head_dim' is {head_dim}, but fusion needs head_dim = hidden_size / "
            f"num_attention_heads = {D}/{Hq}"
        )
    if tc.get("attention_bias"):
        raise ConvertError(f"{path}: key 'attention_bias' is true; fusion's attention has no biases")
    if tc.get("hidden_act", "silu") != "silu":
        raise ConvertError(
            f"{path}: key 'hidden_act' is {tc['hidden_act']!r}; fusion's FFNs are SwiGLU (silu)"
        )

    nope_every, chunk = _attention_layout(tc, L, path)
    n_experts = need("num_local_experts")
    moe_ids = _moe_layer_ids(tc, L, path)
    every = moe_ids[0] + 1 if moe_ids else 1
    if not moe_ids:
        n_experts = 0

    tuning = tc.get("attn_temperature_tuning", True)
    out = dict(
        vocab_size=need("vocab_size"),
        dim=D,
        n_layers=L,
        n_heads=Hq,
        n_kv_heads=Hkv,
        ffn_dim=tc.get("intermediate_size_mlp", 16384),
        norm_eps=float(tc.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(tc.get("tie_word_embeddings", False)),
        nope_every=nope_every,
        attn_chunk=int(chunk),
        qk_norm=bool(tc.get("use_qk_norm", True)),
        temp_tuning=bool(tuning),
        floor_scale=int(tc.get("floor_scale", 8192)),
        attn_scale=float(tc.get("attn_scale", 0.1)),
        rope_factor=1.0,
        moe=dict(
            n_experts=n_experts,
            top_k=tc.get("num_experts_per_tok", 1),
            n_shared=1,
            every=every,
            moe_ffn_dim=need("intermediate_size"),
            score="sigmoid",
            gate_on="input",
        ),
    )
    out.update(_rope_params(tc, path))
    return out


def hf_config_from_model(m: ModelConfig, vocab_size: int, special) -> dict:
    """A transformers `Llama4TextConfig` dict for a fusion decoder (refuses what Llama 4 cannot hold)."""
    moe = m.moe
    if m.fusion != "early" or m.dense_baseline:  # the research switches (README: Research switches)
        key = "model.fusion" if m.fusion != "early" else "model.dense_baseline"
        raise ConvertError(
            f"config key '{key}': a late-fusion or dense-baseline model has no Hugging Face "
            "Llama 4 text equivalent; to-hf converts early-fusion models as built"
        )
    moe_ids = moe_layer_ids(m.n_layers, moe.every, moe.n_experts)
    if moe_ids:
        for key, value, want in (
            ("score", moe.score, "sigmoid"),
            ("gate_on", moe.gate_on, "input"),
            ("n_shared", moe.n_shared, 1),
        ):
            if value != want:
                raise ConvertError(
                    f"config key 'model.moe.{key}' is {value!r}; a Hugging Face Llama 4 MoE "
                    f"layer needs {want!r}"
                )
    no_rope = [int(m.nope_every == 0 or (i + 1) % m.nope_every != 0) for i in range(m.n_layers)]
    if m.rope_factor == 1.0:
        rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:
        rope = {
            "rope_type": "llama3",
            "rope_theta": m.rope_theta,
            "factor": m.rope_factor,
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_ctx,
        }
    chunk = m.attn_chunk or None
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.dim // m.n_heads,
        "intermediate_size": moe.moe_ffn_dim,
        "intermediate_size_mlp": m.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "num_local_experts": max(moe.n_experts, 1),
        "num_experts_per_tok": moe.top_k,
        "interleave_moe_layer_step": moe.every,
        "moe_layers": moe_ids,
        "no_rope_layers": no_rope,
        "attention_chunk_size": chunk,
        "layer_types": ["chunked_attention" if r and chunk else "full_attention" for r in no_rope],
        "use_qk_norm": m.qk_norm,
        "attn_temperature_tuning": m.temp_tuning,
        "floor_scale": m.floor_scale,
        "attn_scale": m.attn_scale,
        "rope_parameters": rope,
        # the transformers 4 spelling of the same RoPE, for readers of either generation
        "rope_theta": m.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "max_position_embeddings": max(131072, m.rope_original_ctx),
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": "float32",
    }
