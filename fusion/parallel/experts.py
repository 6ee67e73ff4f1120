"""Expert parallelism: the one place where routed experts meet process groups (issue #6).

Owns the expert-parallel groups, the all-to-all dispatcher that carries tokens to the rank holding
their expert and back, and everything the trainer does to routed-expert parameters: their
gradient reduction, their optimizer, their share of the gradient norm, and their checkpoint files.
Model code stays single-device: `MoE.forward` calls `moe.dispatcher` when one is installed here.

Layout (`fusion.dist.expert_groups`, DeepSpeed's layout): with W ranks and ep_size P, the
expert-parallel groups are consecutive ranks [0..P-1], [P..2P-1], ...; rank r holds experts
[(r % P) * E/P, (r % P + 1) * E/P) of every MoE layer; the expert-data-parallel group of r is
{r % P, r % P + P, ...}, the ranks that hold the same experts.

Why experts live outside the DeepSpeed engine. DeepSpeed 0.19.8 reduces `allreduce=False`
parameters over expert groups only when it finds its own `deepspeed.moe.layer.MoE` modules; its
expert checkpoint code assumes that module's per-expert layout and cannot reshard optimizer state
across ep sizes, and it averages per-group gradient norms instead of summing squares. So:

- DeepSpeed gets `EngineView(model)`: the model minus its routed-expert parameters. ZeRO 0/1/2,
  bf16 and its checkpoints handle everything else, unchanged.
- `ExpertParallel` keeps the expert parameters: it reduces their gradients over the
  expert-data-parallel group in fp32 (divided by the world size, like DeepSpeed's data-parallel
  mean), steps them with its own AdamW (same hyperparameters and learning-rate schedule; fp32
  master weights when the model runs in bf16, into whose fp32 gradients the bf16 ones are summed
  over the micro-steps), and writes them, with their optimizer state, as
  safetensors files inside the checkpoint directory, one per expert shard. Loading reads every
  shard of the saved ep size, joins them along the expert axis and takes this rank's slice, so a
  checkpoint resumes at any ep size.
- Gradient clipping sees the true global norm: sqrt(|g_dense|^2 + sum over all expert shards of
  |g_expert|^2). The expert part is summed over the expert-parallel group; it is added to the norm
  DeepSpeed computes (ZeRO 2, and ZeRO 1 in fp32: `scaled_global_norm`; ZeRO 1 in bf16:
  BF16_Optimizer's `get_grads_for_norm`) or, without ZeRO, computed here (bf16: the step of DeepSpeed's
  FP16_UnfusedOptimizer is replaced, see `ExpertParallel._take_over_unfused`; fp32: the reduced
  gradients sit in `.grad`). The experts are clipped with the same coefficient as the rest, and
  the norm, the coefficient and the returned norm stay on the device (no host read).
- The experts' optimizer state is sharded by expert parallelism only (ZeRO does not partition it).

Router statistics need nothing here: each rank counts its own tokens' choices before dispatch and
the trainer all-reduces the counts over all ranks.

Shapes: M routed (token, expert) pairs on this rank, D dim, E experts, El = E / P local experts.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fusion import dist

EXPERT_FILE = "experts-{rank:05d}-of-{size:05d}.safetensors"
_EXPERT_FILE_RE = re.compile(r"experts-(\d{5})-of-(\d{5})\.safetensors")


# ---------------------------------------------------------------------------------------------
# all-to-all dispatch
# ---------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with a backward: the gradient takes the same road in reverse."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        return dist.all_to_all(out, x, out_splits, in_splits, group=group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        return dist.all_to_all(back, grad, in_splits, out_splits, group=ctx.group), None, None, None


class ExpertDispatcher:
    """Sends routed rows to the rank owning their expert, runs the local experts, sends them back.

    Called by `MoE.forward` with rows sorted by global expert id; rows past sum(counts) (padding
    pairs the fast path sorts last) are not sent. Counts travel first (each rank learns how many
    rows of each of its experts every other rank sends), then the rows. The all-to-all needs the
    row counts on the host: one host read per call, the only one in a MoE layer under expert
    parallelism (in a dry run the counts read as an even split).
    """

    def __init__(self, group, ep_size: int, n_experts: int):
        self.group, self.ep_size, self.n_experts = group, ep_size, n_experts

    def __call__(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                 run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        P, El = self.ep_size, self.n_experts // self.ep_size
        # 1. counts: row (s, l) of recv_counts = rows source s sends to my local expert l
        recv_counts = torch.empty_like(counts)  # (E,) = (P * El,)
        dist.all_to_all(recv_counts, counts, group=self.group)
        both = torch.stack([counts, recv_counts]).view(2, P, El).sum(2)  # (2, P) rows per rank
        rows = x_sorted.shape[0]
        host = dist.fetch(both, "expert parallelism: rows per rank for the all-to-all",
                          stand_in=lambda: even_split(rows, P).expand(2, P))
        send_splits, recv_splits = host.tolist()  # rows for each destination / from each source rank
        x_sorted = x_sorted[:sum(send_splits)]  # padding pairs stay home
        # 2. rows: arrive grouped by source, then by local expert
        recv = _AllToAll.apply(x_sorted, recv_splits, send_splits, self.group)  # (R, D)
        local_expert = torch.arange(P * El, device=counts.device) % El  # (P*El,)
        row_expert = torch.repeat_interleave(local_expert, recv_counts, output_size=recv.shape[0])  # (R,)
        order = row_expert.argsort(stable=True)  # regroup by local expert, sources in rank order
        out = run_local(recv[order], recv_counts.view(P, El).sum(0))  # (R, D)
        out = out[order.argsort()]  # back to (source, expert) order
        # 3. results go home
        return _AllToAll.apply(out, send_splits, recv_splits, self.group)  # (M, D)


def even_split(n: int, parts: int) -> torch.Tensor:
    """(parts,) long: n rows dealt out as evenly as possible (the dry run's stand-in counts)."""
    base = torch.full((parts,), n // parts, dtype=torch.long)
    base[: n % parts] += 1
    return base


# ---------------------------------------------------------------------------------------------
# what DeepSpeed sees
# ---------------------------------------------------------------------------------------------


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
            raise RuntimeError(f"checkpoint does not match the model: missing {missing}, "
                               f"unexpected {result.unexpected_keys}")
        return result


# ---------------------------------------------------------------------------------------------
# the trainer's side of the experts
# ---------------------------------------------------------------------------------------------


def expert_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if getattr(p, "expert", False)]


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
            raise ValueError(f"config key 'model.moe.ep_size': world size {self.world} is not divisible "
                             f"by ep_size={ep_size}")
        self.names = expert_parameter_names(model)
        self.ep_rank = self.rank % ep_size
        self.ep_group = self.ep_dp_group = None
        self.n_experts = 0
        if self.names:
            self.n_experts = model.get_parameter(self.names[0]).shape[0]
            if self.n_experts % ep_size:
                raise ValueError(f"config key 'model.moe.ep_size': n_experts={self.n_experts} is not "
                                 f"divisible by ep_size={ep_size}")
        if self.names and self.world > 1:
            self.ep_group, self.ep_dp_group = dist.expert_groups(ep_size)
        if ep_size > 1 and self.names:
            self._shard()
        self.params = [model.get_parameter(n) for n in self.names]
        self.optimizer: torch.optim.Optimizer | None = None
        self.masters: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # (bf16 param, fp32 master)
        self.accum: list[torch.Tensor] = []  # per expert parameter, the tensor whose fp32 .grad accumulates
        self.grad_clip = 0.0
        self.norm_mode: str | None = None  # how the experts' norm joins DeepSpeed's (see _hook_norm)
        self._expert_sq: torch.Tensor | None = None  # squared norm of all expert grads, all shards
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
            local.expert = True
            setattr(owner, attr, local)
        for moe in self.model.moe_layers:
            moe.dispatcher = ExpertDispatcher(self.ep_group, self.ep_size, self.n_experts)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        return self.model.get_submodule(path), attr

    def engine_module(self) -> nn.Module:
        """What to hand DeepSpeed: the model itself when it has no experts, else an EngineView."""
        return EngineView(self.model, set(self.names)) if self.names else self.model

    def attach(self, engine, param_groups: list[dict], betas, grad_clip: float = 0.0) -> None:
        """After deepspeed.initialize: build the expert optimizer from `param_groups` (dicts with
        params, weight_decay, lr_scale, name), accumulate bf16 gradients in fp32, and hook the
        experts into DeepSpeed's gradient norm."""
        self._engine = engine
        self.grad_clip = grad_clip
        if not self.names:
            if _is_unfused_bf16(engine.optimizer):
                self.norm_mode = "unfused"
                self._take_over_unfused(engine.optimizer)
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
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas))
        master_of = {id(p): m for p, m in self.masters}
        self.accum = [master_of.get(id(p), p) for p in self.params]
        for p, m in self.masters:
            p.register_post_accumulate_grad_hook(functools.partial(_add_into_fp32, m))
        self._hook_norm(engine)

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

    def _hook_norm(self, engine) -> None:
        """Make DeepSpeed's global gradient norm include the experts (sqrt(|dense|^2 + |experts|^2)),
        so that it clips the dense part with it; `step` clips the experts with the same norm. One
        way per optimizer wrapper DeepSpeed 0.19.8 can pick here (fusion.config.deepspeed_config):

        - "bf16": BF16_Optimizer (bf16, ZeRO 1, fp32 gradient accumulation). Its norm is taken over
          the tensors `get_grads_for_norm` returns: the experts join as one more, whose norm is theirs.
        - "zero": DeepSpeedZeroOptimizer (ZeRO 1 in fp32, ZeRO 2 in fp32 and bf16): `scaled_global_norm`.
        - "unfused": FP16_UnfusedOptimizer in bf16 (no ZeRO): its step is replaced (`_take_over_unfused`).
        - "fp32": the torch optimizer itself (fp32, no ZeRO): the reduced dense gradients sit in
          `.grad`; `reduce_grads` computes the norm and clips them, DeepSpeed's clipping is off.
        """
        opt = engine.optimizer
        if _is_bf16_optimizer(opt):
            self.norm_mode = "bf16"
            base_grads = opt.get_grads_for_norm

            def get_grads_for_norm(for_clipping=False):
                grads = base_grads(for_clipping=for_clipping)
                if for_clipping or self._expert_sq is None:
                    return grads
                dense, moe = grads
                return [*dense, self._expert_sq.sqrt().reshape(1)], moe

            opt.get_grads_for_norm = get_grads_for_norm
        elif hasattr(opt, "scaled_global_norm"):
            self.norm_mode = "zero"
            base = opt.scaled_global_norm

            def scaled_global_norm(norm_type=2):
                return _combine(base(norm_type), self._expert_sq, getattr(opt, "loss_scale", 1.0))

            opt.scaled_global_norm = scaled_global_norm
        elif _is_unfused_bf16(opt):
            self.norm_mode = "unfused"
            self._take_over_unfused(opt)
        elif isinstance(opt, torch.optim.Optimizer) and not engine.bfloat16_enabled() \
                and not engine.fp16_enabled():
            # plain fp32 data parallel: reduce_grads clips the dense grads with the global norm
            self.norm_mode = "fp32"
            engine.clip_fp32_gradients = lambda: None
        else:
            raise ValueError(f"routed experts: no way to add their gradient norm to DeepSpeed's "
                             f"{type(opt).__name__} (use ZeRO 0/1/2 with fp32 or bf16)")

    def _take_over_unfused(self, opt) -> None:
        """bf16 without ZeRO. DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters of the bf16
        parameters but sums the micro-steps' gradients in the bf16 `.grad`, reduces them in bf16
        and copies them to the masters at the step; DeepSpeed refuses fp32 accumulation here. So:
        each bf16 gradient is added into its master's fp32 `.grad` as backward produces it (and
        freed), DeepSpeed all-reduces those fp32 gradients at the boundary (it asks the wrapper's
        `get_grads_for_reduction`), and the wrapper's step is this one: the global norm (dense and
        experts), clipping, the torch optimizer's step, the masters copied into the bf16 weights.

        The wrapper also ran one AdamW step with zero gradients when it was built (to create the
        optimizer state): that step counts in AdamW's bias correction and applies weight decay to
        the masters. It is undone here, so that the first step is AdamW's first, as at ZeRO 1/2."""
        opt.optimizer.state.clear()
        opt.refresh_fp32_params()  # masters = the bf16 weights, which that step did not touch
        pairs = [(lp, hp) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)]
        for lp, hp in pairs:
            if lp.requires_grad:
                lp.register_post_accumulate_grad_hook(functools.partial(_add_into_fp32, hp))
        masters = [hp for _, hp in pairs]

        def get_grads_for_reduction():
            return _fp32_grads(masters), {}

        @torch.no_grad()
        def step(closure=None):
            grads = _fp32_grads(masters)
            sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
            if self._expert_sq is not None:
                sq = sq + self._expert_sq.to(sq.device)
            norm = sq.sqrt()
            coef = self._clip_coef(norm)
            if coef is not None:
                for g in grads:
                    g.mul_(coef)
            opt.overflow = False  # the non-finite skip is NonFiniteGuard's (it no-ops the step below)
            opt._global_grad_norm = norm
            opt.optimizer.step()
            for lp, hp in pairs:
                hp.grad = None
                lp.data.copy_(hp.data)
            return False

        opt.get_grads_for_reduction = get_grads_for_reduction
        opt.step = step

    # -- per optimizer step -------------------------------------------------------------------

    def _grads(self) -> list[torch.Tensor]:
        """The experts' fp32 gradients (zeros for an expert that got none)."""
        return _fp32_grads(self.accum)

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
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
        if self.ep_group is not None and self.ep_size > 1:
            dist.all_reduce(sq, group=self.ep_group)  # every shard of every expert
        self._expert_sq = sq
        self._norm = None
        if self.norm_mode == "fp32":
            dense = [p.grad for p in self._engine.module.parameters() if p.grad is not None]
            dense_sq = torch.stack([g.float().pow(2).sum() for g in dense]).sum() if dense else sq * 0
            self._norm = (dense_sq + sq).sqrt()
            coef = self._clip_coef(self._norm)
            if coef is not None:
                for g in dense:
                    g.mul_(coef)

    def _clip_coef(self, norm: torch.Tensor) -> torch.Tensor | None:
        """The factor gradients are multiplied by, a device scalar: grad_clip / (norm + 1e-6) capped
        at 1, in the form DeepSpeed's wrapper computes it (so both parts get the same number); 1
        for a norm that is not a finite, non-negative number; None without clipping."""
        if self.grad_clip <= 0:
            return None
        if self.norm_mode == "zero":  # DeepSpeedZeroOptimizer.unscale_and_clip_grads (loss scale 1)
            coef = 1.0 / ((norm + 1e-6) / self.grad_clip).clamp(min=1.0)
        else:  # clip_tensors_by_global_norm (BF16_Optimizer), torch's clip_grad_norm_
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        return torch.where(torch.isfinite(norm) & (norm >= 0), coef, torch.ones_like(coef))

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
        coef = self._clip_coef(norm)
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
        self._expert_sq = None
        self.last_norm = norm
        return norm

    # -- checkpoints and export ---------------------------------------------------------------

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """This shard's weights (fp32 masters when present) and AdamW state, by parameter name."""
        masters = {id(p): m for p, m in (self.masters or [])}
        out = {}
        for name, p in zip(self.names, self.params):
            w = masters.get(id(p), p)
            out[f"param/{name}"] = w.detach().float().cpu().contiguous()
            st = self.optimizer.state.get(w, {}) if self.optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"{key}/{name}"] = st[key].detach().float().cpu().contiguous()
            if "step" in st:
                out[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        return out

    def save(self, directory: str | Path) -> list[Path]:
        """Collective. The ranks of the first expert-data-parallel replica each write their shard
        into `directory` (a checkpoint step dir). Returns the files this rank wrote."""
        if not self.names:
            return []
        from safetensors.torch import save_file

        directory = Path(directory)
        written = []
        if self.rank < self.ep_size:  # ranks 0..P-1: one of each shard
            path = directory / EXPERT_FILE.format(rank=self.ep_rank, size=self.ep_size)
            tmp = path.with_name(path.name + ".tmp")
            meta = {"ep_size": str(self.ep_size), "ep_rank": str(self.ep_rank),
                    "n_experts": str(self.n_experts), "names": ",".join(self.names)}
            save_file(self._state_tensors(), str(tmp), metadata=meta)
            tmp.replace(path)
            written.append(path)
        return written

    def load(self, directory: str | Path) -> None:
        """Load this rank's expert slice and its optimizer state from any saved ep size."""
        if not self.names:
            return
        from safetensors import safe_open

        directory = Path(directory)
        files = sorted(p for p in directory.iterdir() if _EXPERT_FILE_RE.fullmatch(p.name))
        if not files:
            raise FileNotFoundError(f"checkpoint {directory} has no expert files ({EXPERT_FILE.format(rank=0, size=1)}"
                                    f" ...): it holds no routed-expert weights")
        saved_size = int(_EXPERT_FILE_RE.fullmatch(files[0].name).group(2))
        shards = [directory / EXPERT_FILE.format(rank=r, size=saved_size) for r in range(saved_size)]
        for s in shards:
            if not s.is_file():
                raise FileNotFoundError(f"checkpoint {directory}: expert shard {s.name} is missing")
        handles = [safe_open(str(s), framework="pt") for s in shards]
        meta = handles[0].metadata()
        if int(meta["n_experts"]) != self.n_experts:
            raise ValueError(f"checkpoint {directory} has {meta['n_experts']} experts per layer, the model "
                             f"has {self.n_experts} (config key 'model.moe.n_experts')")
        lo, hi = self.local_experts
        masters = {id(p): m for p, m in (self.masters or [])}
        for name, p in zip(self.names, self.params):
            def full(key):
                if key not in handles[0].keys():
                    return None
                return torch.cat([h.get_tensor(key) for h in handles])  # (E, ...) every expert
            w = full(f"param/{name}")
            if w is None:
                raise ValueError(f"checkpoint {directory}: no weights for expert parameter {name}")
            if w.shape[0] != self.n_experts:
                raise ValueError(f"checkpoint {directory}: {name} has {w.shape[0]} experts, expected "
                                 f"{self.n_experts}")
            target = masters.get(id(p), p)
            with torch.no_grad():
                target.copy_(w[lo:hi])
                if target is not p:
                    p.copy_(target)
            if self.optimizer is None:
                continue
            state = {}
            for key in ("exp_avg", "exp_avg_sq"):
                t = full(f"{key}/{name}")
                if t is not None:
                    state[key] = t[lo:hi].clone().to(target.device)
            if f"step/{name}" in handles[0].keys():
                state["step"] = handles[0].get_tensor(f"step/{name}").reshape(())
            if state:
                self.optimizer.state[target] = state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. The model's state_dict with every expert of every layer (gathered over the
        expert-parallel group); on every rank."""
        sd = {k: v.detach() for k, v in self.model.state_dict().items()}
        if self.ep_size == 1 or not self.names:
            return sd
        for name, p in zip(self.names, self.params):
            sd[name] = torch.cat(dist.all_gather(p.detach(), group=self.ep_group))  # (E, ...)
        return sd

    def unsharded_copy(self) -> nn.Module:
        """Collective. A single-device copy of the model holding every expert (for evaluation on
        one rank); the model itself is unchanged."""
        sd = self.full_state_dict()
        layers = self.model.moe_layers
        dispatchers = [m.dispatcher for m in layers]
        for m in layers:
            m.dispatcher = None  # process groups do not deep-copy
        try:
            clone = copy.deepcopy(self.model)
        finally:
            for m, d in zip(layers, dispatchers):
                m.dispatcher = d
        for name in self.names:
            path, _, attr = name.rpartition(".")
            full = nn.Parameter(sd[name].clone())
            full.expert = True
            setattr(clone.get_submodule(path), attr, full)
        return clone


def _combine(dense: torch.Tensor, expert_sq: torch.Tensor | None, scale=1.0) -> torch.Tensor:
    """sqrt(dense^2 + (scale * |experts|)^2), keeping DeepSpeed's -1 'invalid norm' sentinel. All
    device arithmetic (`scale`: the loss scale, a number or a device scalar)."""
    if expert_sq is None:
        return dense
    dense = torch.as_tensor(dense)
    e = expert_sq.to(device=dense.device, dtype=torch.float32) * scale * scale
    total = (dense.float().pow(2) + e).sqrt()
    bad = (dense < 0) | ~torch.isfinite(total)
    return torch.where(bad, torch.full_like(total, -1.0), total)


def _add_into_fp32(master: torch.Tensor, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a bf16 parameter: its gradient is added into the fp32 `.grad`
    of `master` and freed, so that the micro-steps are summed in fp32."""
    with torch.no_grad():
        if master.grad is None:
            master.grad = param.grad.to(torch.float32, copy=True)
        else:
            master.grad.add_(param.grad)
    param.grad = None


def _fp32_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The `.grad` of each tensor, zeros where backward gave none."""
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    return [t.grad for t in tensors]


def _is_bf16_optimizer(opt) -> bool:
    """DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation at ZeRO 1)."""
    if not type(opt).__module__.startswith("deepspeed."):
        return False
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(opt, BF16_Optimizer)


def _is_unfused_bf16(opt) -> bool:
    """DeepSpeed's FP16_UnfusedOptimizer holding bf16 parameters (bf16 without ZeRO)."""
    if not type(opt).__module__.startswith("deepspeed."):
        return False
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(opt, FP16_UnfusedOptimizer) and opt.low_precision_dtype == torch.bfloat16


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
        for owner, key, dtype in ((module.router, "expert_bias", torch.float32), (module, "load", torch.float64)):
            buf = owner._buffers.get(key)
            if buf is not None and buf.dtype != dtype:
                owner._buffers[key] = buf.to(dtype)
                restored.append(f"{name}.{'router.' if owner is module.router else ''}{key}")
    return restored
