"""ExpertParallel: the trainer's side of the routed experts.

It shards the experts of every MoE layer over the expert-parallel group and installs the
dispatchers (dispatch.py), hands DeepSpeed the rest of the model (engine_view.py), keeps fp32
master weights and fp32 gradient accumulation for the experts (accumulation.py), reduces their
gradients over the expert-data-parallel group, joins their norm to DeepSpeed's (norms.py), steps
them with its own AdamW, and reads and writes their checkpoint files (files.py).

Shapes: E experts per layer, P = ep_size, El = E / P experts on this rank.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from fusion import dist
from fusion.model.moe import mark_expert
from fusion.optim import build_optimizer
from fusion.parallel.accumulation import add_into_fp32, fp32_grads
from fusion.parallel.dispatch import ExpertDispatcher
from fusion.parallel.engine_view import EngineView, expert_parameter_names, restore_buffer_dtypes
from fusion.parallel.files import copy_unsharded, gather_state_dict, load_slice, save_shard
from fusion.parallel.norms import clip_coef, hook_norm, is_unfused_bf16, take_over_unfused


class ExpertParallel:
    """Shards the routed experts of `model` over `ep_size` ranks and trains them beside DeepSpeed.

    Use (all ranks, in this order):
        ep = ExpertParallel(model, ep_size)                # shards experts, installs dispatchers
        engine = deepspeed.initialize(model=ep.engine_module(), optimizer=<non-expert params>)
        ep.attach(engine, <expert param groups>, betas, grad_clip)
        ep.restore_buffer_dtypes()                         # MoE buffers keep fp32 / float64
        per optimizer step: engine.backward(...) -> ep.reduce_grads() at the accumulation boundary
                            -> engine.step() -> ep.step()
    A model without routed experts passes through untouched (but for bf16 without ZeRO, where
    `attach` accumulates DeepSpeed's dense gradients in fp32).

    Gradients accumulate in fp32 over the micro-steps. In bf16 each expert's gradient is added
    into its fp32 master's `.grad` as backward produces it and the bf16 `.grad` is freed (a
    post-accumulate-grad hook); `reduce_grads` reduces those fp32 gradients. The dense part:
    DeepSpeed with `data_types.grad_accum_dtype=fp32` (fusion.config.deepspeed_config) at ZeRO 1
    and 2; without ZeRO, the same hooks feeding the fp32 masters of DeepSpeed's optimizer wrapper.

    No host reads: the norm, the clip coefficient and the returned norm stay device tensors.
    """

    def __init__(self, model: nn.Module, ep_size: int = 1):
        self.model = model
        self.ep_size = ep_size
        self.world = dist.world()
        self.rank = dist.rank()
        if self.world % ep_size:
            raise ValueError(
                f"config key 'model.moe.ep_size': world size {self.world} is not divisible "
                f"by ep_size={ep_size}"
            )
        self.names = expert_parameter_names(model)
        self.ep_rank = self.rank % ep_size
        self.ep_group = self.ep_dp_group = None
        self.n_experts = 0
        if self.names:
            self.n_experts = model.get_parameter(self.names[0]).shape[0]
            if self.n_experts % ep_size:
                raise ValueError(
                    f"config key 'model.moe.ep_size': n_experts={self.n_experts} is not "
                    f"divisible by ep_size={ep_size}"
                )
        if self.names and self.world > 1:
            self.ep_group, self.ep_dp_group = dist.expert_groups(ep_size)
        if ep_size > 1 and self.names:
            self._shard()
        self.params = [model.get_parameter(n) for n in self.names]
        self.optimizer: torch.optim.Optimizer | None = None
        self.masters: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # (bf16 param, fp32 master)
        self.accum: list[torch.Tensor] = []  # per expert parameter, the tensor whose fp32 .grad accumulates
        self.grad_clip = 0.0
        self.norm_mode: str | None = None  # how the experts' norm joins DeepSpeed's (norms.hook_norm)
        self.expert_sq: torch.Tensor | None = None  # squared norm of all expert grads, all shards
        self._norm: torch.Tensor | None = None  # global norm when computed here (fp32 ZeRO 0)
        self.last_norm: torch.Tensor | None = None
        self._engine = None

    # -- setup --------------------------------------------------------------------------------

    @property
    def local_experts(self) -> tuple[int, int]:
        """[lo, hi) global ids of the experts on this rank."""
        El = self.n_experts // self.ep_size
        return self.ep_rank * El, (self.ep_rank + 1) * El

    def _shard(self) -> None:
        lo, hi = self.local_experts
        for name in self.names:
            owner, attr = self._owner(name)
            full = getattr(owner, attr)
            local = nn.Parameter(full.detach()[lo:hi].clone())  # (El, ...)
            mark_expert(local)
            setattr(owner, attr, local)
        for moe in self.model.moe_layers:
            moe.dispatcher = ExpertDispatcher(self.ep_group, self.ep_size, self.n_experts)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        return self.model.get_submodule(path), attr

    def engine_module(self) -> nn.Module:
        """What to hand DeepSpeed: the model itself when it has no experts, else an EngineView."""
        return EngineView(self.model, set(self.names)) if self.names else self.model

    def attach(
        self, engine, param_groups: list[dict], betas, grad_clip: float = 0.0, optimizer: str = "adamw"
    ) -> None:
        """After deepspeed.initialize: build the expert optimizer (`train.optimizer`, fusion/optim.py)
        from `param_groups` (dicts with params, weight_decay, lr_scale, name, muon), accumulate bf16
        gradients in fp32, and hook the experts into DeepSpeed's gradient norm."""
        self._engine = engine
        self.grad_clip = grad_clip
        if not self.names:
            if is_unfused_bf16(engine.optimizer):
                self.norm_mode = "unfused"
                take_over_unfused(self, engine.optimizer)
            return
        dtype = next(p.dtype for p in engine.module.parameters())
        if dtype != torch.float32:
            # the model computes in bf16: experts follow, and keep fp32 master weights here
            for p in self.params:
                p.data = p.data.to(dtype)
        groups = []
        self.masters = []
        by_id = {id(p): i for i, p in enumerate(self.params)}
        for g in param_groups:
            ps = []
            for p in g["params"]:
                i = by_id[id(p)]
                ps.append(p if p.dtype == torch.float32 else self._master(i))
            groups.append({**g, "params": ps})
        self.optimizer = build_optimizer(groups, optimizer, 0.0, betas, 0.0)  # groups carry their decay
        master_of = {id(p): m for p, m in self.masters}
        self.accum = [master_of.get(id(p), p) for p in self.params]
        for p, m in self.masters:
            p.register_post_accumulate_grad_hook(functools.partial(add_into_fp32, m))
        self.norm_mode = hook_norm(self, engine)

    def restore_buffer_dtypes(self) -> list[str]:
        """`restore_buffer_dtypes(self.model)`: after deepspeed.initialize (see there)."""
        return restore_buffer_dtypes(self.model)

    def _master(self, i: int) -> torch.Tensor:
        m = self.params[i].detach().float().clone().requires_grad_(True)
        self.masters.append((self.params[i], m))
        return m

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups if self.optimizer is not None else []

    # -- per optimizer step -------------------------------------------------------------------

    def _grads(self) -> list[torch.Tensor]:
        """The experts' fp32 gradients (zeros for an expert that got none)."""
        return fp32_grads(self.accum)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """At the accumulation boundary, after engine.backward and before engine.step."""
        if not self.names:
            return
        grads = self._grads()
        if self.ep_dp_group is not None:
            flat = torch.cat([g.reshape(-1) for g in grads])  # fp32
            dist.all_reduce(flat, group=self.ep_dp_group)
            flat /= self.world  # the data-parallel mean, as DeepSpeed does for the rest
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
        if self.ep_group is not None and self.ep_size > 1:
            dist.all_reduce(sq, group=self.ep_group)  # every shard of every expert
        self.expert_sq = sq
        self._norm = None
        if self.norm_mode == "fp32":
            dense = [p.grad for p in self._engine.module.parameters() if p.grad is not None]
            dense_sq = torch.stack([g.float().pow(2).sum() for g in dense]).sum() if dense else sq * 0
            self._norm = (dense_sq + sq).sqrt()
            coef = clip_coef(self._norm, self.grad_clip, self.norm_mode)
            if coef is not None:
                for g in dense:
                    g.mul_(coef)

    @torch.no_grad()
    def step(self) -> torch.Tensor | None:
        """After engine.step: clip the experts with the global norm and step them. Returns that
        norm, a device tensor (None without experts); nothing is read on the host.

        A step with a non-finite loss or gradient is skipped by NonFiniteGuard, which makes the
        torch optimizers' step (this AdamW's included) a no-op: the fp32 masters, the AdamW state
        and so the weights stay as they were. A step DeepSpeed's wrapper refused on its own (its
        `overflow` flag, a host bool DeepSpeed has already read) is skipped here too."""
        if not self.names:
            return None
        norm = self._norm
        if norm is None:
            norm = self._engine.get_global_grad_norm()
        device = self.accum[0].device
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=device)
        grads = self._grads()
        coef = clip_coef(norm, self.grad_clip, self.norm_mode)
        if coef is not None:
            for g in grads:
                g.mul_(coef)
        if getattr(self._engine.optimizer, "overflow", False) is not True:
            self.optimizer.step()
        for p, m in self.masters:
            p.copy_(m)
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        self.expert_sq = None
        self.last_norm = norm
        return norm

    # -- checkpoints and export (files.py) -----------------------------------------------------

    def save(self, directory: str | Path) -> list[Path]:
        """Collective. The ranks of the first expert-data-parallel replica each write their shard
        into `directory` (a checkpoint step dir). Returns the files this rank wrote."""
        return save_shard(self, directory)

    def load(self, directory: str | Path) -> None:
        """Load this rank's expert slice and its optimizer state from any saved ep size."""
        load_slice(self, directory)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. The model's state_dict with every expert of every layer (gathered over the
        expert-parallel group); on every rank."""
        return gather_state_dict(self)

    def unsharded_copy(self) -> nn.Module:
        """Collective. A single-device copy of the model holding every expert (for evaluation on
        one rank); the model itself is unchanged."""
        return copy_unsharded(self)
