"""Which model an evaluation loads and where its results go: run, checkpoints, step and model
directories (never inside a checkpoint, whose manifest lists every file), and the run's frame count."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fusion.eval.questions import EvalError, set_name, set_shards


def check_sets(vqa_dirs) -> list[str]:
    """Set names (directory names), after checking each set has shards and names are unique."""
    names = []
    for d in vqa_dirs:
        set_shards(d)
        name = set_name(d)
        if name in names:
            raise EvalError(f"--vqa {d}: two sets named '{name}' would write the same {name}.json")
        names.append(name)
    return names


def default_out_dir(path: str | Path) -> Path:
    """Where SET.json goes without --out, for a model at `path` (a run, checkpoints, step or model
    dir): the run's eval/ for RUN, RUN/checkpoints or RUN/checkpoints/step_N; beside any other
    checkpoint (a dir with manifest.json, whose files it covers: an added one would make resuming
    refuse the checkpoint); DIR/eval for any other model dir (e.g. `fusion-convert from-hf` OUT)."""
    from fusion.checkpoint import LATEST, MANIFEST, TAG_PATTERN

    path = Path(os.path.abspath(path))  # "." and ".." have no name to go by

    def is_checkpoints(p: Path) -> bool:
        return p.name == "checkpoints" or (p / LATEST).is_file()

    if TAG_PATTERN.fullmatch(path.name) and is_checkpoints(path.parent):
        return path.parent.parent / "eval"
    if is_checkpoints(path):
        return path.parent / "eval"
    if (path / MANIFEST).is_file():
        return path.parent / "eval"
    return path / "eval"


def check_out_dir(out_dir: str | Path, flag: str = "--out") -> Path:
    """`out_dir`, unless it lies inside a checkpoint (EvalError: the checkpoint's manifest lists
    every file under it, so an eval file there would make `train.resume` refuse it)."""
    from fusion.checkpoint import checkpoint_covering

    ckpt = checkpoint_covering(out_dir)
    if ckpt is not None:
        raise EvalError(
            f"{flag} {out_dir}: inside checkpoint {ckpt}, whose manifest.json lists every "
            f"file there (an eval file would make resuming refuse it); write elsewhere, "
            f"e.g. {default_out_dir(ckpt)}"
        )
    return Path(out_dir)


def load_for_eval(path, device=None) -> tuple[object, dict]:
    """(model, {"checkpoint", "step"}) from a run dir, checkpoints dir or step dir."""
    from fusion.checkpoint import CheckpointError, find_model_dir, load_model

    try:
        model_dir = find_model_dir(path)
        model = load_model(model_dir, device or "cpu")
    except (FileNotFoundError, CheckpointError) as e:
        raise EvalError(str(e)) from None
    meta: dict = {"checkpoint": str(model_dir)}
    m = re.fullmatch(r"step_(\d+)", model_dir.name)
    if m:
        meta["step"] = int(m.group(1))
    return model, meta


def run_n_frames(path) -> int | None:
    """`data.n_frames` from the config.yaml of the run a checkpoint belongs to, if found."""
    import yaml

    if path is None:
        return None
    path = Path(path)
    for p in (path, path.parent, path.parent.parent):
        cfg = p / "config.yaml"
        if cfg.is_file():
            try:
                n = (yaml.safe_load(cfg.read_text()) or {}).get("data", {}).get("n_frames")
            except (yaml.YAMLError, AttributeError, OSError):
                return None
            return n if isinstance(n, int) and not isinstance(n, bool) else None
    return None
