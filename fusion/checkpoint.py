"""Save / load / resume: the DeepSpeed engine state plus, per rank, the data-sampler state and RNGs;
and the model alone, as safetensors, for evaluation and conversion.

Layout (docs/run-directory.md):
    RUN/checkpoints/step_N/               DeepSpeed files (model, optimizer, router biases as buffers)
    RUN/checkpoints/step_N/rank{r}.json   this rank's step, data state and RNG states (JSON: no pickle)
    RUN/checkpoints/step_N/model.safetensors + model.json   the model weights and what builds it
    RUN/checkpoints/step_N/manifest.json  every other file of the directory: bytes and sha256
    RUN/checkpoints/latest                the tag of the newest complete checkpoint (moved last)

Atomic: a checkpoint is written into `.step_N.tmp/`; rank 0 writes `manifest.json`
last, renames the directory to `step_N/`, and only then moves `latest`. A run killed in the middle
leaves a `.tmp` directory that nothing reads (the next save removes it).

Verified before use: `choose_checkpoint` checks every file against the manifest (missing, resized,
altered or unlisted files refuse the checkpoint, naming the file); with `train.resume=auto` the
previous checkpoint is tried next. DeepSpeed's own files are pickles: they are unpickled only after
that check, and then with `torch.load(weights_only=True)` and an allowlist of DeepSpeed's plain
data classes, so a crafted pickle can neither pass the check nor run code when unpickled.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fusion.files import sha256_file, write_atomic


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"  # a run's tokenizer file, copied into every model export
LATEST = "latest"
TAG_PATTERN = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that must not be used; the message names the checkpoint and the file."""


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return _follow_latest(checkpoint_root(run_dir))


def _follow_latest(root: Path) -> Path | None:
    """The directory `root/latest` names, or None. Only a `step_N` tag is followed (never a path)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not TAG_PATTERN.fullmatch(tag):
        return None
    path = root / tag
    return path if path.is_dir() else None


def _step_dirs(root: Path) -> list[Path]:
    """`step_N` directories under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


# ---------------------------------------------------------------------------------------------
# manifest: written last, checked first
# ---------------------------------------------------------------------------------------------


def _files_under(directory: Path) -> list[str]:
    """Relative paths of every entry under `directory` except the manifest (links and other
    non-regular entries included, so that verification can refuse them)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(directory: Path, step: int, world_size: int) -> dict:
    """manifest.json listing every file of a finished checkpoint directory (bytes, sha256);
    written atomically and fsync'ed: it is what makes the directory a checkpoint."""
    files = {}
    for rel in _files_under(directory):
        path = directory / rel
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: {rel} is not a regular file")
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": 1,
        "step": step,
        "world_size": world_size,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": files,
    }
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def verify_checkpoint(directory: str | Path, only: list[str] | None = None) -> dict:
    """The manifest of a checkpoint whose files all match it; else CheckpointError naming the
    first file that is missing, resized, altered, or not listed. `only`: check just these files."""
    directory = Path(directory)
    where = f"checkpoint {directory}"
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{where}: no {MANIFEST} (the save did not finish, or it predates manifests)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{where}: {MANIFEST} is not a valid manifest") from None
    for rel in [r for r in only if r in files] if only is not None else files:
        entry = files[rel]
        path = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{where}: {MANIFEST} names a file outside the checkpoint: {rel}")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{where}: file {rel} is missing")
        if path.stat().st_size != entry.get("bytes"):
            raise CheckpointError(
                f"{where}: file {rel} has {path.stat().st_size} bytes, {MANIFEST} says {entry.get('bytes')}"
            )
        if sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{where}: file {rel} was altered (sha256 differs from {MANIFEST})")
    if only is None:
        extra = [rel for rel in _files_under(directory) if rel not in files]
        if extra:
            raise CheckpointError(f"{where}: file {extra[0]} is not in {MANIFEST}")
    return manifest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# choosing the checkpoint to resume from
# ---------------------------------------------------------------------------------------------


