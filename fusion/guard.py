"""The non-finite guard: an optimizer step whose loss or gradients are NaN/Inf on any rank is
skipped on every rank alike (DeepSpeed's bf16 path has no skip of its own).

The decision is one all-reduced flag per optimizer step, read by the host at the accumulation
boundary (`fusion.dist.fetch`); nothing is read during the micro-steps.
"""

from __future__ import annotations

import contextlib

import torch

from fusion import dist


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def innermost_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16): the one whose step() updates."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class NonFiniteGuard:
    """Skips the optimizer update of a step whose loss or gradients are NaN/Inf on any rank.

    Gradients are watched by a hook on every parameter as backward produces them (before DeepSpeed
    reduces or partitions them, whatever the ZeRO stage): the squared norms are summed on this rank,
    so the check costs no extra pass and no sync until `decide()`, which all-reduces one flag so
    every rank skips alike. A skipped step still goes through `engine.step()` with the torch
    optimizers' `step` made a no-op: DeepSpeed zeroes the gradients and advances its counters, while
    the weights, the AdamW moments and AdamW's own step count stay as they were.

    Streams. A gradient may be produced on another stream than the training's (the shared expert's
    side stream, fusion/model/moe/streams.py): its squared norm is computed where the gradient was
    produced, then the guard's stream (the current one when the guard was made) waits for that
    stream and the norm is recorded on it before it is added, so the running sum lives on one
    stream only. Give the model's `streams` object for that; without one (CPU) the sum is plain.
    """

    def __init__(self, model: torch.nn.Module, optimizers: list, device: torch.device, streams=None):
        self.optimizers = [o for o in optimizers if o is not None]
        self.device = device
        self.streams = streams
        self.stream = streams.current() if streams is not None else None  # where the sums live
        self.total = 0  # skipped steps since this process started
        self.in_a_row = 0
        self._reset()
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._watch)

    def _reset(self) -> None:
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        self.grad_sq = torch.zeros((), dtype=torch.float32, device=self.device)

    def _watch(self, grad: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32) ** 2  # on the producing stream
        here = self.streams.current() if self.streams is not None else None
        if here is None or here == self.stream:
            self.grad_sq = self.grad_sq + sq
            return
        self.streams.wait(self.stream, here)  # the norm is ready for the guard's stream
        self.streams.record(sq, self.stream)  # and its memory stays until that stream has read it
        with self.streams.use(self.stream):
            self.grad_sq = self.grad_sq + sq

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss = self.bad_loss | ~torch.isfinite(loss.detach())

    def decide(self) -> bool:
        """Collective, at the accumulation boundary: True when any rank saw a non-finite loss or
        gradient since the last decision."""
        flag = (self.bad_loss | ~torch.isfinite(self.grad_sq)).to(torch.float32).reshape(1)
        dist.all_reduce(flag, op="max")
        self._reset()
        return bool(dist.fetch(flag, "optimizer step: skip decision (non-finite loss or gradient)")[0])

    def count(self, skipped: bool) -> None:
        self.total += int(skipped)
        self.in_a_row = self.in_a_row + 1 if skipped else 0

    @contextlib.contextmanager
    def suppress(self, active: bool):
        """Within the block, the torch optimizers' step() does nothing (when `active`)."""
        if active:
            for opt in self.optimizers:
                opt.step = lambda *args, **kwargs: None  # instance attribute shadows the method
        try:
            yield
        finally:
            if active:
                for opt in self.optimizers:
                    del opt.step
