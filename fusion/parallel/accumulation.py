"""fp32 gradient accumulation of bf16 parameters: the post-accumulate-grad hook that adds each
bf16 gradient into the fp32 `.grad` of its master copy (and frees it), so that the micro-steps are
summed in fp32, and the fp32 gradients of a list of tensors with zeros where backward gave none.
Used for the experts' masters (experts.py) and for the dense masters of DeepSpeed's
FP16_UnfusedOptimizer (norms.py).
"""

from __future__ import annotations

import torch


def add_into_fp32(master: torch.Tensor, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a bf16 parameter: its gradient is added into the fp32 `.grad`
    of `master` and freed, so that the micro-steps are summed in fp32."""
    with torch.no_grad():
        if master.grad is None:
            master.grad = param.grad.to(torch.float32, copy=True)
        else:
            master.grad.add_(param.grad)
    param.grad = None


def fp32_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The `.grad` of each tensor, zeros where backward gave none."""
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    return [t.grad for t in tensors]