def resolve_resume(resume: str, run_dir: str | Path, log=print) -> Path | None:
    """`train.resume` -> a verified checkpoint directory, or None to start fresh.

    'none': None. 'auto': `latest` in the run dir, else the newest `step_N`; a checkpoint that
    fails verification is reported through `log` and the previous one is tried; None when the run
    has no checkpoint at all; CheckpointError when it has some and none verifies (never a silent
    restart over a run's progress). A path (a step dir, a checkpoints/ dir or a run dir): that
    checkpoint, verified, or an error naming the key and the file.
    """
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        candidates = _step_dirs(root)
        pointed = _follow_latest(root)
        if pointed is not None:
            # newer complete directories than `latest` exist only when a run died between the
            # rename and the pointer move: `latest` still decides, older ones follow
            candidates = [pointed] + [
                p for p in candidates if int(p.name.split("_")[1]) < int(pointed.name.split("_")[1])
            ]
        refused = []
        for path in candidates:
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as e:
                refused.append(str(e))
                log(f"refusing {e}; trying the previous checkpoint")
        if refused:
            raise CheckpointError(
                "config key 'train.resume'=auto: no usable checkpoint in "
                f"{root} ({'; '.join(refused)}); train.resume=none starts over"
            )
        return None
    path = Path(resume)
    if (path / LATEST).is_file():  # a checkpoints/ directory
        path = _follow_latest(path)
    elif (path / "checkpoints" / LATEST).is_file():  # a run directory
        path = latest_checkpoint(path)
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"config key 'train.resume': no checkpoint at {resume}")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"config key 'train.resume': {e}") from None
    return path


def choose_checkpoint(resume: str, run_dir: str | Path, rank: int) -> Path | None:
    """Collective `resolve_resume`: rank 0 verifies (hashing once, not once per rank) and tells the
    others the result, or the error every rank then raises."""
    from fusion import dist

    if dist.world() == 1:
        return resolve_resume(resume, run_dir)
    message = ""
    if rank == 0:
        try:
            path = resolve_resume(resume, run_dir)
            message = "ok:" + (str(path) if path is not None else "")
        except (CheckpointError, FileNotFoundError) as e:
            message = f"err:{type(e).__name__}:{e}"
    message = dist.broadcast_bytes(message.encode() if rank == 0 else None, src=0).decode(errors="replace")
    if message.startswith("err:"):
        kind, _, text = message[4:].partition(":")
        raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(text)
    return Path(message[3:]) if message[3:] else None


