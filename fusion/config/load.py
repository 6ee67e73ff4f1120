"""Loading: defaults -> the named size `model.size` -> the YAML file -> `key.sub=value` overrides
(last wins); unknown keys and wrong types raise ConfigError naming the key and where it came from;
`validate` refuses nonsense values the same way."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fusion.config.fields import Config, ConfigError
from fusion.config.sizes import SIZES
from fusion.schema import tokens_per_image, tokens_per_video


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
                value = merge(out[key], value)
            out[key] = value
            continue
        tree = out.setdefault(field, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config key '{key}' in {source}: '{field}' is not a mapping")
        *path, leaf = key[len(field) + 1 :].split(".")
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
    field_names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(parts[-1], field_names, n=1)
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


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, source: str = "the command line"
) -> Config:
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
        raise ConfigError(
            f"config key 'model.size' in {size_source if size != cfg.model.size else 'defaults'}: "
            f"unknown size '{size}' (known: {', '.join(SIZES)})"
        )
    apply_size(cfg, size)

    for source, flat in layers:
        for key, value in flat.items():
            if _field_type(key) is dict:  # merged into what earlier layers gave, key by key
                _set(cfg, key, merge(_get(cfg, key), _coerce(key, value, dict, source)))
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
    "train.loss_average": ("token", "sample", "square"),
    "train.optimizer": ("adamw", "muon"),
    "data.caption": ("after", "before", "random"),
    "data.vqa_loss": ("answer", "all"),
    "data.question": ("after", "before"),
    "data.frame_strategy": ("uniform", "fps", "segment_random", "segment_middle"),
    "data.video_backend": ("auto", "decord", "pyav"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Reject nonsense with one line naming the key. Signs come first: the later checks divide
    by the values they make positive."""
    _check_choices_and_signs(cfg)
    _check_model_shape(cfg.model)
    _check_moe(cfg.model)
    _check_media_and_lengths(cfg)
    _check_training(cfg)


_POSITIVE = [
    "model.dim",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.ffn_dim",
    "model.moe.every",
    "model.moe.moe_ffn_dim",
    "model.moe.ep_size",
    "model.vision.img_size",
    "model.vision.patch_size",
    "model.vision.temporal_merge",
    "model.vision.max_frames",
    "data.n_frames",
    "data.max_pixels",
    "data.decode_timeout",
    "train.steps",
    "train.micro_batch",
    "train.grad_accum",
    "train.seq_len",
    "train.log_every",
]
_NON_NEGATIVE = [
    "model.vocab_size",
    "model.moe.n_experts",
    "model.moe.n_shared",
    "model.moe.aux_coef",
    "model.moe.z_coef",
    "model.moe.bias_rate",
    "train.lr",
    "train.warmup",
    "train.grad_clip",
    "train.ckpt_every",
    "train.eval_every",
    "train.weight_decay",
    "train.keep_checkpoints",
    "train.max_nonfinite",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.alpha",
    "train.peak_tflops",
    "data.eval_limit",
    "model.vision.width",
    "model.vision.lr_scale",
    "model.vision.encoder_lr_scale",
]


