"""What DeepSpeed sees of the model: `EngineView`, the model minus its routed-expert parameters
(`expert_parameter_names` says which those are), and `restore_buffer_dtypes`, which undoes what a
cast of the whole model does to the MoE buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.model.moe import is_expert


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the routed-expert parameters (`is_expert`): trained outside DeepSpeed."""
    return [n for n, p in model.named_parameters() if is_expert(p)]


class EngineView(nn.Module):
    """The model without its routed-expert parameters, for `deepspeed.initialize`.

    Parameters, state_dict and load_state_dict skip the experts, so DeepSpeed neither broadcasts,
    reduces, casts, partitions nor checkpoints them. forward is the model's.
    """

    def __init__(self, model: nn.Module, expert_names: set[str]):
        super().__init__()
        self.model = model
        self.expert_names = expert_names

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self.model.named_parameters(recurse=recurse, remove_duplicate=remove_duplicate):
            if name not in self.expert_names:
                yield prefix + name, p

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = self.model.state_dict(prefix=prefix, keep_vars=keep_vars)
        for name in self.expert_names:
            sd.pop(prefix + name, None)
        if destination is not None:
            destination.update(sd)
            return destination
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self.model.load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in self.expert_names]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match the model: missing {missing}, unexpected {result.unexpected_keys}"
            )
        return result


def restore_buffer_dtypes(model: nn.Module) -> list[str]:
    """Give the MoE buffers back their dtypes after a cast of the whole model: the router's
    `expert_bias` fp32 (its 1e-3 steps are below bf16 resolution) and the expert-load counts
    `load` float64 (integer counts above 256 are not exact in bf16). DeepSpeed 0.19.8 casts only
    parameters to bf16 unless `data_types.buffer_dtype` is set; `module.to(torch.bfloat16)` casts
    buffers too. The trainer calls it right after deepspeed.initialize, before a checkpoint is
    loaded into these buffers (loading copies into a buffer and keeps its dtype). Returns the
    names of the buffers it restored."""
    from fusion.model.moe import MoE

    restored = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        for owner, key, dtype in (
            (module.router, "expert_bias", torch.float32),
            (module, "load", torch.float64),
        ):
            buf = owner._buffers.get(key)
            if buf is not None and buf.dtype != dtype:
                owner._buffers[key] = buf.to(dtype)
                restored.append(f"{name}.{'router.' if owner is module.router else ''}{key}")
    return restored
