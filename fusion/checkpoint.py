"""Save / load / resume: the DeepSpeed engine state plus, per rank, the data-sampler state and RNGs;
and the model alone, as safetensors, for evaluation and conversion.

Layout (SPEC §6):
    RUN/checkpoints/step_N/               DeepSpeed files (model, optimizer, router biases as buffers)
    RUN/checkpoints/step_N/rank{r}.json   this rank's step, data state and RNG states (JSON: no pickle)
    RUN/checkpoints/step_N/model.safetensors + model.json   the model weights and what builds it
    RUN/checkpoints/latest                the tag of the newest complete checkpoint (moved last)
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`train.resume`: 'auto' -> latest in the run dir (or None), 'none' -> None, else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "latest").is_file():  # a checkpoints/ directory or a run's checkpoint root
        path = path / (path / "latest").read_text().strip()
    elif (path / "checkpoints" / "latest").is_file():  # a run directory
        path = latest_checkpoint(path)
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"config key 'train.resume': no checkpoint at {resume}")
    return path


def save_checkpoint(engine, run_dir: str | Path, step: int, rank: int, data_state: dict,
                    cfg=None, experts=None) -> Path:
    """Collective: every rank calls it. Rank files, the routed experts (`experts`: a
    fusion.parallel.ExpertParallel, which writes experts-*.safetensors here) and the exported model
    go first; DeepSpeed moves `latest` at the end."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    model, tensors = engine.module, None
    if experts is not None and experts.names:
        experts.save(path)
        model, tensors = experts.model, experts.full_state_dict()  # every expert, gathered
    if rank == 0 and cfg is not None:
        export_model(model, cfg, path, tensors)
    state = {"step": step, "data": data_state, "rng": rng_state()}
    tmp = path / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path / f"rank{rank}.json")
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    return path


def export_model(model, cfg, path: Path, tensors: dict | None = None) -> None:
    """model.safetensors (weights, buffers such as router biases) + model.json (config, tokenizer).
    `tensors` replaces model.state_dict() (the full one when experts are sharded over ranks)."""
    from safetensors.torch import save_file

    from fusion.config import to_dict

    path.mkdir(parents=True, exist_ok=True)
    # ZeRO keeps parameters as views of one flat buffer: copy each out (tied weights stay two keys)
    tensors = {k: v.detach().cpu().clone().contiguous()
               for k, v in (model.state_dict() if tensors is None else tensors).items()}
    save_file(tensors, str(path / "model.safetensors.tmp"))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    meta = {"model": to_dict(cfg)["model"], "tokenizer": cfg.data.tokenizer,
            "vocab_size": model.vocab_size}
    (path / "model.json").write_text(json.dumps(meta, indent=1))


def find_model_dir(path: str | Path) -> Path:
    """A step dir, a checkpoints dir (its `latest`) or a run dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "latest").is_file():
        return find_model_dir(path / (path / "latest").read_text().strip())
    if (path / "checkpoints" / "latest").is_file():
        return find_model_dir(path / "checkpoints")
    raise FileNotFoundError(f"no model.safetensors at {path} (give a run dir, its checkpoints/ dir "
                            f"or a checkpoints/step_N dir)")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its weights (safetensors + JSON only)."""
    from safetensors.torch import load_file

    from fusion.config import Config, ModelConfig, load_config
    from fusion.data.tokenizer import build_tokenizer
    from fusion.model.fusion import build_model

    model_dir = find_model_dir(path)
    meta = json.loads((model_dir / "model.json").read_text())
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in _flat(meta["model"]).items()]
    tok_spec = meta["tokenizer"]
    if tok_spec not in ("", "byte") and (model_dir / tok_spec).is_file():
        tok_spec = str(model_dir / tok_spec)  # a tokenizer.json kept beside the weights (fusion-convert)
    cfg: Config = load_config(None, overrides + [f"data.tokenizer={tok_spec}"])
    assert isinstance(cfg.model, ModelConfig)
    tokenizer = build_tokenizer(tok_spec)
    model = build_model(cfg.model, tokenizer)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    model.tokenizer = tokenizer
    return model.to(device).eval()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_checkpoint(engine, path: Path, rank: int, experts=None) -> dict:
    """Load engine state from `path` (a step_N dir), and the routed experts and their optimizer
    state resharded to this run's ep_size (`experts`: fusion.parallel.ExpertParallel); return this
    rank's saved {step, data, rng}."""
    rank_file = path / f"rank{rank}.json"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no state for rank {rank} ({rank_file.name}): "
                                "was it saved with a different number of ranks?")
    state = json.loads(rank_file.read_text())
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    if experts is not None:
        experts.load(path)
    return state
