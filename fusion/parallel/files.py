"""The experts written out: their checkpoint files and their gathered, unsharded copies.

Checkpoint files: safetensors inside a checkpoint step directory, one per expert shard
(`EXPERT_FILE`), holding the shard's weights (the fp32 masters when the model runs in bf16) and
its AdamW state. Loading reads every shard of the saved ep size, joins them along the expert axis
and takes this rank's slice, so a checkpoint resumes at any ep size.

Gathered copies: the model's state_dict with every expert of every layer (`gather_state_dict`,
what a checkpoint's model file and evaluation hold) and a single-device copy of the model
(`copy_unsharded`).

Each function takes the `ExpertParallel` whose experts it writes or reads.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from fusion import dist
from fusion.model.moe import mark_expert
from fusion.optim import STATE_KEYS

EXPERT_FILE = "experts-{rank:05d}-of-{size:05d}.safetensors"
_EXPERT_FILE_RE = re.compile(r"experts-(\d{5})-of-(\d{5})\.safetensors")


def _state_tensors(ep) -> dict[str, torch.Tensor]:
    """This shard's weights (fp32 masters when present) and AdamW state, by parameter name."""
    masters = {id(p): m for p, m in (ep.masters or [])}
    out = {}
    for name, p in zip(ep.names, ep.params):
        w = masters.get(id(p), p)
        out[f"param/{name}"] = w.detach().float().cpu().contiguous()
        st = ep.optimizer.state.get(w, {}) if ep.optimizer is not None else {}
        for key in STATE_KEYS:
            if key in st:
                out[f"{key}/{name}"] = st[key].detach().float().cpu().contiguous()
        if "step" in st:
            out[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    return out


def save_shard(ep, directory: str | Path) -> list[Path]:
    """Collective. The ranks of the first expert-data-parallel replica each write their shard
    into `directory` (a checkpoint step dir). Returns the files this rank wrote."""
    if not ep.names:
        return []
    from safetensors.torch import save_file

    directory = Path(directory)
    written = []
    if ep.rank < ep.ep_size:  # ranks 0..P-1: one of each shard
        path = directory / EXPERT_FILE.format(rank=ep.ep_rank, size=ep.ep_size)
        tmp = path.with_name(path.name + ".tmp")
        meta = {
            "ep_size": str(ep.ep_size),
            "ep_rank": str(ep.ep_rank),
            "n_experts": str(ep.n_experts),
            "names": ",".join(ep.names),
        }
        save_file(_state_tensors(ep), str(tmp), metadata=meta)
        tmp.replace(path)
        written.append(path)
    return written


def _open_shards(directory: Path, n_experts: int) -> list:
    """safe_open handles of every shard of the ep size `directory` was saved at, in rank order."""
    from safetensors import safe_open

    files = sorted(p for p in directory.iterdir() if _EXPERT_FILE_RE.fullmatch(p.name))
    if not files:
        raise FileNotFoundError(
            f"checkpoint {directory} has no expert files ({EXPERT_FILE.format(rank=0, size=1)}"
            f" ...): it holds no routed-expert weights"
        )
    saved_size = int(_EXPERT_FILE_RE.fullmatch(files[0].name).group(2))
    shards = [directory / EXPERT_FILE.format(rank=r, size=saved_size) for r in range(saved_size)]
    for s in shards:
        if not s.is_file():
            raise FileNotFoundError(f"checkpoint {directory}: expert shard {s.name} is missing")
    handles = [safe_open(str(s), framework="pt") for s in shards]
    meta = handles[0].metadata()
    if int(meta["n_experts"]) != n_experts:
        raise ValueError(
            f"checkpoint {directory} has {meta['n_experts']} experts per layer, the model "
            f"has {n_experts} (config key 'model.moe.n_experts')"
        )
    return handles


def load_slice(ep, directory: str | Path) -> None:
    """Load this rank's expert slice and its optimizer state from any saved ep size."""
    if not ep.names:
        return
    directory = Path(directory)
    handles = _open_shards(directory, ep.n_experts)
    lo, hi = ep.local_experts
    masters = {id(p): m for p, m in (ep.masters or [])}
    for name, p in zip(ep.names, ep.params):

        def full(key):
            if key not in handles[0].keys():
                return None
            return torch.cat([h.get_tensor(key) for h in handles])  # (E, ...) every expert

        w = full(f"param/{name}")
        if w is None:
            raise ValueError(f"checkpoint {directory}: no weights for expert parameter {name}")
        if w.shape[0] != ep.n_experts:
            raise ValueError(
                f"checkpoint {directory}: {name} has {w.shape[0]} experts, expected {ep.n_experts}"
            )
        target = masters.get(id(p), p)
        with torch.no_grad():
            target.copy_(w[lo:hi])
            if target is not p:
                p.copy_(target)
        if ep.optimizer is None:
            continue
        state = {}
        for key in STATE_KEYS:
            t = full(f"{key}/{name}")
            if t is not None:
                state[key] = t[lo:hi].clone().to(target.device)
        if f"step/{name}" in handles[0].keys():
            state["step"] = handles[0].get_tensor(f"step/{name}").reshape(())
        if state:
            ep.optimizer.state[target] = state


def gather_state_dict(ep) -> dict[str, torch.Tensor]:
    """Collective. The model's state_dict with every expert of every layer (gathered over the
    expert-parallel group); on every rank."""
    sd = {k: v.detach() for k, v in ep.model.state_dict().items()}
    if ep.ep_size == 1 or not ep.names:
        return sd
    for name, p in zip(ep.names, ep.params):
        sd[name] = torch.cat(dist.all_gather(p.detach(), group=ep.ep_group))  # (E, ...)
    return sd


def copy_unsharded(ep) -> nn.Module:
    """Collective. A single-device copy of the model holding every expert (for evaluation on
    one rank); the model itself is unchanged."""
    sd = gather_state_dict(ep)
    layers = ep.model.moe_layers
    dispatchers = [m.dispatcher for m in layers]
    for m in layers:
        m.dispatcher = None  # process groups do not deep-copy
    try:
        clone = copy.deepcopy(ep.model)
    finally:
        for m, d in zip(layers, dispatchers):
            m.dispatcher = d
    for name in ep.names:
        path, _, attr = name.rpartition(".")
        full = nn.Parameter(sd[name].clone())
        mark_expert(full)
        setattr(clone.get_submodule(path), attr, full)
    return clone
