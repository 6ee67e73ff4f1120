"""All configuration: typed dataclasses, named sizes, loading, overrides, validation, derived values.

Order of precedence (last wins): dataclass defaults -> the named size `model.size` -> the YAML file
-> `key.sub=value` overrides from the command line. Unknown keys and wrong types raise `ConfigError`
naming the key and where it came from. Derived values are computed once, in `finalize`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# The modalities, in the order of `data.weights` and of every per-modality tensor (data, loss,
# router statistics): text=0, image=1, video=2.
MODALITIES = ("text", "image", "video")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and its source."""


# ---------------------------------------------------------------------------------------------
# dataclasses
# ---------------------------------------------------------------------------------------------


@dataclass
class MoEConfig:
    n_experts: int = 4            # routed experts per MoE layer (0 = every layer dense)
    top_k: int = 1                # routed experts per token
    n_shared: int = 1             # always-on shared experts, each moe_ffn_dim wide
    every: int = 1                # MoE layers are layers every-1, 2*every-1, ... (Llama 4 interleave)
    moe_ffn_dim: int = 128        # hidden width of one routed / shared expert
    score: str = "sigmoid"        # "sigmoid" (Llama 4: top-k on logits, sigmoid of chosen) | "softmax"
    gate_on: str = "input"        # where the routing score multiplies: expert "input" (Llama 4) | "output"
    norm_topk: bool = False       # softmax only: renormalise the K chosen probabilities to sum 1
    balance: str = "bias"         # "aux" (Switch aux loss) | "bias" (DeepSeek-V3 aux-free) | "none"
    aux_coef: float = 1e-2        # weight of the Switch load-balancing loss (balance=aux)
    z_coef: float = 1e-3          # weight of the router z-loss (any balance mode; 0 disables)
    bias_rate: float = 1e-3       # aux-free bias update step per optimizer step (balance=bias)
    path: str = "grouped"         # expert compute: "loop" (reference) | "grouped" (fast / batched) | "fast" (no host sync; GPU)
    ep_size: int = 1              # expert-parallel degree: each layer's experts are split over this many ranks
    n_groups: int = 1             # group-limited routing: experts form n_groups contiguous groups (1 = off)
    topk_groups: int = 1          # ... and each token picks its top_k experts inside its best topk_groups groups


