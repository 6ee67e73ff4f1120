"""Tensor names both ways: which Hugging Face Llama 4 tensor makes each fusion decoder tensor
(`entries_from_hf`) and back (`entries_to_hf`), and the routed experts a checkpoint holds
(`count_experts`, the check that none is lost).

Weight layout (fusion <- Hugging Face, per layer i; E experts, D dim, H expert width):
    attn.wq/wk/wv/wo           <- self_attn.q_proj/k_proj/v_proj/o_proj (both interleave RoPE pairs)
    attn_norm, ffn_norm        <- input_layernorm, post_attention_layernorm
    ffn.w1/w3/w2 (dense)       <- feed_forward.gate_proj/up_proj/down_proj
    moe.router.gate            <- feed_forward.router
    moe.experts.w1, w3 (E,D,H) <- feed_forward.experts.gate_up_proj (E, D, 2H): gate half, up half
    moe.experts.w2 (E,H,D)     <- feed_forward.experts.down_proj (E, H, D)
    moe.shared.w1/w3/w2        <- feed_forward.shared_expert.gate_proj/up_proj/down_proj
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusion.config import ModelConfig, moe_layer_ids
from fusion.convert.errors import ConvertError
from fusion.convert.tensor_files import Entry, SafeTensorsDir


def hf_prefixes(w: SafeTensorsDir) -> tuple[str, str | None]:
    """(prefix of the text model's tensors, key of the output head or None)."""
    for prefix in ("model.", "language_model.model.", "model.language_model.", ""):
        if prefix + "embed_tokens.weight" in w:
            break
    else:
        raise ConvertError(
            f"{w.dir}: no embed_tokens.weight under any known prefix (model., "
            "language_model.model.): not a Llama 4 text checkpoint"
        )
    for head in ("lm_head.weight", "language_model.lm_head.weight"):
        if head in w:
            return prefix, head
    return prefix, None


def _expert_tensors(w: SafeTensorsDir, base: str, E: int, H: int):
    """(w1, w3, w2) makers for one MoE layer, from the fused or the per-expert layout."""
    fused = base + "experts.gate_up_proj"
    if fused in w:
        return (
            lambda: w.get(fused)[..., :H],
            lambda: w.get(fused)[..., H:],
            lambda: w.get(base + "experts.down_proj"),
        )
    per = base + "experts.0.gate_proj.weight"
    if per in w:

        def stack(name):
            return lambda: torch.stack([w.get(f"{base}experts.{e}.{name}.weight").t() for e in range(E)])

        return stack("gate_proj"), stack("up_proj"), stack("down_proj")
    raise ConvertError(f"{w.dir}: MoE layer has neither '{fused}' nor '{per}'")


def entries_from_hf(w: SafeTensorsDir, m: ModelConfig, expected: dict[str, tuple]) -> dict[str, Callable]:
    """Fusion state-dict key -> maker, for every decoder tensor of the model."""
    prefix, head = hf_prefixes(w)
    out: dict[str, Callable] = {}

    def hf(key):
        return lambda: w.get(key)

    out["decoder.tok_embeddings.weight"] = hf(prefix + "embed_tokens.weight")
    out["decoder.norm.weight"] = hf(prefix + "norm.weight")
    if head is not None and not m.tie_embeddings:
        out["decoder.output.weight"] = hf(head)
    else:
        out["decoder.output.weight"] = hf(prefix + "embed_tokens.weight")
    moe_ids = set(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts))
    for i in range(m.n_layers):
        src, dst = f"{prefix}layers.{i}.", f"decoder.layers.{i}."
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{dst}attn.{a}.weight"] = hf(f"{src}self_attn.{b}.weight")
        out[f"{dst}attn_norm.weight"] = hf(f"{src}input_layernorm.weight")
        out[f"{dst}ffn_norm.weight"] = hf(f"{src}post_attention_layernorm.weight")
        ff = f"{src}feed_forward."
        if i in moe_ids:
            out[f"{dst}moe.router.gate.weight"] = hf(ff + "router.weight")
            E = m.moe.n_experts
            out[f"{dst}moe.router.expert_bias"] = lambda E=E: torch.zeros(E, dtype=torch.float32)
            w1, w3, w2 = _expert_tensors(w, ff, E, m.moe.moe_ffn_dim)
            out[f"{dst}moe.experts.w1"], out[f"{dst}moe.experts.w3"], out[f"{dst}moe.experts.w2"] = w1, w3, w2
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}moe.shared.{a}.weight"] = hf(f"{ff}shared_expert.{b}.weight")
        else:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}ffn.{a}.weight"] = hf(f"{ff}{b}.weight")
    unknown = sorted(k for k in out if k not in expected)
    assert not unknown, f"weight map names keys the model lacks: {unknown[:3]}"
    return out


def entries_to_hf(src: SafeTensorsDir, m: ModelConfig, dtype: torch.dtype | None = None) -> list[Entry]:
    """Hugging Face `Llama4ForCausalLM` tensors, made from a fusion model's, in checkpoint order."""
    out: list[Entry] = []

    def copy(hf_key, key):
        out.append(Entry(hf_key, src.shape(key), dtype or src.dtype(key), lambda: src.get(key)))

    copy("model.embed_tokens.weight", "decoder.tok_embeddings.weight")
    copy("model.norm.weight", "decoder.norm.weight")
    if not m.tie_embeddings:
        copy("lm_head.weight", "decoder.output.weight")
    moe_ids = set(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts))
    for i in range(m.n_layers):
        s, d = f"decoder.layers.{i}.", f"model.layers.{i}."
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            copy(f"{d}self_attn.{b}.weight", f"{s}attn.{a}.weight")
        copy(f"{d}input_layernorm.weight", f"{s}attn_norm.weight")
        copy(f"{d}post_attention_layernorm.weight", f"{s}ffn_norm.weight")
        ff = f"{d}feed_forward."
        if i in moe_ids:
            copy(ff + "router.weight", f"{s}moe.router.gate.weight")
            E, D, H = src.shape(f"{s}moe.experts.w1")
            out.append(
                Entry(
                    ff + "experts.gate_up_proj",
                    (E, D, 2 * H),
                    dtype or src.dtype(f"{s}moe.experts.w1"),
                    lambda s=s: torch.cat([src.get(f"{s}moe.experts.w1"), src.get(f"{s}moe.experts.w3")], -1),
                )
            )  # (E, D, 2H)
            copy(ff + "experts.down_proj", f"{s}moe.experts.w2")
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                copy(f"{ff}shared_expert.{b}.weight", f"{s}moe.shared.{a}.weight")
        else:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                copy(f"{ff}{b}.weight", f"{s}ffn.{a}.weight")
    return out


def count_experts(w: SafeTensorsDir, layout: str) -> int:
    """Routed experts stored in a checkpoint, summed over layers (`layout`: 'fusion' or 'hf')."""
    n = 0
    for key in w.keys():
        if layout == "fusion" and key.endswith(".moe.experts.w1"):
            n += w.shape(key)[0]
        elif layout == "hf" and key.endswith("experts.gate_up_proj"):
            n += w.shape(key)[0]
        elif layout == "hf" and key.endswith(".gate_proj.weight") and ".experts." in key:
            n += 1
    return n
