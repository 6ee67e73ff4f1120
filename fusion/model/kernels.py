"""Kernel choices, made once per model and device, never inside a forward pass.

`Kernels` says which device-specific paths the model takes:

- `grouped_mm`: the routed experts use `torch._grouped_mm` wherever the operands allow it (a
  static check of dtype and 16-byte row alignment at the call site, fusion/model/moe/experts.py
  `grouped_mm_fits`), whatever the device type: on `meta` tensors the operator's meta kernel checks
  shapes, strides and alignment, which a dry run relies on.
- `side_stream`: the shared expert of `model.moe.path=fast` runs on a second stream
  (fusion/model/moe/streams.py, fusion/model/moe/fast.py).
- `compile_flex`: FlexAttention and its block masks are compiled (fusion/model/decoder.py); the
  uncompiled version is PyTorch's reference, which materialises the scores.

`Kernels.for_device` is the one place where the CUDA driver is asked what the device can do.
`FusionModel.use_kernels(kernels, streams)` (fusion/model/fusion.py `install_kernels`) hands a
choice to every MoE layer and attention of a model. Until then each layer falls back to
`default_kernels(device, dtype)`: `for_device` asked once per (device, dtype) and cached, so a
compiled region only reads the cache. This module imports nothing of the model: the layers read
their choice from here, and the model hands it to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernels:
    grouped_mm: bool = False  # torch._grouped_mm for the routed experts where dtype and alignment allow
    side_stream: bool = False  # the shared expert of the fast MoE path on a second stream
    compile_flex: bool = False  # compiled flex_attention / create_block_mask

    @staticmethod
    def for_device(device: torch.device | str, dtype: torch.dtype) -> Kernels:
        """What `device` runs best for a model in `dtype`.

        CUDA: `_grouped_mm` needs Hopper (sm90+) and bf16 (its CUTLASS kernels), the side stream
        and compiled FlexAttention are always used. A CUDA device without a driver (fake tensors)
        gets no special kernel: pass an explicit `Kernels` there. CPU: `_grouped_mm` has kernels for
        fp32, bf16 and fp16; no side stream, FlexAttention uncompiled. Any other device: none.
        """
        device = torch.device(device)
        has_grouped = hasattr(torch, "_grouped_mm")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return Kernels()
            capability = torch.cuda.get_device_capability(device)
            return Kernels(
                grouped_mm=has_grouped and dtype == torch.bfloat16 and capability >= (9, 0),
                side_stream=True,
                compile_flex=True,
            )
        if device.type == "cpu":
            return Kernels(grouped_mm=has_grouped and dtype in (torch.float32, torch.bfloat16, torch.float16))
        return Kernels()


_DEFAULTS: dict[tuple[torch.device, torch.dtype], Kernels] = {}


def default_kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """`Kernels.for_device(device, dtype)`, asked once per (device, dtype): the choice of a layer
    that was never given one by `FusionModel.use_kernels`."""
    key = (torch.device(device), dtype)
    if key not in _DEFAULTS:
        _DEFAULTS[key] = Kernels.for_device(*key)
    return _DEFAULTS[key]
