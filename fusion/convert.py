"""fusion-convert: Hugging Face Llama 4 text checkpoints in and out.

    fusion-convert from-hf HF_DIR OUT_DIR        # then fusion.load_model(OUT_DIR)
    fusion-convert to-hf RUN_OR_CKPT OUT_DIR     # then Llama4ForCausalLM.from_pretrained(OUT_DIR)

from-hf reads `config.json` and safetensors (one file, or shards listed in
`model.safetensors.index.json`) of a `Llama4ForCausalLM`, a bare `Llama4TextModel`, or the text part
of a `Llama4ForConditionalGeneration`, and writes a fusion model directory (`model.safetensors` +
`model.json`, the format `fusion.checkpoint.export_model` writes). The vision tower, which the
Hugging Face vision model does not map onto, starts from random weights. to-hf writes `config.json`
+ `model.safetensors` of a `Llama4ForCausalLM` (the decoder only). Pickled weights (`*.bin`,
`*.pt`) are never read. Tensors are streamed one at a time, so memory stays near one tensor.

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

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fusion.config import ModelConfig, model_overrides, moe_layer_ids

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
ARCHITECTURES = ("Llama4ForCausalLM", "Llama4TextModel", "Llama4ForConditionalGeneration")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class ConvertError(ValueError):
    """A checkpoint that cannot be converted, with a message naming the file, key or flag."""


# ---------------------------------------------------------------------------------------------
# reading safetensors lazily (never unpickling)
# ---------------------------------------------------------------------------------------------


class SafeTensorsDir:
    """Name -> tensor over a directory's safetensors (single file or sharded index), read lazily."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = directory
        if (directory / INDEX).is_file():
            try:
                weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{directory / INDEX}: not a safetensors index with a weight_map ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            pickled = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = (f" (found {', '.join(sorted(pickled)[:3])}: pickled weights are not read; save the "
                    "model with safetensors first)") if pickled else ""
            raise ConvertError(f"{directory}: no {WEIGHTS} or {INDEX}{hint}")
        self._handles = {}
        self.where: dict[str, str] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConvertError(f"{directory / INDEX} lists {name}, which does not exist")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.where[key] = name

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ConvertError(f"{self.dir}: tensor '{key}' is missing from the checkpoint")
        return self._handles[self.where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._slice(key).get_dtype()
        for dt, c in _ST_DTYPES.items():
            if c == code:
                return dt
        raise ConvertError(f"{self.dir}: tensor '{key}' has unsupported dtype {code}")

    def _slice(self, key: str):
        if key not in self.where:
            raise ConvertError(f"{self.dir}: tensor '{key}' is missing from the checkpoint")
        return self._handles[self.where[key]].get_slice(key)


# ---------------------------------------------------------------------------------------------
# writing safetensors one tensor at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One output tensor: its shape and dtype up front (for the header), its data on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def write_safetensors(path: Path, entries: list[Entry]) -> None:
    """The safetensors layout (8-byte little-endian header length, JSON header, raw little-endian
    data in header order), written tensor by tensor to `path` via a temporary file."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        n = e.dtype.itemsize
        for d in e.shape:
            n *= d
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for e in entries:
            t = e.make()
            if tuple(t.shape) != e.shape:
                raise ConvertError(f"tensor '{e.name}' has shape {tuple(t.shape)}, expected {e.shape}")
            t = t.to(e.dtype).contiguous().cpu()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def _hf_text_config(hf_dir: Path) -> tuple[dict, str]:
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
        out.update(rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   rope_original_ctx=int(params.get("original_max_position_embeddings", 8192)))
    return out


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
        raise ConvertError(f"{path}: key 'head_dim' is {head_dim}, but fusion needs head_dim = hidden_size / "
                           f"num_attention_heads = {D}/{Hq}")
    if tc.get("attention_bias"):
        raise ConvertError(f"{path}: key 'attention_bias' is true; fusion's attention has no biases")
    if tc.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{path}: key 'hidden_act' is {tc['hidden_act']!r}; fusion's FFNs are SwiGLU (silu)")

    # NoPE layers: fusion places them every nope_every layers, as Llama 4's no_rope_layer_interval
    no_rope = tc.get("no_rope_layers") or []
    interval = tc.get("no_rope_layer_interval", 4)
    if not no_rope:
        no_rope = [int((i + 1) % interval != 0) for i in range(L)]
    nope_ids = [i for i, r in enumerate(no_rope) if not r]
    nope_every = nope_ids[0] + 1 if nope_ids else 0
    if nope_ids != [i for i in range(L) if nope_every and (i + 1) % nope_every == 0]:
        raise ConvertError(f"{path}: key 'no_rope_layers' puts NoPE layers at {nope_ids}; fusion supports "
                           f"one every k layers (k-1, 2k-1, ...)")

    chunk = tc.get("attention_chunk_size") or 0
    types = tc.get("layer_types")
    if types:
        expect = ["chunked_attention" if r and chunk else "full_attention" for r in no_rope]
        if list(types) != expect:
            raise ConvertError(f"{path}: key 'layer_types' is {types}; fusion chunks exactly the RoPE layers "
                               f"when attention_chunk_size is set")

    n_experts = need("num_local_experts")
    step = tc.get("interleave_moe_layer_step", 1)
    moe_ids = tc.get("moe_layers")
    if moe_ids is None:
        moe_ids = list(range(step - 1, L, step))
    if list(moe_ids) and list(moe_ids) != list(range(moe_ids[0], L, moe_ids[0] + 1)):
        raise ConvertError(f"{path}: key 'moe_layers' is {moe_ids}; fusion supports MoE layers every k "
                           f"layers (k-1, 2k-1, ...)")
    every = moe_ids[0] + 1 if moe_ids else 1
    if not moe_ids:
        n_experts = 0

    tuning = tc.get("attn_temperature_tuning", True)
    out = dict(
        vocab_size=need("vocab_size"), dim=D, n_layers=L, n_heads=Hq, n_kv_heads=Hkv,
        ffn_dim=tc.get("intermediate_size_mlp", 16384), norm_eps=float(tc.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(tc.get("tie_word_embeddings", False)),
        nope_every=nope_every, attn_chunk=int(chunk), qk_norm=bool(tc.get("use_qk_norm", True)),
        temp_tuning=bool(tuning), floor_scale=int(tc.get("floor_scale", 8192)),
        attn_scale=float(tc.get("attn_scale", 0.1)),
        rope_factor=1.0,
        moe=dict(n_experts=n_experts, top_k=tc.get("num_experts_per_tok", 1), n_shared=1, every=every,
                 moe_ffn_dim=need("intermediate_size"), score="sigmoid", gate_on="input"),
    )
    out.update(_rope_params(tc, path))
    return out


def hf_config_from_model(m: ModelConfig, vocab_size: int, special) -> dict:
    """A transformers `Llama4TextConfig` dict for a fusion decoder (refuses what Llama 4 cannot hold)."""
    moe = m.moe
    if m.fusion != "early" or m.dense_baseline:  # issue #9's research switches
        key = "model.fusion" if m.fusion != "early" else "model.dense_baseline"
        raise ConvertError(f"config key '{key}': a late-fusion or dense-baseline model has no Hugging Face "
                           "Llama 4 text equivalent; to-hf converts early-fusion models as built")
    moe_ids = moe_layer_ids(m.n_layers, moe.every, moe.n_experts)
    if moe_ids:
        for key, value, want in (("score", moe.score, "sigmoid"), ("gate_on", moe.gate_on, "input"),
                                 ("n_shared", moe.n_shared, 1)):
            if value != want:
                raise ConvertError(f"config key 'model.moe.{key}' is {value!r}; a Hugging Face Llama 4 MoE "
                                   f"layer needs {want!r}")
    no_rope = [int(m.nope_every == 0 or (i + 1) % m.nope_every != 0) for i in range(m.n_layers)]
    if m.rope_factor == 1.0:
        rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": m.rope_factor,
                "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_ctx}
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


# ---------------------------------------------------------------------------------------------
# weight maps: fusion decoder key -> how to make it from Hugging Face tensors, and back
# ---------------------------------------------------------------------------------------------


def _hf_prefixes(w: SafeTensorsDir) -> tuple[str, str | None]:
    """(prefix of the text model's tensors, key of the output head or None)."""
    for prefix in ("model.", "language_model.model.", "model.language_model.", ""):
        if prefix + "embed_tokens.weight" in w:
            break
    else:
        raise ConvertError(f"{w.dir}: no embed_tokens.weight under any known prefix (model., "
                           "language_model.model.): not a Llama 4 text checkpoint")
    for head in ("lm_head.weight", "language_model.lm_head.weight"):
        if head in w:
            return prefix, head
    return prefix, None


def _expert_tensors(w: SafeTensorsDir, base: str, E: int, H: int):
    """(w1, w3, w2) makers for one MoE layer, from the fused or the per-expert layout."""
    fused = base + "experts.gate_up_proj"
    if fused in w:
        return (lambda: w.get(fused)[..., :H], lambda: w.get(fused)[..., H:],
                lambda: w.get(base + "experts.down_proj"))
    per = base + "experts.0.gate_proj.weight"
    if per in w:
        def stack(name):
            return lambda: torch.stack([w.get(f"{base}experts.{e}.{name}.weight").t() for e in range(E)])
        return stack("gate_proj"), stack("up_proj"), stack("down_proj")
    raise ConvertError(f"{w.dir}: MoE layer has neither '{fused}' nor '{per}'")


def entries_from_hf(w: SafeTensorsDir, m: ModelConfig, expected: dict[str, tuple]) -> dict[str, Callable]:
    """Fusion state-dict key -> maker, for every decoder tensor of the model."""
    prefix, head = _hf_prefixes(w)
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
            out.append(Entry(ff + "experts.gate_up_proj", (E, D, 2 * H), dtype or src.dtype(f"{s}moe.experts.w1"),
                             lambda s=s: torch.cat([src.get(f"{s}moe.experts.w1"),
                                                    src.get(f"{s}moe.experts.w3")], -1)))  # (E, D, 2H)
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


# ---------------------------------------------------------------------------------------------
# the two directions
# ---------------------------------------------------------------------------------------------


def _check_out_dir(out: Path, names: tuple[str, ...], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"OUT_DIR {out} exists and is not a directory")
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise ConvertError(f"OUT_DIR {out} already holds {', '.join(clash)}; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)


def from_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "", seed: int = 0,
            force: bool = False, log=print) -> Path:
    """Hugging Face Llama 4 text checkpoint -> fusion model directory. Returns the directory."""
    from fusion.config import ConfigError, load_config, to_dict
    from fusion.data.tokenizer import build_tokenizer
    from fusion.schema import SpecialIds
    from fusion.model.fusion import FusionModel
    from fusion.model.vision import VisionTower

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"HF_DIR {hf_dir} is not a directory")
    tc, arch = _hf_text_config(hf_dir)
    values = model_overrides_from_hf(tc, hf_dir / CONFIG)
    weights = SafeTensorsDir(hf_dir)
    if _hf_prefixes(weights)[1] is None and not values["tie_embeddings"]:
        log(f"note: {hf_dir} has no lm_head (a bare Llama4TextModel): the output head is tied to the "
            "input embeddings")
        values["tie_embeddings"] = True

    tok_spec = "byte"
    if (hf_dir / "tokenizer.json").is_file():
        tok_spec = "tokenizer.json"
    tokenizer = build_tokenizer(str(hf_dir / tok_spec) if tok_spec != "byte" else "byte")
    if tokenizer.vocab_size > values["vocab_size"]:
        raise ConvertError(f"{hf_dir}: the tokenizer needs {tokenizer.vocab_size} ids (fusion's special tokens "
                           f"appended) but vocab_size is {values['vocab_size']}"
                           + ("" if tok_spec != "byte" else "; add the checkpoint's tokenizer.json"))

    overrides = model_overrides(values)
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        raise ConvertError(f"{hf_dir / CONFIG}: {e}") from None
    m = cfg.model

    # the model's own key set, shapes and dtypes, without allocating it
    with torch.device("meta"):
        skeleton = FusionModel(m, values["vocab_size"], SpecialIds.of(tokenizer))
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    makers = entries_from_hf(weights, m, expected)

    # the vision tower has no Hugging Face counterpart here: fresh weights, seeded
    torch.manual_seed(seed)
    tower = VisionTower(m.vision, m.dim, m.init_std)
    for k, v in tower.state_dict().items():
        makers[f"vision.{k}"] = lambda v=v: v
    missing = sorted(k for k in expected if k not in makers)
    assert not missing, f"no source for {len(missing)} model tensors, e.g. {missing[:3]}"

    # decoder tensors keep the checkpoint's dtype (or --dtype); the fresh vision tower is fp32
    stored = weights.dtype(_hf_prefixes(weights)[0] + "embed_tokens.weight")
    target = DTYPES[dtype] if dtype else None
    entries = []
    for name in sorted(expected):
        shape, model_dtype = expected[name]
        if name.endswith("expert_bias"):
            out_dtype = torch.float32
        elif name.startswith("decoder."):
            out_dtype = target or stored
        else:
            out_dtype = target or model_dtype
        entries.append(Entry(name, shape, out_dtype, makers[name]))

    _check_out_dir(out, (WEIGHTS, "model.json"), force)
    write_safetensors(out / WEIGHTS, entries)
    meta = {"model": to_dict(cfg)["model"], "tokenizer": tok_spec, "vocab_size": values["vocab_size"],
            "source": {"format": "huggingface", "architecture": arch, "path": str(hf_dir.resolve())}}
    if tok_spec != "byte":
        shutil.copyfile(hf_dir / tok_spec, out / tok_spec)
    (out / "model.json").write_text(json.dumps(meta, indent=1))

    written = SafeTensorsDir(out)
    n_hf, n_fu = count_experts(weights, "hf"), count_experts(written, "fusion")
    if n_hf != n_fu:
        raise ConvertError(f"{hf_dir} holds {n_hf} routed experts but {n_fu} were written")
    n_moe = len(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts))
    log(f"from-hf: {arch} {hf_dir} -> {out}: {m.n_layers} layers ({n_moe} MoE), {n_fu} routed experts "
        f"+ {n_moe} shared, vocab {values['vocab_size']}, tokenizer {tok_spec}")
    return out


