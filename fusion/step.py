"""One optimizer step of training: `train_step` (micro-steps, the accumulation boundary, the
update, the routers' balancing) over `StepParts`, the learning-rate schedule and the optimizer's
parameter groups. The trainer (fusion/train.py) and the GPU dry run (fusion/dryrun) run the same
step; only the engine differs (DeepSpeed's, or the dry run's stand-in with the same calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fusion import dist
from fusion.config import Config, VisionConfig
from fusion.faults import Faults
from fusion.guard import NonFiniteGuard
from fusion.metrics import StepStats
from fusion.model.moe import is_expert
from fusion.optim import build_optimizer


@dataclass
class StepParts:
    """What an optimizer step works with. `engine` is DeepSpeed's (or the dry run's stand-in with
    the same calls: __call__, backward, is_gradient_accumulation_boundary, step,
    get_global_grad_norm, zero_optimization_stage, bfloat16_enabled, module)."""

    cfg: Config
    engine: Any
    optimizer: torch.optim.Optimizer  # the non-expert parameters' (its groups take the lr)
    experts: Any  # fusion.parallel.ExpertParallel
    guard: NonFiniteGuard
    faults: Faults
    distiller: Any  # fusion.distill.Distiller or None
    model: torch.nn.Module
    device: torch.device
    bf16: bool


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch on the compute device; pinned host memory lets the copy overlap compute."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def train_step(p: StepParts, batches, step: int) -> StepStats:
    """Optimizer step `step` (counted from 0): `grad_accum` micro-steps of forward and backward,
    the expert gradients' reduction, the non-finite decision, DeepSpeed's and the experts' update,
    and the routers' balancing. Host reads only at the accumulation boundary (the skip decision;
    DeepSpeed's own) and, under expert parallelism, the all-to-all's row counts."""
    cfg, t = p.cfg, p.cfg.train
    lr = lr_at(step, cfg)
    for group in [*p.optimizer.param_groups, *p.experts.param_groups]:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    stats = StepStats.zeros(p.device)
    p.faults.step = step + 1
    skipped, grad_norm = False, None
    for _ in range(t.grad_accum):
        batch = to_device(next(batches), p.device)
        out = p.engine(
            batch["input_ids"],
            labels=batch["labels"],
            positions=batch["positions"],
            doc_ids=batch["doc_ids"],
            sample_modality=batch["sample_modality"],
            images=batch.get("images"),
            videos=batch.get("videos"),
            return_logits=p.distiller is not None,
        )
        loss = p.faults.loss(out.loss if p.distiller is None else p.distiller.mix(out, batch))
        p.guard.observe_loss(loss)
        p.engine.backward(loss)
        stats.add_micro(out, batch)
        boundary = p.engine.is_gradient_accumulation_boundary()
        if boundary:
            p.experts.reduce_grads()  # expert grads over their expert-data-parallel group
            if t.zero_stage == 0 and not p.bf16 and not p.experts.names:
                # DeepSpeed reports no norm for plain fp32 data parallel; grads are reduced by now
                grad_norm = grad_l2_norm(p.model)
            skipped = p.guard.decide()  # all-reduced: every rank skips alike
        with p.guard.suppress(boundary and skipped):  # no update; DeepSpeed's counters still move
            p.engine.step()
            if boundary and p.experts.names:
                grad_norm = p.experts.step()  # clipped with, and returning, the global norm
    p.guard.count(skipped)
    stats.load = balance_routers(p.model.moe_layers, skipped)
    stats.steps, stats.skipped = 1, int(skipped)
    stats.lr, stats.grad_norm = lr, grad_norm
    return stats


def balance_routers(moe_layers, skipped: bool) -> torch.Tensor | None:
    """Expert loads of this step summed over ranks (one all-reduce, on the device), and the
    aux-loss-free bias update from them. -> (L, 3, E) float64, or None without MoE layers."""
    if not moe_layers:
        return None
    load = torch.stack([layer.take_load() for layer in moe_layers]).to(dist.comm_device())  # (L, 3, E)
    dist.all_reduce(load)
    if not skipped:  # a skipped step leaves the router biases as they were too
        for layer, layer_load in zip(moe_layers, load):
            layer.update_bias(layer_load.sum(0))
    return load


def lr_at(step: int, cfg) -> float:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    vision: VisionConfig,
    muon: bool = False,
    muon_experts: bool = True,
) -> list[dict]:
    """Dense matrices decay; norms and biases don't; experts get a group of their own; the vision
    tower learns at `vision.lr_scale` times the decoder's rate, and its encoder at
    `vision.encoder_lr_scale` times it when that is set (groups of their own, `vision_encoder_*`;
    unset, the groups are those of a tower at one rate, so older optimizer states still load).
    With `muon` (`train.optimizer=muon`, fusion/optim.py), the hidden matrices (`muon_matrices`)
    move to groups of their own, `*_muon`, marked `muon: True`, and so is the experts' group
    unless `muon_experts` is false. Frozen parameters stay out."""
    hidden = muon_matrices(model, muon_experts) if muon else set()
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_tower = name.startswith("vision.")
        own_encoder = vision.encoder_lr_scale > 0 and name.startswith("vision.encoder.")
        if is_expert(p):
            key, wd = "experts", weight_decay
        elif p.dim() < 2 or "pos" in name.split(".")[-1]:
            key, wd = "no_decay", 0.0
        else:
            key, wd = "decay", weight_decay
        scale = vision.encoder_lr_scale if own_encoder else vision.lr_scale if in_tower else 1.0
        key = f"vision_encoder_{key}" if own_encoder else f"vision_{key}" if in_tower else key
        if id(p) in hidden and key != "experts":
            key = f"{key}_muon"
        group = groups.setdefault(
            key, {"name": key, "params": [], "weight_decay": wd, "lr_scale": scale, "muon": id(p) in hidden}
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizers(
    model: torch.nn.Module, cfg: Config, **adamw_options
) -> tuple[torch.optim.Optimizer, list[dict]]:
    """`param_groups` of `model` as train.* sets them, split where the trainer and the dry run
    split them: (`train.optimizer`'s optimizer over every group but the routed experts', which the
    engine steps; the experts' groups, for `ExpertParallel.attach`)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay, cfg.model.vision, t.optimizer == "muon", t.muon_experts)
    dense = [g for g in groups if g["name"] != "experts"]
    optimizer = build_optimizer(dense, t.optimizer, t.lr, t.betas, t.weight_decay, **adamw_options)
    return optimizer, [g for g in groups if g["name"] == "experts"]


def muon_matrices(model: torch.nn.Module, experts: bool = True) -> set[int]:
    """ids of the parameters Muon steps: the weights of the linear layers inside the network and
    (with `experts`) the routed experts' stacks; not the output head, the routers, or a patch
    embedding (it reads pixels). The rest (embeddings, convolutions, norms, biases, positions)
    keeps AdamW."""
    out = {id(p) for p in model.parameters() if is_expert(p)} if experts else set()
    for name, m in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if (
            isinstance(m, torch.nn.Linear)
            and last not in ("output", "gate")
            and not name.endswith("encoder.proj")
        ):
            out.add(id(m.weight))
    return out


def grad_l2_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of every gradient of `model`, a device scalar (read at logging)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
