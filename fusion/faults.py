"""Test-only fault injection, driven by the FUSION_FAULTS environment variable (the reliability
tests make steps non-finite with it; an unset variable injects nothing)."""

from __future__ import annotations

import re

import torch


class Faults:
    """Test-only fault injection from the environment: FUSION_FAULTS="loss@3,grad@5:1,router@7"
    makes step 3's loss NaN, one gradient of step 5 NaN on rank 1 only, and the router logits
    (and gates) of step 7 NaN; without `:rank`, on every rank. Steps count from 1."""

    KINDS = ("loss", "grad", "router")

    def __init__(self, spec: str, rank: int, model: torch.nn.Module):
        self.at: dict[str, set[int]] = {k: set() for k in self.KINDS}
        self.step = 0
        for item in filter(None, (s.strip() for s in spec.split(","))):
            m = re.fullmatch(r"(loss|grad|router)@(\d+)(?::(\d+))?", item)
            if m is None:
                raise ValueError(f"FUSION_FAULTS: cannot read '{item}' (expected e.g. loss@3 or grad@5:1)")
            if m.group(3) is None or int(m.group(3)) == rank:
                self.at[m.group(1)].add(int(m.group(2)))
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
