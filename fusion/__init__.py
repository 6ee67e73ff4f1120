"""fusion: native multimodal early-fusion MoE pretraining in the style of Llama 4.

The Python API (README, "Python API"):

    import fusion
    cfg = fusion.load_config("configs/debug.yaml", ["model.moe.n_experts=8"])
    model = fusion.build_model(cfg)                 # fresh weights; model.tokenizer is the config's
    model = fusion.load_model("runs/demo")          # a run, checkpoints or model directory
    logits = model(input_ids)                       # LongTensor (B, T) -> (B, T, vocab)
    logits = model(input_ids, images=pixels)        # uint8 (N, 3, S, S): one image per placeholder run
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fusion.config import Config
    from fusion.model.fusion import FusionModel
    from fusion.schema import Tokenizer

__version__ = "0.1.0"
__all__ = ["build_model", "load_config", "load_model"]


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """The configuration: the defaults, the named size `model.size`, the YAML file at `path` (only
    overrides), then `key.sub=value` strings, each layer over the last. Unknown keys, wrong types and
    nonsense values raise `fusion.config.ConfigError` naming the key (docs/config.md lists them)."""
    from fusion.config import load_config as _load

    return _load(None if path is None else os.fspath(path), list(overrides))


def build_model(config: Config, tokenizer: Tokenizer | None = None) -> FusionModel:
    """A model with fresh weights for `config` (seeded by torch's global RNG, e.g.
    `torch.manual_seed(config.train.seed)`), on the CPU in fp32, with `model.tokenizer` set: the
    given tokenizer, else the one `config.data.tokenizer` names (`byte` or a tokenizer.json)."""
    from fusion.data.tokenizer import build_tokenizer
    from fusion.model.fusion import build_model as _build

    tok: Tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.data.tokenizer)
    model = _build(config.model, tok)
    model.tokenizer = tok
    model.question = config.data.question
    return model


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> FusionModel:
    """The model of a run directory, its checkpoints/ directory, a checkpoints/step_N directory or a
    model directory (`fusion-convert from-hf` output), in eval mode on `device`, with
    `model.tokenizer` set. Reads only model.safetensors and model.json (checked against the
    checkpoint's manifest); raises `fusion.checkpoint.CheckpointError` naming the file otherwise."""
    from fusion.checkpoint import load_model as _load

    return _load(os.fspath(path), device)