@dataclass
class VisionConfig:
    encoder: str = "patch-linear"  # a timm ViT name, "patch-linear" (Fuyu-style, no ViT) or
                                   # "conv-stem" (strided 3x3 convolutions, total stride patch_size)
    img_size: int = 32
    patch_size: int = 8
    width: int = 0                 # patch-linear / conv-stem output width; 0 = the decoder dim
    pixel_shuffle: bool = False    # Llama 4 pixel-shuffle (ratio 0.5: 4x fewer tokens, 4x channels)
    temporal_merge: int = 1        # video: features of k consecutive frames merged into one group
    max_frames: int = 32           # size of the learned frame-position table
    frame_pos: bool = True         # learned frame-position embedding on every video frame's tokens
    checkpoint: str = ""           # local weights file for the timm model; never a hub download
    freeze: bool = False           # freeze the encoder (the projector still trains)
    lr_scale: float = 1.0          # vision tower learning rate = train.lr * lr_scale
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ModelConfig:
    size: str = "debug"           # a named size from SIZES; explicit keys override it
    vocab_size: int = 0           # 0 = taken from the tokenizer
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 256            # width of the dense SwiGLU layers
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Llama 4 attention (issue #6); the defaults are a plain RoPE decoder with full causal attention
    nope_every: int = 0           # layers nope_every-1, 2*nope_every-1, ... use no RoPE and full causal
                                  # attention over the document (NoPE); 0 = RoPE on every layer
    attn_chunk: int = 0           # RoPE layers attend only inside their attn_chunk-token chunk of the
                                  # document (chunked local attention); 0 = full causal attention
    qk_norm: bool = False         # weightless L2 (RMS) norm of queries and keys on RoPE layers
    temp_tuning: bool = True      # NoPE layers scale queries by 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))
    floor_scale: int = 8192       # positions per step of the NoPE temperature (tokens)
    attn_scale: float = 0.1       # slope of the NoPE temperature
    rope_factor: float = 1.0      # Llama 3 RoPE frequency scaling for long context; 1 = unscaled
    rope_low_freq_factor: float = 1.0   # wavelengths above rope_original_ctx / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # wavelengths below rope_original_ctx / this are kept; between: blended
    rope_original_ctx: int = 8192  # context length the unscaled RoPE was trained for (tokens)
    attn_impl: str = "sdpa"       # packed-sequence attention: "sdpa" (dense T x T bool mask, the reference)
                                  # | "flex" (FlexAttention block masks, no dense mask; compiled on CUDA)
    # research switches (issue #9)
    fusion: str = "early"         # "early": media embeddings spliced into the token stream | "late":
                                  # the decoder sees text only, media enter by gated cross-attention
    xattn_every: int = 1          # late fusion: a gated cross-attention block before layers 0, k, 2k, ...
    dense_baseline: bool = False  # every MoE layer becomes a dense SwiGLU of the same active width:
                                  # (top_k + n_shared) * moe_ffn_dim (router excluded)
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


@dataclass
class DataConfig:
    text: str = ""                 # shard directory, brace pattern or URL list per modality
    image: str = ""                # image-caption (or vqa) shards
    video: str = ""                # video-caption (or vqa) shards
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # text, image, video
    alpha: float = 0.0             # temperature exponent on dataset sizes: p ~ w * n^alpha
    tokenizer: str = "byte"        # "byte", or a local Hugging Face tokenizer.json
    num_workers: int = 1           # DataLoader worker processes per rank and modality
    shuffle_buffer: int = 256      # samples held for shuffling inside a stream
    caption: str = "after"         # caption "after" the media (captioning), "before" it, or "random"
    vqa_loss: str = "answer"       # VQA samples: loss on the "answer" (+ eos) only, or on "all" text
    n_frames: int = 8              # frames sampled per video
    frame_strategy: str = "segment_random"  # uniform | fps | segment_random | segment_middle
    video_backend: str = "auto"    # decord, pyav, or auto (decord with a per-sample PyAV fallback)
    decode_timeout: float = 30.0   # seconds before a video decode is abandoned (counted)
    max_pixels: int = 50_000_000   # images above this (from the header) are skipped and counted
    eval: str = ""                 # VQA set dirs (comma-separated) scored every train.eval_every steps
    eval_limit: int = 200          # questions per set in an in-training evaluation (0 = all)


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    micro_batch: int = 4           # sequences per rank per micro-step
    grad_accum: int = 1            # micro-steps per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup: int = 10               # linear warmup steps
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    zero_stage: int = 0            # DeepSpeed ZeRO stage 0, 1 or 2
    precision: str = "auto"        # "auto" (bf16 on a capable GPU, else fp32) | "fp32" | "bf16"
    ckpt_every: int = 0            # 0 = only at the end
    resume: str = "auto"           # "auto" (latest in run.dir), "none", or a checkpoint path
    keep_checkpoints: int = 0      # keep the newest K checkpoints (0 = keep all)
    max_nonfinite: int = 10        # stop after this many skipped (NaN/Inf) steps in a row (0 = never)
    debug_log: bool = False        # RUN/debug/rank{r}.jsonl: sample keys + weight checksum per step
    log_every: int = 1
    eval_every: int = 0            # 0 = never during training
    peak_tflops: float = 0.0       # accelerator peak for MFU; 0 = look up a known GPU, else no MFU
    activation_checkpointing: int = 0  # recompute decoder layers in backward: 0 off, k = layers 0, k, 2k, ... (1 = all)
    compile: bool = False          # torch.compile each decoder block (best with model.moe.path=fast)
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed keys merged into the generated JSON


@dataclass
class DistillConfig:
    teacher: str = ""              # run dir or checkpoint dir of a frozen teacher ("" = no distillation)
    temperature: float = 1.0       # softmax temperature of the KL term (scaled back by T^2)
    weight: float = 0.5            # loss = (1 - weight) * next-token loss + weight * T^2 * KL(teacher || student)


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# named sizes: the one place model shapes are defined
# ---------------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                  moe=dict(n_experts=4, top_k=1, n_shared=1, every=1, moe_ffn_dim=128)),
    # minutes on 2 CPU cores
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512,
                 moe=dict(n_experts=4, top_k=1, n_shared=1, every=2, moe_ffn_dim=256)),
    # one GPU
    "small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=3072,
                  moe=dict(n_experts=16, top_k=1, n_shared=1, every=2, moe_ffn_dim=1536)),
    # Scout's shape at small scale: 16 coarse experts in every layer, top-1 + 1 shared; NoPE every
    # 4th layer, 512-token chunks elsewhere, QK norm
    "scout-mini": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=2048,
                       nope_every=4, attn_chunk=512, qk_norm=True, floor_scale=512,
                       moe=dict(n_experts=16, top_k=1, n_shared=1, every=1, moe_ffn_dim=1024,
                                score="sigmoid", gate_on="input")),
    # Maverick's shape at small scale: many fine-grained experts every other layer, top-1 + 1 shared;
    # NoPE every 4th layer, 512-token chunks elsewhere, no QK norm (as Maverick)
    "maverick-mini": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=4096,
                          nope_every=4, attn_chunk=512, qk_norm=False, floor_scale=512,
                          moe=dict(n_experts=64, top_k=1, n_shared=1, every=2, moe_ffn_dim=1024,
                                   score="sigmoid", gate_on="input")),
    # The published text models (Hugging Face meta-llama/Llama-4-Scout-17B-16E and
    # Llama-4-Maverick-17B-128E config.json, text_config). Far too big to train here: build them on
    # the meta device to count (fusion-plan), or start from their weights (fusion-convert from-hf).
    "llama4-scout": dict(vocab_size=202048, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                         ffn_dim=16384, norm_eps=1e-5, rope_theta=500000.0, rope_factor=8.0,
                         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_ctx=8192,
                         nope_every=4, attn_chunk=8192, qk_norm=True, temp_tuning=True,
                         floor_scale=8192, attn_scale=0.1,
                         moe=dict(n_experts=16, top_k=1, n_shared=1, every=1, moe_ffn_dim=8192,
                                  score="sigmoid", gate_on="input")),
    "llama4-maverick": dict(vocab_size=202048, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                            ffn_dim=16384, norm_eps=1e-5, rope_theta=500000.0, rope_factor=1.0,
                            nope_every=4, attn_chunk=8192, qk_norm=False, temp_tuning=True,
                            floor_scale=8192, attn_scale=0.1,
                            moe=dict(n_experts=128, top_k=1, n_shared=1, every=2, moe_ffn_dim=8192,
                                     score="sigmoid", gate_on="input")),
}


