"""Weight-only int4 quantisation for evaluation: `fusion-eval --quantize int4`.

Group-wise, asymmetric: each weight matrix is cut into groups of `group_size` consecutive values
along its input (contraction) axis; a group keeps 4-bit codes q in 0..15 and two fp16 numbers, an
offset m (the group's minimum, rounded down to fp16) and a scale s (its range / 15, rounded up):

    w ~ m + s * q,    q = round((w - m) / s)    so that |w - dequantised w| <= s / 2

for every weight (the tests check this bound). Two codes share a byte: 4 bits per weight plus
32 / group_size bits of scale and offset (4.5 bits at the default group size 64).

Quantised: the decoder's linear weights (attention, dense FFN, shared experts, late fusion's
cross-attention) and the routed experts' w1, w2, w3. Kept as they are: token embeddings and the
output head (the usual practice: they are few and sensitive), router gates (a rounding can change
which expert a token goes to), norms, and the vision tower.

Storage is real (the modules hold only codes, scales and offsets); compute is not: weights are
dequantised to the model's dtype when used, so this measures accuracy and weight memory, not the
speed of an int4 kernel.

Shapes: K input features, N output features, G group size, E experts.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fusion.model.moe import Experts

DEFAULT_GROUP_SIZE = 64


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., K) -> codes uint8 (..., n_groups * G / 2), scale and offset fp16 (..., n_groups).
    The last group is padded with copies of the row's last value when G does not divide K."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"--group-size must be an even number >= 2, got {group_size}")
    K = w.shape[-1]
    n_groups = math.ceil(K / group_size)
    x = w.detach().float()
    if n_groups * group_size > K:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], n_groups * group_size - K)], dim=-1)
    g = x.unflatten(-1, (n_groups, group_size))  # (..., n_groups, G)
    lo, hi = g.amin(-1), g.amax(-1)  # (..., n_groups)
    offset = lo.half()
    offset = torch.where(
        offset.float() > lo, torch.nextafter(offset, torch.full_like(offset, -math.inf)), offset
    )
    scale = ((hi - offset.float()) / 15).half()
    short = offset.float() + 15 * scale.float() < hi  # fp16 rounding lost part of the range
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    step = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # (..., n_groups, 1)
    q = torch.round((g - offset.float()[..., None]) / step).clamp(0, 15).to(torch.uint8)  # (..., n_groups, G)
    q = q.flatten(-2)  # (..., n_groups * G)
    codes = q[..., 0::2] | (q[..., 1::2] << 4)  # two codes a byte
    return codes.contiguous(), scale, offset


def dequantize_int4(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, K: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The inverse of quantize_int4: (..., K) in `dtype`."""
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)  # (..., n_groups * G)
    g = q.unflatten(-1, (scale.shape[-1], -1)).float()  # (..., n_groups, G)
    w = offset.float()[..., None] + scale.float()[..., None] * g
    return w.flatten(-2)[..., :K].to(dtype)


class Int4Weight(nn.Module):
    """One int4 tensor: buffers `codes`, `scale`, `offset`; the input axis `axis` is moved last
    for grouping and back on dequantisation."""

    def __init__(self, w: torch.Tensor, group_size: int, axis: int = -1):
        super().__init__()
        self.axis = axis % w.dim()
        moved = w.movedim(self.axis, -1)
        self.moved_shape = tuple(moved.shape)
        self.dtype = w.dtype
        codes, scale, offset = quantize_int4(moved, group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def dequantize(self) -> torch.Tensor:
        w = dequantize_int4(self.codes, self.scale, self.offset, self.moved_shape[-1], self.dtype)
        return w.movedim(-1, self.axis)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.codes, self.scale, self.offset))