def save_checkpoint(
    engine, run_dir: str | Path, step: int, rank: int, data_state: dict, cfg=None, experts=None
) -> Path:
    """Collective: every rank calls it. Everything goes into `.step_N.tmp/`: the routed experts
    (`experts`: a fusion.parallel.ExpertParallel, which writes experts-*.safetensors there), the
    exported model, each rank's JSON state, DeepSpeed's files. Then rank 0 writes the manifest,
    renames the directory to `step_N/`, moves `latest` and keeps the newest
    `train.keep_checkpoints` (cfg); the other ranks wait for it."""
    from fusion import dist
    from fusion.faults import checkpoint_paused

    world = dist.world()
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    final, path = root / tag, root / f".{tag}.tmp"
    if rank == 0:
        for stale in root.glob(".step_*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    model, tensors = engine.module, None
    if experts is not None and experts.names:
        experts.save(path)
        model, tensors = experts.model, experts.full_state_dict()  # every expert, gathered
    if rank == 0 and cfg is not None:
        export_model(model, cfg, path, tensors)
    state = {"step": step, "data": data_state, "rng": rng_state()}
    write_atomic(path / f"rank{rank}.json", json.dumps(state).encode())
    checkpoint_paused(step, rank, path)  # test-only: FUSION_FAULTS=ckpt@N stops here, half-written
    engine.save_checkpoint(str(root), tag=path.name, client_state={"step": step}, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        write_manifest(path, step, world)
        _fsync_dir(path)
        if final.exists():  # saved again after resuming from an earlier step: the new one wins
            old = root / f".{tag}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(path, final)
        _fsync_dir(root)
        write_atomic(root / LATEST, tag.encode())
        _fsync_dir(root)
        keep = getattr(getattr(cfg, "train", None), "keep_checkpoints", 0)
        if keep:
            prune_checkpoints(root, keep)
    dist.barrier()  # nobody goes on (or exits) before `latest` has moved
    return final


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step dirs (never the one `latest` names); return them."""
    pointed = _follow_latest(root)
    removed = []
    for path in _step_dirs(root)[keep:]:
        if pointed is not None and path.resolve() == pointed.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def export_model(model, cfg, path: Path, tensors: dict | None = None) -> None:
    """model.safetensors (weights, buffers such as router biases) + model.json (config, tokenizer).
    `tensors` replaces model.state_dict() (the full one when experts are sharded over ranks)."""
    from safetensors.torch import save_file

    from fusion.config import to_dict

    path.mkdir(parents=True, exist_ok=True)
    # ZeRO keeps parameters as views of one flat buffer: copy each out (tied weights stay two keys)
    tensors = {
        k: v.detach().cpu().clone().contiguous()
        for k, v in (model.state_dict() if tensors is None else tensors).items()
    }
    save_file(tensors, str(path / "model.safetensors.tmp"))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    tok_spec = cfg.data.tokenizer
    if tok_spec not in ("", "byte"):  # a tokenizer.json travels with the weights that need it
        if Path(tok_spec).resolve() != (path / TOKENIZER).resolve():
            write_atomic(path / TOKENIZER, Path(tok_spec).read_bytes())
        tok_spec = TOKENIZER
    meta = {
        "model": to_dict(cfg)["model"],
        "tokenizer": tok_spec,
        "vocab_size": model.vocab_size,
        "question": cfg.data.question,
    }
    (path / "model.json").write_text(json.dumps(meta, indent=1))


def find_model_dir(path: str | Path) -> Path:
    """A step dir, a checkpoints dir (its `latest`) or a run dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / LATEST).is_file() and _follow_latest(path) is not None:
        return find_model_dir(_follow_latest(path))
    if (path / "checkpoints" / LATEST).is_file():
        return find_model_dir(path / "checkpoints")
    raise FileNotFoundError(
        f"no model.safetensors at {path} (give a run dir, its checkpoints/ dir or a checkpoints/step_N dir)"
    )


def read_model_json(model_dir: Path) -> dict:
    """model.json of a model directory: {"model": {...}, "tokenizer": str, ...}; CheckpointError
    naming the file and what is wrong with it otherwise."""
    path = model_dir / "model.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing (it says what model the weights in model.safetensors belong to)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in (("model", dict), ("tokenizer", str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"{path}: key '{key}' is missing or not a {'JSON object' if kind is dict else 'string'}"
            )
    return meta


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_weight_shapes(path: Path, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """CheckpointError unless the weights in file `path` (name -> shape) are exactly the model's
    (`expected`): one line naming the first two of each kind of mismatch, with their count."""

    def some(items: list[str]) -> str:
        return ", ".join(items[:2]) + (f" and {len(items) - 2} more" if len(items) > 2 else "")

    problems = []
    shapes = [
        f"{k} {tuple(found[k])} (model: {tuple(v)})"
        for k, v in expected.items()
        if k in found and tuple(found[k]) != tuple(v)
    ]
    if shapes:
        problems.append(f"{len(shapes)} weight(s) of the wrong shape: {some(shapes)}")
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"{len(missing)} weight(s) missing: {some(missing)}")
    extra = [k for k in found if k not in expected]
    if extra:
        problems.append(f"{len(extra)} unexpected weight(s): {some(extra)}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model model.json describes: " + "; ".join(problems))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its weights (safetensors + JSON only; in a
    training checkpoint, checked against its manifest first). A model directory that cannot be
    loaded raises CheckpointError (FileNotFoundError when there is none at `path`), in one line
    naming the file and the problem."""
    from fusion.config import Config, ConfigError, ModelConfig, load_config, model_overrides
    from fusion.data.tokenizer import build_tokenizer
    from fusion.model.fusion import build_model

    model_dir = find_model_dir(path)
    if (model_dir / MANIFEST).is_file():
        verify_checkpoint(
            model_dir,
            only=["model.safetensors", "model.json"]
            + ([TOKENIZER] if (model_dir / TOKENIZER).is_file() else []),
        )
    meta = read_model_json(model_dir)
    where = model_dir / "model.json"
    tok_spec = meta["tokenizer"]
    if tok_spec not in ("", "byte") and (model_dir / tok_spec).is_file():
        tok_spec = str(model_dir / tok_spec)  # a tokenizer.json kept beside the weights (fusion-convert)
    try:
        # the vision tower's weights are in model.safetensors: its pretrained file (maybe gone,
        # maybe a pickle) is not read again
        overrides = model_overrides(meta["model"]) + ['model.vision.checkpoint=""']
        overrides += [f"data.tokenizer={tok_spec}", f"data.question={meta.get('question', 'after')}"]
        cfg: Config = load_config(None, overrides, source="it")
        assert isinstance(cfg.model, ModelConfig)
        tokenizer = build_tokenizer(tok_spec)
        model = build_model(cfg.model, tokenizer)
    except (ConfigError, ValueError, OSError) as e:  # a bad key or value, the tokenizer file
        raise CheckpointError(f"{where}: {e}") from None
    weights = model_dir / "model.safetensors"
    tensors = _load_weights(weights)
    check_weight_shapes(
        weights, {k: v.shape for k, v in tensors.items()}, {k: v.shape for k, v in model.state_dict().items()}
    )
    model.load_state_dict(tensors, strict=True)
    model.tokenizer = tokenizer
    model.question = cfg.data.question
    return model.to(device).eval()


def checkpoint_covering(path: str | Path) -> Path | None:
    """The checkpoint directory at or above `path` whose manifest.json lists its files (so that a
    file added under it makes `verify_checkpoint` refuse the checkpoint), or None."""
    path = Path(path).resolve()
    for directory in (path, *path.parents):
        manifest = directory / MANIFEST
        if manifest.is_file():
            try:
                files = json.loads(manifest.read_text()).get("files")
            except (ValueError, OSError, AttributeError):
                continue
            if isinstance(files, dict):
                return directory
    return None


def load_checkpoint(engine, path: Path, rank: int, experts=None) -> dict:
    """Load engine state from `path` (a step_N dir that `choose_checkpoint` verified), and the
    routed experts and their optimizer state resharded to this run's ep_size (`experts`:
    fusion.parallel.ExpertParallel); return this rank's saved {step, data, rng}.

    This rank's JSON state is checked against the manifest once more right before it is read,
    and DeepSpeed unpickles its files with `weights_only=True` (`safe_torch_load`)."""
    manifest = verify_checkpoint(path, only=[f"rank{rank}.json"])
    rank_file = path / f"rank{rank}.json"
    if f"rank{rank}.json" not in manifest["files"] or not rank_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no state for rank {rank} ({rank_file.name}): "
            f"it was saved by {manifest.get('world_size', '?')} ranks"
        )
    state = json.loads(rank_file.read_text())
    ckpt_engine = engine.checkpoint_engine
    ckpt_engine.load = safe_torch_load  # instance attribute: DeepSpeed's loaders all call it
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    finally:
        del ckpt_engine.load
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    if experts is not None:
        experts.load(path)
    return state


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes found inside its optimizer files (ZeRO 1/2 loss scaler,
    stage enum, fragment addresses): allowed by the weights-only unpickler, nothing else is."""
    out = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


def safe_torch_load(path, map_location=None):
    """torch.load(weights_only=True) of a DeepSpeed file: tensors, containers and the allowlisted
    DeepSpeed data classes only; any other global in the pickle is refused before it is built."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (and others) for refused content
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        why = next((l for l in lines if "Unsupported global" in l or "Unpickler" in l), lines[0])
        raise CheckpointError(f"checkpoint file {path} refused by the weights-only loader: {why}") from None
