"""Test-only fault injection, driven by the FUSION_FAULTS environment variable (the reliability
tests make steps non-finite with it, and stop a checkpoint half-way; an unset variable injects
nothing)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

KINDS = ("loss", "grad", "router", "ckpt")
CKPT_MARKER = "FUSION_FAULT ckpt@{step}: rank {rank} paused while writing {path}"


def parse(spec: str, rank: int) -> dict[str, set[int]]:
    """FUSION_FAULTS -> {kind: steps} for this rank (see `Faults`)."""
    at: dict[str, set[int]] = {k: set() for k in KINDS}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(rf"({'|'.join(KINDS)})@(\d+)(?::(\d+))?", item)
        if m is None:
            raise ValueError(
                f"FUSION_FAULTS: cannot read '{item}' (expected e.g. loss@3, grad@5:1 or ckpt@8)"
            )
        if m.group(3) is None or int(m.group(3)) == rank:
            at[m.group(1)].add(int(m.group(2)))
    return at


class Faults:
    """Test-only fault injection from the environment: FUSION_FAULTS="loss@3,grad@5:1,router@7,ckpt@8"
    makes step 3's loss NaN, one gradient of step 5 NaN on rank 1 only, the router logits (and
    gates) of step 7 NaN, and the checkpoint of step 8 stop half-written (`checkpoint_paused`);
    without `:rank`, on every rank. Steps count from 1."""

    KINDS = KINDS

    def __init__(self, spec: str, rank: int, model: torch.nn.Module):
        self.at = parse(spec, rank)
        self.step = 0
        if self.at["grad"]:
            # registered before NonFiniteGuard's hooks, so the guard sees the injected NaN
            next(p for p in model.parameters() if p.requires_grad).register_hook(self._grad)
        if self.at["router"]:
            for layer in model.moe_layers:
                layer.router.register_forward_hook(self._router)

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.step in self.at["loss"] else loss

    def _grad(self, grad: torch.Tensor):
        return grad * float("nan") if self.step in self.at["grad"] else None

    def _router(self, module, inputs, output):
        if self.step not in self.at["router"]:
            return None
        topk_idx, gates, logits = output
        return topk_idx, gates * float("nan"), logits * float("nan")


def checkpoint_paused(step: int, rank: int, directory: Path) -> None:
    """Called by `fusion.checkpoint.save_checkpoint` once this rank has written part of the
    checkpoint of `step` (its expert shard, its state JSON and, on rank 0, the exported model; not
    DeepSpeed's files nor the manifest). Under FUSION_FAULTS="ckpt@STEP" it prints CKPT_MARKER
    and sleeps until the process is killed: a test SIGKILLs the ranks then, mid-save."""
    if step not in parse(os.environ.get("FUSION_FAULTS", ""), rank)["ckpt"]:
        return
    print(CKPT_MARKER.format(step=step, rank=rank, path=directory), flush=True)
    while True:
        time.sleep(1)
