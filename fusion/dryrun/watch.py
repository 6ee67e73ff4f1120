"""Watching a dry-run step: shapes and dtypes of every part, the kernels' operands, and the dtype
rules a bf16 GPU run keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_grouped_mm",
    "convolution",
    "_convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "scaled_dot_product_attention",
}
FP32_BY_DESIGN = ("router",)  # module names whose matrix products run in fp32 on purpose


class _AttentionScope(TorchFunctionMode):
    """`F.scaled_dot_product_attention` as one kernel: its inputs' dtype is checked here, and the
    ops it decomposes into on meta tensors (the math reference, which upcasts bf16 to fp32 where a
    GPU runs a fused bf16 kernel) are not checked one by one."""

    def __init__(self, watch: StepWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.watch.attention(args[:3])
        self.watch.inside_attention += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.watch.inside_attention -= 1


class StepWatch(TorchDispatchMode):
    """Records, during a step: the output shape and dtype of the first call of every module kind
    (layer indices folded), the shapes of the grouped matmuls and attention kernels, and dtype
    violations: a matrix product in a dtype other than `compute` outside the router, and any
    float64 result while autograd is recording. Use as a context manager."""

    def __init__(self, model: nn.Module, compute: torch.dtype):
        super().__init__()
        self.compute = compute
        self.inside_attention = 0
        self.scope = _AttentionScope(self)
        self.stack: list[str] = []
        self.shapes: dict[str, str] = {}
        self.kernels: dict[str, str] = {}
        self.violations: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name)))

    @staticmethod
    def _kind(name: str) -> str:
        return ".".join("*" if part.isdigit() else part for part in name.split(".")) or "model"

    @staticmethod
    def in_backward() -> bool:
        """Inside autograd's backward (activation checkpointing re-runs forwards there, and may stop
        one half-way: module context is tracked in the real forward only)."""
        return torch._C._current_graph_task_id() != -1

    def _enter(self, name):
        def hook(module, args):
            if not self.in_backward():
                self.stack.append(name)

        return hook

    def _leave(self, name):
        def hook(module, args, output):
            if self.in_backward():
                return
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            kind = self._kind(name)
            if kind not in self.shapes:
                self.shapes[kind] = _describe(output)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self):
        self.scope.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.scope.__exit__(*exc)

    def attention(self, qkv) -> None:
        if self.in_backward():  # a recompute: checked in the forward
            return
        where = self._kind(self.stack[-1]) if self.stack else "?"
        self.kernels.setdefault(
            "scaled_dot_product_attention",
            " x ".join(f"{tuple(t.shape)}" for t in qkv) + f" {_dtype(qkv[0].dtype)}",
        )
        bad = [t.dtype for t in qkv if t.dtype != self.compute]
        if bad:
            self.violations.append(
                f"attention in {where} runs in {_dtype(bad[0])}, the GPU run computes "
                f"in {_dtype(self.compute)}"
            )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_attention:
            return out
        op = func._schema.name.split("::")[-1]
        forward = bool(self.stack) and not self.in_backward()
        where = self._kind(self.stack[-1]) if forward else "(backward or outside a module)"
        if op in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if op not in self.kernels and forward:  # backward shapes are the forward's transposes
                self.kernels[op] = (
                    " x ".join(f"{tuple(a.shape)}" for a in tensors[:3]) + f" {_dtype(tensors[0].dtype)}"
                    if tensors
                    else ""
                )
            in_router = any(part in FP32_BY_DESIGN for part in where.split("."))
            bad = [a.dtype for a in tensors if a.dtype != self.compute]
            if bad and not (in_router and all(d == torch.float32 for d in bad)) and forward:
                self.violations.append(
                    f"{op} in {where} runs in {_dtype(bad[0])}, the GPU run computes in "
                    f"{_dtype(self.compute)}"
                )
        if torch.is_grad_enabled():
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.requires_grad:
                    self.violations.append(
                        f"{op} in {where} makes a float64 tensor that autograd "
                        f"records (float64 runs at a fraction of GPU speed)"
                    )
        return out


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {_dtype(x.dtype)}"
    if isinstance(x, (tuple, list)):
        return ", ".join(_describe(v) for v in x if isinstance(v, (torch.Tensor, tuple, list)))
    if hasattr(x, "loss") and isinstance(x.loss, torch.Tensor):
        return f"loss {_describe(x.loss)}"
    return type(x).__name__