# ---------------------------------------------------------------------------------------------
# loading and overrides
# ---------------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; dict-typed fields (train.deepspeed) stay whole. A section
    left empty in YAML (`train:` with every key commented out) is no override."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        ftype = _field_type(key)
        if v is None and dataclasses.is_dataclass(ftype):
            continue
        if isinstance(v, dict) and ftype is not dict:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _dict_field(key: str) -> str | None:
    """'train.deepspeed.zero_optimization.stage' -> 'train.deepspeed' (a dict-typed field)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if _field_type(".".join(parts[:i])) is dict:
            return ".".join(parts[:i])
    return None


def _nest(flat: dict[str, Any], source: str) -> dict[str, Any]:
    """Fold `field.sub.key=value` for dict-typed fields into one dict per field, so DeepSpeed keys
    can be given one at a time on the command line (train.deepspeed.zero_optimization.stage=2)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        field = _dict_field(key)
        if field is None:
            if isinstance(value, dict) and isinstance(out.get(key), dict):  # a whole dict field
                value = _merge(out[key], value)
            out[key] = value
            continue
        tree = out.setdefault(field, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config key '{key}' in {source}: '{field}' is not a mapping")
        *path, leaf = key[len(field) + 1:].split(".")
        for part in path:
            tree = tree.setdefault(part, {})
            if not isinstance(tree, dict):
                raise ConfigError(f"config key '{key}' in {source}: '{part}' is not a mapping")
        tree[leaf] = value
    return out


def model_overrides(model: dict) -> list[str]:
    """A model section as a dict (e.g. from model.json) -> `model.key=value` overrides for load_config."""
    return [f"model.{k}={json.dumps(v)}" for k, v in _flatten(model).items()]


def _resolve(key: str) -> tuple[Any, str, Any] | None:
    """Walk `key` through the dataclass tree; return (owner class, leaf name, leaf type) or None."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        ftype = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return cls, part, ftype
        if not dataclasses.is_dataclass(ftype):
            return None
        cls = ftype
    return None


def _field_type(key: str) -> Any:
    r = _resolve(key)
    return None if r is None else r[2]


def _unknown_key_message(key: str, source: str) -> str:
    parts = key.split(".")
    cls: Any = Config
    for part in parts[:-1]:
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            break
        ftype = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(ftype):
            break
        cls = ftype
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(parts[-1], names, n=1)
    suggestion = f" (did you mean '{'.'.join(parts[:-1] + hint[:1])}'?)" if hint else ""
    return f"unknown config key '{key}' in {source}{suggestion}"


def _coerce(key: str, value: Any, ftype: Any, source: str) -> Any:
    """Check (and gently convert) a value against a field type; raise naming the key."""
    def bad() -> ConfigError:
        tname = getattr(ftype, "__name__", str(ftype))
        return ConfigError(f"config key '{key}' in {source}: expected {tname}, got {value!r}")

    origin = typing.get_origin(ftype)
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if ftype is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if ftype is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad()
        return value
    if ftype is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if origin is list:
        (inner,) = typing.get_args(ftype)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(f"{key}[{i}]", v, inner, source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for t in typing.get_args(ftype):
            try:
                return _coerce(key, value, t, source)
            except ConfigError:
                continue
        raise bad()
    raise bad()


def _set(cfg: Config, key: str, value: Any) -> None:
    obj: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' on the command line: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                source: str = "the command line") -> Config:
    """Defaults -> named size -> YAML file -> `key=value` overrides, all checked. Errors name the
    overrides' `source` (e.g. the model.json they were read from)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        data = _read_yaml(path)
        data.pop(META, None)  # a run's own config.yaml: its provenance is not a setting
        layers.append((str(path), _nest(_flatten(data), str(path))))
    cli = dict(_parse_override(o) for o in (overrides or []))
    layers.append((source, _nest(cli, source)))

    # every key is checked before anything is applied, so the first error is the one reported
    for source, flat in layers:
        for key in flat:
            if _resolve(key) is None:
                raise ConfigError(_unknown_key_message(key, source))

    cfg = Config()
    size = cfg.model.size
    for source, flat in layers:
        if "model.size" in flat:
            size = _coerce("model.size", flat["model.size"], str, source)
            size_source = source
    if size not in SIZES:
        raise ConfigError(f"config key 'model.size' in {size_source if size != cfg.model.size else 'defaults'}: "
                          f"unknown size '{size}' (known: {', '.join(SIZES)})")
    apply_size(cfg, size)

    for source, flat in layers:
        for key, value in flat.items():
            if _field_type(key) is dict:  # merged into what earlier layers gave, key by key
                _set(cfg, key, _merge(_get(cfg, key), _coerce(key, value, dict, source)))
                continue
            _set(cfg, key, _coerce(key, value, _field_type(key), source))
    validate(cfg)
    return cfg


def apply_size(cfg: Config, size: str) -> None:
    cfg.model.size = size
    for key, value in _flatten({"model": copy.deepcopy(SIZES[size])}).items():
        _set(cfg, key, value)


# ---------------------------------------------------------------------------------------------
# validation and derived values
# ---------------------------------------------------------------------------------------------

_CHOICES = {
    "model.moe.score": ("sigmoid", "softmax"),
    "model.moe.gate_on": ("input", "output"),
    "model.moe.balance": ("aux", "bias", "none"),
    "model.moe.path": ("loop", "grouped", "fast"),
    "model.attn_impl": ("sdpa", "flex"),
    "model.fusion": ("early", "late"),
    "train.precision": ("auto", "fp32", "bf16"),
    "data.caption": ("after", "before", "random"),
    "data.vqa_loss": ("answer", "all"),
    "data.frame_strategy": ("uniform", "fps", "segment_random", "segment_middle"),
    "data.video_backend": ("auto", "decord", "pyav"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Reject nonsense with one line naming the key."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}': '{_get(cfg, key)}' is not one of {', '.join(choices)}")
    positive = ["model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_dim",
                "model.moe.every", "model.moe.moe_ffn_dim", "model.moe.ep_size",
                "model.vision.img_size", "model.vision.patch_size", "model.vision.temporal_merge",
                "model.vision.max_frames", "data.n_frames", "data.max_pixels", "data.decode_timeout",
                "train.steps", "train.micro_batch", "train.grad_accum", "train.seq_len", "train.log_every"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {_get(cfg, key)}")
    nonneg = ["model.vocab_size", "model.moe.n_experts", "model.moe.n_shared", "model.moe.aux_coef",
              "model.moe.z_coef", "model.moe.bias_rate", "train.lr", "train.warmup", "train.grad_clip",
              "train.ckpt_every", "train.eval_every", "train.weight_decay",
              "train.keep_checkpoints", "train.max_nonfinite",
              "data.num_workers", "data.shuffle_buffer", "data.alpha", "train.peak_tflops", "data.eval_limit",
              "model.vision.width", "model.vision.lr_scale"]
    for key in nonneg:
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {_get(cfg, key)}")
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError(f"config key 'model.n_heads': model.dim={m.dim} is not divisible by n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"config key 'model.n_heads': head dim {m.dim // m.n_heads} must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"config key 'model.n_kv_heads': n_heads={m.n_heads} is not divisible by "
                          f"n_kv_heads={m.n_kv_heads}")
    for key in ("model.nope_every", "model.attn_chunk"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (0 = off), got {_get(cfg, key)}")
    for key in ("model.floor_scale", "model.rope_factor", "model.rope_low_freq_factor",
                "model.rope_original_ctx"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {_get(cfg, key)}")
    if m.rope_high_freq_factor < m.rope_low_freq_factor:
        raise ConfigError(f"config key 'model.rope_high_freq_factor': {m.rope_high_freq_factor} is below "
                          f"model.rope_low_freq_factor={m.rope_low_freq_factor}")
    if m.moe.n_experts and not 1 <= m.moe.top_k <= m.moe.n_experts:
        raise ConfigError(f"config key 'model.moe.top_k': must be in 1..n_experts={m.moe.n_experts}, "
                          f"got {m.moe.top_k}")
    if m.moe.n_experts and m.moe.n_experts % m.moe.ep_size:
        raise ConfigError(f"config key 'model.moe.ep_size': n_experts={m.moe.n_experts} is not divisible "
                          f"by ep_size={m.moe.ep_size}")
    if m.moe.n_groups < 1 or (m.moe.n_experts and m.moe.n_experts % m.moe.n_groups):
        raise ConfigError(f"config key 'model.moe.n_groups': must be >= 1 and divide "
                          f"n_experts={m.moe.n_experts}, got {m.moe.n_groups}")
    if not 1 <= m.moe.topk_groups <= m.moe.n_groups:
        raise ConfigError(f"config key 'model.moe.topk_groups': must be in 1..n_groups={m.moe.n_groups}, "
                          f"got {m.moe.topk_groups}")
    if m.moe.n_experts and m.moe.top_k > m.moe.topk_groups * (m.moe.n_experts // m.moe.n_groups):
        raise ConfigError(f"config key 'model.moe.topk_groups': top_k={m.moe.top_k} experts do not fit in "
                          f"{m.moe.topk_groups} group(s) of {m.moe.n_experts // m.moe.n_groups} experts")
    if cfg.train.activation_checkpointing < 0:
        raise ConfigError(f"config key 'train.activation_checkpointing' must be >= 0 (0 = off), "
                          f"got {cfg.train.activation_checkpointing}")
    if len(cfg.data.weights) != 3:
        raise ConfigError(f"config key 'data.weights': expected 3 weights (text, image, video), "
                          f"got {cfg.data.weights}")
    if any(w < 0 for w in cfg.data.weights):
        raise ConfigError(f"config key 'data.weights': weights must be >= 0, got {cfg.data.weights}")
    v = m.vision
    if v.img_size % v.patch_size:
        raise ConfigError(f"config key 'model.vision.patch_size': img_size={v.img_size} is not divisible "
                          f"by patch_size={v.patch_size}")
    if v.pixel_shuffle and (v.img_size // v.patch_size) % 2:
        raise ConfigError(f"config key 'model.vision.pixel_shuffle': the patch grid "
                          f"{v.img_size // v.patch_size} must be even to shuffle")
    if cfg.data.n_frames % v.temporal_merge:
        raise ConfigError(f"config key 'data.n_frames': {cfg.data.n_frames} frames are not divisible by "
                          f"model.vision.temporal_merge={v.temporal_merge}")
    if cfg.data.n_frames > v.max_frames:
        raise ConfigError(f"config key 'data.n_frames': {cfg.data.n_frames} frames exceed "
                          f"model.vision.max_frames={v.max_frames}")
    if cfg.data.image and tokens_per_image(v) + 2 > cfg.train.seq_len:
        raise ConfigError(f"config key 'train.seq_len': {cfg.train.seq_len} is smaller than one image's "
                          f"{tokens_per_image(v) + 2} tokens")
    if cfg.data.video and tokens_per_video(v, cfg.data.n_frames) > cfg.train.seq_len:
        raise ConfigError(f"config key 'train.seq_len': {cfg.train.seq_len} is smaller than one video's "
                          f"{tokens_per_video(v, cfg.data.n_frames)} tokens ({cfg.data.n_frames} frames)")
    if cfg.train.eval_every and not cfg.data.eval:
        raise ConfigError("config key 'train.eval_every' is set but 'data.eval' names no VQA set")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"config key 'train.betas': expected two values, got {cfg.train.betas}")
    if not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"config key 'train.betas': each must be in [0, 1), got {cfg.train.betas}")
    if not 0 <= cfg.train.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {cfg.train.min_lr_ratio}")
    for key in ("model.norm_eps", "model.rope_theta", "model.init_std"):
        if not _get(cfg, key) > 0:
            raise ConfigError(f"config key '{key}' must be positive, got {_get(cfg, key)}")
    if cfg.train.zero_stage not in (0, 1, 2):
        raise ConfigError(f"config key 'train.zero_stage': must be 0, 1 or 2, got {cfg.train.zero_stage}")
    if cfg.train.resume not in ("auto", "none") and not cfg.train.resume:
        raise ConfigError("config key 'train.resume': give 'auto', 'none' or a checkpoint path")
    if m.xattn_every <= 0:
        raise ConfigError(f"config key 'model.xattn_every' must be positive, got {m.xattn_every}")
    if m.dense_baseline and not m.moe.n_experts:
        raise ConfigError("config key 'model.dense_baseline': the model has no MoE layers to replace "
                          "(model.moe.n_experts=0)")
    if cfg.distill.temperature <= 0:
        raise ConfigError(f"config key 'distill.temperature' must be positive, got {cfg.distill.temperature}")
    if not 0 <= cfg.distill.weight <= 1:
        raise ConfigError(f"config key 'distill.weight' must be in [0, 1], got {cfg.distill.weight}")


def moe_layer_ids(n_layers: int, every: int, n_experts: int) -> list[int]:
    """Llama 4 interleave: layers every-1, 2*every-1, ... are MoE (every=1: all of them)."""
    if n_experts == 0:
        return []
    return list(range(every - 1, n_layers, every))


def dense_baseline_ffn_dim(moe: MoEConfig) -> int:
    """Width of the dense SwiGLU that replaces an MoE layer under `model.dense_baseline`: the hidden
    width one token activates there, top_k routed + n_shared shared experts (the router's E x D gate
    has no dense counterpart)."""
    return (moe.top_k + moe.n_shared) * moe.moe_ffn_dim


def tokens_per_image(v: VisionConfig) -> int:
    """Placeholder tokens one image (or one video frame group) becomes."""
    n = (v.img_size // v.patch_size) ** 2
    return n // 4 if v.pixel_shuffle else n


def tokens_per_video(v: VisionConfig, n_frames: int) -> int:
    """Placeholder tokens of a video, markers and frame separators included."""
    groups = n_frames // v.temporal_merge
    return groups * tokens_per_image(v) + (groups - 1) + 2


@dataclass
class Derived:
    world_size: int
    dp_size: int            # data-parallel ranks (all ranks: experts shard inside them)
    global_batch: int       # sequences per optimizer step over all ranks
    tokens_per_step: int
    head_dim: int
    moe_layers: list[int]
    image_tokens: int       # sequence tokens of one image, markers included
    video_tokens: int       # sequence tokens of one video of data.n_frames frames


def finalize(cfg: Config, world_size: int) -> Derived:
    """Every derived value, computed once, with assertions that say what broke."""
    m, t = cfg.model, cfg.train
    if m.moe.ep_size > 1 and world_size % m.moe.ep_size:
        raise ConfigError(f"config key 'model.moe.ep_size': world size {world_size} is not divisible "
                          f"by ep_size={m.moe.ep_size}")
    image_tokens = tokens_per_image(m.vision) + 2
    video_tokens = tokens_per_video(m.vision, cfg.data.n_frames)
    global_batch = t.micro_batch * t.grad_accum * world_size
    assert global_batch == t.micro_batch * t.grad_accum * world_size, \
        "micro_batch * grad_accum * world must equal global_batch"
    return Derived(
        world_size=world_size,
        dp_size=world_size,
        global_batch=global_batch,
        tokens_per_step=global_batch * t.seq_len,
        head_dim=m.dim // m.n_heads,
        moe_layers=[] if m.dense_baseline else moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts),
        image_tokens=image_tokens,
        video_tokens=video_tokens,
    )


def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON, generated from the training config; `train.deepspeed` keys merge on top."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # gradients summed over micro-steps and reduced between ranks in fp32 (DeepSpeed's bf16
        # default does both in bf16). ZeRO 1 then runs DeepSpeed's BF16_Optimizer, ZeRO 2 its ZeRO
        # optimizer with fp32 gradient partitions. BF16_Optimizer adds each bf16 gradient into its
        # fp32 buffer as backward produces it (immediate_grad_update): its other way clears the bf16
        # gradients in a backward prologue that DeepSpeed 0.19.8 hooks onto the forward's output
        # tensors, and it finds none in the model's output dataclass, so every micro-step would add
        # the earlier ones again. Without ZeRO, DeepSpeed 0.19.8 refuses fp32 accumulation
        # ("unsupported mix of model_dtype and grad_accum_dtype"): fusion.parallel.ExpertParallel
        # .attach accumulates those gradients in fp32 itself.
        ds["bf16"]["immediate_grad_update"] = True
        if t.zero_stage > 0:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    return _merge(ds, t.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


META = "_meta"  # provenance section of a run's config.yaml (git sha, versions); ignored on load


def dump_yaml(cfg: Config, extra: dict | None = None) -> str:
    d = to_dict(cfg)
    if extra:
        d = {**d, META: extra}
    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)