class Int4Linear(nn.Module):
    """nn.Linear (no bias) with an int4 weight; `weight` is the dequantised (N, K) matrix."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int4Linear takes bias-free linears (the decoder has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.q = Int4Weight(linear.weight, group_size, axis=-1)

    @property
    def weight(self) -> torch.Tensor:
        return self.q.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Int4Experts(Experts):
    """Routed experts with int4 w1, w2, w3 (grouped along each matrix's input axis, dim 1); the
    expert paths of `Experts` run unchanged on the dequantised stacks."""

    def __init__(self, experts: Experts, group_size: int):
        nn.Module.__init__(self)  # not Experts.__init__: no full-precision parameters
        self.impl = experts.impl
        self.q1 = Int4Weight(experts.w1, group_size, axis=1)  # (E, D, H): input D
        self.q3 = Int4Weight(experts.w3, group_size, axis=1)  # (E, D, H): input D
        self.q2 = Int4Weight(experts.w2, group_size, axis=1)  # (E, H, D): input H

    @property
    def w1(self) -> torch.Tensor:
        return self.q1.dequantize()

    @property
    def w2(self) -> torch.Tensor:
        return self.q2.dequantize()

    @property
    def w3(self) -> torch.Tensor:
        return self.q3.dequantize()


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _quantizable(name: str, module: nn.Module) -> bool:
    if isinstance(module, Experts):
        return True
    if not isinstance(module, nn.Linear):
        return False
    if not name.startswith(("decoder.layers.", "late.")):
        return False  # the output head, the vision tower
    return not name.endswith("router.gate")


def quantize_model(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Replace the model's linear and expert weights by int4 ones, in place. Returns what was
    quantised: {"tensors", "params", "bytes_before", "bytes_after"} (of the quantised weights)."""
    targets = [(name, m) for name, m in model.named_modules() if _quantizable(name, m)]
    report = {"tensors": 0, "params": 0, "bytes_before": 0, "bytes_after": 0}
    for name, module in targets:
        weights = [module.w1, module.w2, module.w3] if isinstance(module, Experts) else [module.weight]
        report["tensors"] += len(weights)
        report["params"] += sum(w.numel() for w in weights)
        report["bytes_before"] += sum(w.numel() * w.element_size() for w in weights)
        new = (
            Int4Experts(module, group_size) if isinstance(module, Experts) else Int4Linear(module, group_size)
        )
        report["bytes_after"] += sum(q.nbytes() for q in new.modules() if isinstance(q, Int4Weight))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return report


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters (a tied one once) plus int4 codes, scales and
    offsets; other buffers (router biases, RoPE tables) are not weights."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(q.nbytes() for q in model.modules() if isinstance(q, Int4Weight))


# ---------------------------------------------------------------------------------------------
# fusion-eval --quantize int4
# ---------------------------------------------------------------------------------------------


def add_int4_results(
    model,
    results: dict[str, dict],
    out_dir: Path,
    *,
    group_size: int,
    batch_size: int = 16,
    limit: int | None = None,
    blind: bool = True,
    device=None,
    progress: bool = False,
) -> dict[str, dict]:
    """Quantise `model` in place and evaluate it on the sets of `results` (fusion-eval's results of
    the same model unquantised); each SET.json gains "weight_bytes" and "dtype" of the original and
    an "int4" section {group_size, overall, by_type, weight_bytes, quantized, seconds}."""
    from fusion.eval.vqa import run_evaluation
    from fusion.files import write_atomic

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    before = weight_bytes(model)
    report = quantize_model(model, group_size)
    after = weight_bytes(model)
    for name, result in results.items():
        t0 = time.perf_counter()
        q, _ = run_evaluation(
            model,
            result["vqa_dir"],
            batch_size=batch_size,
            limit=limit,
            blind=blind,
            n_frames=result["n_frames"],
            device=device,
            progress=progress,
            examples=0,
        )
        result["dtype"] = dtype
        result["weight_bytes"] = before
        result["int4"] = {
            "group_size": group_size,
            "overall": q["overall"],
            "by_type": q["by_type"],
            "weight_bytes": after,
            "quantized": report,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_atomic(Path(out_dir) / f"{name}.json", (json.dumps(result, indent=1) + "\n").encode())
    return results


def format_int4(result: dict) -> str:
    """One line: int4 accuracy beside the original's, and the weight memory of each."""
    q = result["int4"]
    mib = 2**20
    blind = q["overall"]["blind_acc"]
    return (
        f"int4 (group {q['group_size']}): acc {q['overall']['acc']:.3f} vs {result['dtype']} "
        f"{result['overall']['acc']:.3f}"
        + (f", blind {blind:.3f}" if blind is not None else "")
        + f"; weights {q['weight_bytes'] / mib:.2f} MiB vs {result['weight_bytes'] / mib:.2f} MiB "
        f"({q['weight_bytes'] / result['weight_bytes']:.2f}x)"
    )
