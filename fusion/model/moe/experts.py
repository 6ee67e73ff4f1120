"""The routed experts: E SwiGLU experts with stacked weights, and how they run on sorted rows.

Owns `Experts` with its two paths over rows already sorted by expert: the readable per-expert
loop (`forward_loop`, the test oracle of every other path) and the grouped path
(`forward_grouped`: one `torch._grouped_mm` per weight, or a padded `bmm`). Also the capability
checks for `torch._grouped_mm` (`grouped_mm_fits`, `use_grouped_mm`, `grouped_mm_supported`)
and `_DenseGrad`, which the fast path (fusion/model/moe/fast.py) uses too.

The stacked weights are marked as routed-expert weights (`mark_expert`, read by `is_expert`): that
keeps them out of the DeepSpeed engine; fusion/parallel/ shards, reduces, steps and checkpoints
them (dim 0 is the expert axis).

Shape legend:
    D model dim, E experts, H expert hidden width, M routed rows (token, expert pairs) sorted by
    expert, C rows of the largest group (the bmm path pads every group to C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import MoEConfig
from fusion.model.init import init_matrix
from fusion.model.kernels import Kernels, default_kernels


def mark_expert(p: nn.Parameter) -> nn.Parameter:
    """Mark `p` as a routed-expert weight (an `expert` attribute set to True on the parameter):
    kept out of the DeepSpeed engine, sharded, reduced, stepped and checkpointed by fusion/parallel/.
    Returns `p`. A parameter that replaces a marked one (a shard, a gathered copy) is marked again."""
    setattr(p, "expert", True)  # noqa: B010 (nn.Parameter declares no such attribute: set by name)
    return p


def is_expert(p: torch.Tensor) -> bool:
    """Whether `p` is a routed-expert weight (`mark_expert`)."""
    return bool(getattr(p, "expert", False))


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    `torch._grouped_mm`'s backward rejects a stride-0 gradient (what `y.sum().backward()` sends:
    "Invalid strides/sizes, got [0, 0] for strides"), so its output passes through this.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm(x, w, offs=...)` takes these operands: a static check of dtype,
    device type and row alignment that asks no device anything (fusion/model/kernels.py decides
    whether the kernel is wanted at all)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device != w.device:
        return False
    # the CPU kernels take fp32, bf16 and fp16; the CUDA (CUTLASS) kernels and the meta function,
    # which meta tensors and torch.compile's tracing run, take bf16 only
    eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if x.dtype not in ((torch.float32, torch.bfloat16, torch.float16) if eager_cpu else (torch.bfloat16,)):
        return False
    # every row stride must be a multiple of 16 bytes ("strides should be multiple of 16 bytes")
    row_bytes = (x.shape[-1] * x.element_size(), w.shape[-1] * w.element_size())
    return all(b % 16 == 0 for b in row_bytes)


def use_grouped_mm(x: torch.Tensor, w: torch.Tensor, kernels: Kernels | None) -> bool:
    """Whether the experts run `torch._grouped_mm` on these operands: the layer's kernel choice
    (`default_kernels` of the device when none was given) and the static check."""
    if kernels is None:
        kernels = default_kernels(x.device, x.dtype)
    return kernels.grouped_mm and grouped_mm_fits(x, w)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm(x, w, offs=...)` accepts these operands on this build/device
    (sm90+ and bf16 on CUDA, fp32/bf16/fp16 on CPU, 16-byte rows)."""
    return use_grouped_mm(x, w, None)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights, run over tokens already sorted by expert.

    `counts` (E,) gives how many consecutive rows of `x_sorted` belong to each expert.
    Expert e computes (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]. The weights are drawn by
    `reset_parameters`, which the MoE layer calls.
    """

    kernels: Kernels | None = None  # set by FusionModel.use_kernels; None: default_kernels of the device

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        E, H = cfg.n_experts, cfg.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(E, dim, H))  # gate
        self.w3 = nn.Parameter(torch.empty(E, dim, H))  # up
        self.w2 = nn.Parameter(torch.empty(E, H, dim))  # down
        for p in (self.w1, self.w3, self.w2):
            mark_expert(p)  # kept out of the DeepSpeed engine (fusion/parallel/)
        self.impl = "auto"  # forward_grouped's kernel: "auto" | "grouped_mm" | "bmm"

    def reset_parameters(self, init_std: float) -> None:
        """Every expert's w1, w3 and w2: N(0, init_std) (fusion/model/init.py)."""
        for p in (self.w1, self.w3, self.w2):
            init_matrix(p, init_std)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def forward_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul chain per expert. (M, D), (E,) -> (M, D)."""
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            outs.append(self._expert(x_sorted[start : start + n], e))
            start += n
        if not outs:
            # nothing routed: still run the (empty) chain so every weight gets a (zero) gradient
            return self._expert(x_sorted, 0)
        return torch.cat(outs)  # (M, D)

    def forward_grouped(
        self, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str | None = None
    ) -> torch.Tensor:
        """Fast path: one grouped matmul per weight, or padded bmm. (M, D), (E,) -> (M, D)."""
        impl = impl or self.impl
        if impl not in ("auto", "grouped_mm", "bmm"):
            raise ValueError(f"Experts impl must be auto, grouped_mm or bmm, got {impl!r}")
        if impl == "auto":
            impl = "grouped_mm" if use_grouped_mm(x_sorted, self.w1, self.kernels) else "bmm"
        elif impl == "grouped_mm" and not grouped_mm_fits(x_sorted, self.w1):
            raise ValueError(
                f"torch._grouped_mm does not support {x_sorted.dtype} on {x_sorted.device} "
                f"with dim={x_sorted.shape[-1]}, hidden={self.w1.shape[-1]}"
            )
        if x_sorted.shape[0] == 0:
            # no tokens at all: the weight gradient of a grouped GEMM then has a zero-length
            # contraction dim, which _grouped_mm rejects (pytorch #192497); bmm handles it
            impl = "bmm"
        if impl == "grouped_mm":
            return self._grouped_mm(x_sorted, counts)
        return self._bmm(x_sorted, counts)

    def _grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # offs[-1] == M: rows past the last offset would be left uninitialised (pytorch #154557)
        offs = counts.cumsum(0).to(torch.int32)  # (E,)
        x = x.contiguous()
        h = F.silu(torch._grouped_mm(x, self.w1, offs=offs)) * torch._grouped_mm(x, self.w3, offs=offs)
        return _DenseGrad.apply(torch._grouped_mm(h, self.w2, offs=offs))  # (M, D)

    def _bmm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        E, M = counts.shape[0], x.shape[0]
        cap = int(counts.max()) if M else 0  # rows of the largest group (a host sync)
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)  # (M,)
        starts = counts.cumsum(0) - counts  # (E,)
        row = torch.arange(M, device=x.device) - starts[expert]  # (M,) position inside its group
        padded = x.new_zeros(E, cap, x.shape[-1]).index_put((expert, row), x)  # (E, C, D)
        # zero rows stay zero through SwiGLU (silu(0) * 0 = 0), so padding adds nothing to weight grads
        h = F.silu(torch.bmm(padded, self.w1)) * torch.bmm(padded, self.w3)  # (E, C, H)
        out = torch.bmm(h, self.w2)  # (E, C, D)
        return out[expert, row]  # (M, D)