def _check_choices_and_signs(cfg: Config) -> None:
    """Named choices, then the keys that must be positive or >= 0."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}': '{_get(cfg, key)}' is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {_get(cfg, key)}")


def _check_model_shape(m) -> None:
    """Heads, RoPE / NoPE and chunked attention, norms and init, cross-attention spacing (model.*)."""
    if m.dim % m.n_heads:
        raise ConfigError(
            f"config key 'model.n_heads': model.dim={m.dim} is not divisible by n_heads={m.n_heads}"
        )
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"config key 'model.n_heads': head dim {m.dim // m.n_heads} must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"config key 'model.n_kv_heads': n_heads={m.n_heads} is not divisible by "
            f"n_kv_heads={m.n_kv_heads}"
        )
    for name in ("nope_every", "attn_chunk"):
        if getattr(m, name) < 0:
            raise ConfigError(f"config key 'model.{name}' must be >= 0 (0 = off), got {getattr(m, name)}")
    for name in ("floor_scale", "rope_factor", "rope_low_freq_factor", "rope_original_ctx"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"config key 'model.{name}' must be positive, got {getattr(m, name)}")
    if m.rope_high_freq_factor < m.rope_low_freq_factor:
        raise ConfigError(
            f"config key 'model.rope_high_freq_factor': {m.rope_high_freq_factor} is below "
            f"model.rope_low_freq_factor={m.rope_low_freq_factor}"
        )
    for name in ("norm_eps", "rope_theta", "init_std"):
        if not getattr(m, name) > 0:
            raise ConfigError(f"config key 'model.{name}' must be positive, got {getattr(m, name)}")
    if m.xattn_every <= 0:
        raise ConfigError(f"config key 'model.xattn_every' must be positive, got {m.xattn_every}")


def _check_moe(m) -> None:
    """top-k, expert parallelism and group-limited routing against n_experts (model.moe.*), and
    the dense baseline, which needs MoE layers to replace."""
    moe = m.moe
    if moe.n_experts and not 1 <= moe.top_k <= moe.n_experts:
        raise ConfigError(
            f"config key 'model.moe.top_k': must be in 1..n_experts={moe.n_experts}, got {moe.top_k}"
        )
    if moe.n_experts and moe.n_experts % moe.ep_size:
        raise ConfigError(
            f"config key 'model.moe.ep_size': n_experts={moe.n_experts} is not divisible "
            f"by ep_size={moe.ep_size}"
        )
    if moe.n_groups < 1 or (moe.n_experts and moe.n_experts % moe.n_groups):
        raise ConfigError(
            f"config key 'model.moe.n_groups': must be >= 1 and divide "
            f"n_experts={moe.n_experts}, got {moe.n_groups}"
        )
    if not 1 <= moe.topk_groups <= moe.n_groups:
        raise ConfigError(
            f"config key 'model.moe.topk_groups': must be in 1..n_groups={moe.n_groups}, "
            f"got {moe.topk_groups}"
        )
    if moe.n_experts and moe.top_k > moe.topk_groups * (moe.n_experts // moe.n_groups):
        raise ConfigError(
            f"config key 'model.moe.topk_groups': top_k={moe.top_k} experts do not fit in "
            f"{moe.topk_groups} group(s) of {moe.n_experts // moe.n_groups} experts"
        )
    if m.dense_baseline and not moe.n_experts:
        raise ConfigError(
            "config key 'model.dense_baseline': the model has no MoE layers to replace "
            "(model.moe.n_experts=0)"
        )


def _check_media_and_lengths(cfg: Config) -> None:
    """Modality weights, the vision grid and frames, and one image or video fitting in train.seq_len."""
    if len(cfg.data.weights) != 3:
        raise ConfigError(
            f"config key 'data.weights': expected 3 weights (text, image, video), got {cfg.data.weights}"
        )
    if any(w < 0 for w in cfg.data.weights):
        raise ConfigError(f"config key 'data.weights': weights must be >= 0, got {cfg.data.weights}")
    v = cfg.model.vision
    if v.img_size % v.patch_size:
        raise ConfigError(
            f"config key 'model.vision.patch_size': img_size={v.img_size} is not divisible "
            f"by patch_size={v.patch_size}"
        )
    if v.pixel_shuffle and (v.img_size // v.patch_size) % 2:
        raise ConfigError(
            f"config key 'model.vision.pixel_shuffle': the patch grid "
            f"{v.img_size // v.patch_size} must be even to shuffle"
        )
    if cfg.data.n_frames % v.temporal_merge:
        raise ConfigError(
            f"config key 'data.n_frames': {cfg.data.n_frames} frames are not divisible by "
            f"model.vision.temporal_merge={v.temporal_merge}"
        )
    if cfg.data.n_frames > v.max_frames:
        raise ConfigError(
            f"config key 'data.n_frames': {cfg.data.n_frames} frames exceed "
            f"model.vision.max_frames={v.max_frames}"
        )
    if cfg.data.image and tokens_per_image(v) + 2 > cfg.train.seq_len:
        raise ConfigError(
            f"config key 'train.seq_len': {cfg.train.seq_len} is smaller than one image's "
            f"{tokens_per_image(v) + 2} tokens"
        )
    if cfg.data.video and tokens_per_video(v, cfg.data.n_frames) > cfg.train.seq_len:
        raise ConfigError(
            f"config key 'train.seq_len': {cfg.train.seq_len} is smaller than one video's "
            f"{tokens_per_video(v, cfg.data.n_frames)} tokens ({cfg.data.n_frames} frames)"
        )


def _check_training(cfg: Config) -> None:
    """Optimizer, ZeRO, activation checkpointing, evaluation, resuming and distillation (train.*,
    distill.*)."""
    t = cfg.train
    if t.activation_checkpointing < 0:
        raise ConfigError(
            f"config key 'train.activation_checkpointing' must be >= 0 (0 = off), "
            f"got {t.activation_checkpointing}"
        )
    if t.eval_every and not cfg.data.eval:
        raise ConfigError("config key 'train.eval_every' is set but 'data.eval' names no VQA set")
    if len(t.betas) != 2:
        raise ConfigError(f"config key 'train.betas': expected two values, got {t.betas}")
    if not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"config key 'train.betas': each must be in [0, 1), got {t.betas}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"config key 'train.zero_stage': must be 0, 1 or 2, got {t.zero_stage}")
    if t.optimizer == "muon" and t.zero_stage != 0:
        # ZeRO hands the optimizer flat slices of the parameters; Muon orthogonalises whole matrices
        raise ConfigError(
            f"config key 'train.optimizer': muon needs every matrix whole, which ZeRO's flat "
            f"partitions are not: use it with 'train.zero_stage'=0 (got {t.zero_stage}), or adamw"
        )
    if t.resume not in ("auto", "none") and not t.resume:
        raise ConfigError("config key 'train.resume': give 'auto', 'none' or a checkpoint path")
    if cfg.distill.temperature <= 0:
        raise ConfigError(f"config key 'distill.temperature' must be positive, got {cfg.distill.temperature}")
    if not 0 <= cfg.distill.weight <= 1:
        raise ConfigError(f"config key 'distill.weight' must be in [0, 1], got {cfg.distill.weight}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


META = "_meta"  # provenance section of a run's config.yaml (git sha, versions); ignored on load


def dump_yaml(cfg: Config, extra: dict | None = None) -> str:
    d = to_dict(cfg)
    if extra:
        d = {**d, META: extra}
    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)


def merge(base: dict, extra: dict) -> dict:
    """`extra` merged into a copy of `base`, mapping by mapping (the later value wins)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