def to_hf(run_or_ckpt: str | Path, out_dir: str | Path, dtype: str = "", force: bool = False,
          ignore_router_bias: bool = False, log=print) -> Path:
    """A fusion model directory (or run / checkpoints dir) -> Hugging Face `Llama4ForCausalLM` dir."""
    from fusion.checkpoint import (MANIFEST, TOKENIZER, CheckpointError, check_weight_shapes,
                                   find_model_dir, read_model_json, verify_checkpoint)
    from fusion.config import ConfigError, load_config
    from fusion.data.tokenizer import build_tokenizer
    from fusion.schema import SpecialIds
    from fusion.model.fusion import FusionModel

    try:
        model_dir = find_model_dir(run_or_ckpt)
        if (model_dir / MANIFEST).is_file():  # a training checkpoint: its files as saved
            verify_checkpoint(model_dir, only=[WEIGHTS, "model.json", TOKENIZER])
        meta = read_model_json(model_dir)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConvertError(str(e)) from None
    where = model_dir / "model.json"
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ConvertError(f"{where}: key 'vocab_size' is missing or not a positive integer")
    try:
        # the vision tower's pretrained file is neither exported nor needed
        cfg = load_config(None, model_overrides(meta["model"]) + ['model.vision.checkpoint=""'], source="it")
    except ConfigError as e:
        raise ConvertError(f"{where}: {e}") from None
    m = cfg.model
    tok_spec = meta["tokenizer"]
    tok_path = None
    if tok_spec not in ("", "byte"):
        tok_path = model_dir / tok_spec if (model_dir / tok_spec).is_file() else Path(tok_spec)
        if not tok_path.is_file():
            raise ConvertError(f"{where}: tokenizer {tok_spec} not found")
    try:
        tokenizer = build_tokenizer(str(tok_path) if tok_path else "byte")
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    hf_cfg = hf_config_from_model(m, vocab, SpecialIds.of(tokenizer))

    src = SafeTensorsDir(model_dir)
    with torch.device("meta"):  # the shapes model.json promises, without allocating them
        skeleton = FusionModel(m, vocab, SpecialIds.of(tokenizer))
    try:
        check_weight_shapes(model_dir / WEIGHTS, {k: src.shape(k) for k in src.keys()},
                            {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    biased = [k for k in src.keys() if k.endswith("router.expert_bias") and src.get(k).abs().max() > 0]
    if biased and not ignore_router_bias:
        raise ConvertError(f"{model_dir}: {len(biased)} MoE layers carry a trained aux-loss-free routing bias "
                           "(model.moe.balance=bias), which a Hugging Face Llama 4 router cannot hold; pass "
                           "--ignore-router-bias to export without it (expert choices will differ)")
    if biased:
        log(f"warning: dropping the routing bias of {len(biased)} MoE layers")
    n_vision = sum(1 for k in src.keys() if k.startswith("vision."))
    entries = entries_to_hf(src, m, DTYPES[dtype] if dtype else None)
    hf_cfg["torch_dtype"] = str(entries[0].dtype).removeprefix("torch.")

    _check_out_dir(out_dir := Path(out_dir), (CONFIG, WEIGHTS), force)
    write_safetensors(out_dir / WEIGHTS, entries)
    (out_dir / CONFIG).write_text(json.dumps(hf_cfg, indent=2))
    if tok_path is not None:
        shutil.copyfile(tok_path, out_dir / "tokenizer.json")
    n_fu, n_hf = count_experts(src, "fusion"), count_experts(SafeTensorsDir(out_dir), "hf")
    if n_fu != n_hf:
        raise ConvertError(f"{model_dir} holds {n_fu} routed experts but {n_hf} were written")
    note = f"; {n_vision} vision tensors not exported (text decoder only)" if n_vision else ""
    log(f"to-hf: {model_dir} -> {out_dir}: Llama4ForCausalLM, {m.n_layers} layers, {n_hf} routed experts{note}")
    return out_dir


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fusion-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{from-hf,to-hf}")
    a = sub.add_parser("from-hf", help="Hugging Face Llama 4 text checkpoint -> fusion model directory")
    a.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and safetensors weights")
    a.add_argument("out_dir", metavar="OUT_DIR", help="fusion model directory to write (fusion.load_model reads it)")
    a.add_argument("--seed", type=int, default=0, help="seed of the fresh vision-tower weights (default 0)")
    b = sub.add_parser("to-hf", help="fusion model -> Hugging Face Llama4ForCausalLM directory")
    b.add_argument("src", metavar="RUN_OR_CKPT", help="a run dir, its checkpoints/ dir, or a checkpoint / model dir")
    b.add_argument("out_dir", metavar="OUT_DIR", help="directory to write config.json + model.safetensors into")
    b.add_argument("--ignore-router-bias", action="store_true",
                   help="export even though MoE layers carry an aux-loss-free routing bias (it is dropped)")
    for s in (a, b):
        s.add_argument("--dtype", choices=sorted(DTYPES), default="",
                       help="store weights in this dtype (default: as stored in the source)")
        s.add_argument("--force", action="store_true", help="overwrite weights already in OUT_DIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from fusion.cli import pipe_safe

    return pipe_safe(lambda: _main(argv))  # `fusion-convert ... | head`: no traceback


def _main(argv) -> int:
    try:
        args = parse_args(argv)
        if args.cmd == "from-hf":
            from_hf(args.hf_dir, args.out_dir, dtype=args.dtype, seed=args.seed, force=args.force)
        else:
            to_hf(args.src, args.out_dir, dtype=args.dtype, force=args.force,
                  ignore_router_bias=args.ignore_router_bias)
    except BrokenPipeError:  # an OSError too: for pipe_safe
        raise
    except (ConvertError, OSError) as e:  # OSError: e.g. a missing file, no permission
        print(f"fusion-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
