"""The mixture-of-experts layer: routing, dispatch, shared expert, balancing, load statistics.

Owns `MoE`: token-choice routing (fusion/model/moe/router.py), dropless dispatch of the valid
tokens to their experts (fusion/model/moe/experts.py), the always-on shared expert, the Switch
auxiliary loss, the router z-loss, per-modality load counts kept in a module buffer, the
DeepSeek-V3 aux-loss-free bias update, and the layer's weights (`MoE.reset_parameters`, by the
rule of fusion/model/init.py). Also activation checkpointing (`run_checkpointed`), which
recomputes a block's forward during backward; the recompute is marked so that load counts are
taken once (torchtitan #1593).

The compute path (`model.moe.path`) is chosen once, when the layer is built (`PATHS`):
- loop: `sorted_forward`, the readable dispatch (valid tokens gathered, pairs sorted by expert),
  with the per-expert loop: the reference every other path is tested against.
- grouped: the same dispatch with the grouped/bmm experts.
- fast: fusion/model/moe/fast.py, no host sync, aligned groups, the shared expert on a side stream.

Single-device code: the layer makes no torch.distributed calls. Under expert parallelism
(`model.moe.ep_size` > 1) fusion/parallel/ slices `Experts` to this rank's experts and installs
`MoE.dispatcher`, which carries the routed rows to their experts' ranks and back (running
`MoE.run_experts` there). Counts are all-reduced by the trainer, which then calls
`MoE.update_bias`.

Shape legend:
    B batch, T tokens per sequence, N = B*T flattened tokens (Nv: the valid ones among them),
    D model dim, E experts, K top-k, H expert hidden width, M = Nv*K routed (token, expert) pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fusion.config import MoEConfig
from fusion.model.ffn import FeedForward
from fusion.model.init import init_feed_forward, init_linear
from fusion.model.moe import fast
from fusion.model.moe.experts import Experts
from fusion.model.moe.router import Router
from fusion.model.moe.streams import Streams
from fusion.schema import MODALITIES

# ---------------------------------------------------------------------------------------------
# the readable path (loop | grouped)
# ---------------------------------------------------------------------------------------------


def sorted_forward(
    moe: MoE, x: torch.Tensor, valid: torch.Tensor | None = None, modality: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MoE.forward` on paths "loop" and "grouped": route the valid tokens, sort their pairs by
    expert, run the experts (here or through the dispatcher), add the outputs back."""
    cfg = moe.cfg
    B, T, D = x.shape
    K = cfg.top_k
    xf = x.reshape(B * T, D)  # (N, D)

    # only valid tokens are routed (Megatron-LM #2121): padding gets no expert, no loss, no count
    if valid is None:
        tok = torch.arange(B * T, device=x.device)  # (Nv,)
        xv = xf  # (Nv, D)
    else:
        tok = valid.reshape(B * T).nonzero().squeeze(1)  # (Nv,) a host sync, like the loop/bmm experts
        xv = xf[tok]  # (Nv, D)
    n_valid = xv.shape[0]
    topk_idx, gates, logits = moe.router(xv)  # (Nv, K), (Nv, K), (Nv, E)

    # dropless dispatch: sort the Nv*K (token, expert) pairs by expert so each expert's rows
    # are contiguous; stable so tokens keep their order inside a group
    expert_of_pair = topk_idx.reshape(-1)  # (M,)
    order = expert_of_pair.argsort(stable=True)  # (M,)
    pair_token = order // K  # (M,) index into the valid tokens
    counts = torch.bincount(expert_of_pair, minlength=cfg.n_experts)  # (E,)
    pair_gate = gates.reshape(-1)[order].unsqueeze(1)  # (M, 1)

    routed_in = xv[pair_token]  # (M, D)
    if cfg.gate_on == "input":
        # Llama 4 scales the expert input, so the expert sees sigmoid(logit) * x
        routed_in = routed_in * pair_gate.to(routed_in.dtype)
    if moe.dispatcher is None:
        routed_out = moe.run_experts(routed_in, counts)  # (M, D)
    else:
        routed_out = moe.dispatcher(routed_in, counts, moe.run_experts)  # (M, D) via other ranks
    if cfg.gate_on == "output":
        routed_out = routed_out * pair_gate.to(routed_out.dtype)

    # un-permute and sum the K expert outputs of each token into its original position
    y = xf.new_zeros(B * T, D, dtype=routed_out.dtype)  # (N, D) padding rows stay 0
    y = y.index_add_(0, tok[pair_token], routed_out)
    if moe.shared is not None:
        y = y + moe.shared(xf)
    y = y.reshape(B, T, D).to(x.dtype)  # (B, T, D)

    aux = aux_loss(cfg, logits, counts, n_valid)
    z = z_loss(cfg, logits, n_valid)
    if moe.training and not moe.recomputing:
        moe.count_load(topk_idx, tok, modality)
    return y, aux, z


def aux_loss(cfg: MoEConfig, logits: torch.Tensor, counts: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e over the Nv valid tokens.
    logits (Nv, E), counts (E,)."""
    if cfg.balance != "aux" or n_valid == 0:
        return logits.sum() * 0.0  # zero, still attached to the router graph
    if cfg.score == "softmax":
        probs = logits.softmax(dim=-1)  # (Nv, E)
    else:
        s = logits.sigmoid()
        probs = s / s.sum(dim=-1, keepdim=True)  # (Nv, E)
    f = counts.float() / (n_valid * cfg.top_k)  # (E,) fraction of assignments, no gradient
    p = probs.mean(dim=0)  # (E,) mean router probability: the gradient path
    return cfg.n_experts * (f * p).sum()


def z_loss(cfg: MoEConfig, logits: torch.Tensor, n_valid: int) -> torch.Tensor:
    """ST-MoE (Zoph et al. 2022, eq. 5): mean logsumexp(logits)^2, keeps logits small. logits (Nv, E)."""
    if cfg.z_coef <= 0 or n_valid == 0:
        return logits.sum() * 0.0
    return logits.logsumexp(dim=-1).square().mean()


# ---------------------------------------------------------------------------------------------
# the compute paths
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputePath:
    """How a layer computes (`model.moe.path`), picked once in `MoE.__init__`."""

    name: str
    # the whole layer: (moe, x (B, T, D), valid, modality) -> (y (B, T, D), aux loss, z loss)
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # the experts held here on rows sorted by expert: (experts, (M, D), counts (E,)) -> (M, D)
    run_experts: Callable[[Experts, torch.Tensor, torch.Tensor], torch.Tensor]


PATHS = {
    "loop": ComputePath("loop", sorted_forward, Experts.forward_loop),
    "grouped": ComputePath("grouped", sorted_forward, Experts.forward_grouped),
    "fast": ComputePath("fast", fast.forward, fast.run_sorted),
}


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------


class Dispatcher(Protocol):
    """What expert parallelism installs as `MoE.dispatcher` (fusion/parallel/dispatch.py). Takes
    rows (M, D) sorted by global expert id, the rows of each expert (E,) (rows past their sum are
    padding and not sent) and the layer's `run_experts`, which runs on the rows this rank's experts
    receive -> the outputs of the counted rows (sum(counts), D), in the same order."""

    def __call__(
        self,
        x_sorted: torch.Tensor,
        counts: torch.Tensor,
        run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor: ...


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts (Llama 4: one shared, top-1 routed).

    forward(x (B, T, D), valid (B, T) bool | None, modality (B, T) long | None)
        -> (y (B, T, D), aux_loss, z_loss), both losses raw (unweighted) fp32 scalars over valid
        tokens; the caller multiplies by cfg.aux_coef / cfg.z_coef.

    Dropless: every valid token reaches its K experts; padding (valid False) is never dispatched.
    The `load` buffer counts routed assignments per (modality, expert) in training mode, once
    per real forward: the recompute of activation checkpointing is not counted. The compute path
    is `cfg.path` when the layer is built; changing `cfg.path` later changes nothing.

    The layer draws its own weights when it is built (`reset_parameters`); `n_layers` is the depth
    of the decoder it sits in (None: a layer on its own), which scales the shared expert's `w2`.
    """

    # the shared expert's side stream on path "fast" (fusion/model/moe/streams.py), set by
    # FusionModel.use_kernels; None: no overlap
    streams: Streams | None = None
    load: torch.Tensor  # (3, E) float64 buffer, registered in __init__

    def __init__(self, dim: int, cfg: MoEConfig, init_std: float = 0.02, n_layers: int | None = None):
        super().__init__()
        if cfg.path not in PATHS:
            raise ValueError(f"config key 'model.moe.path': {cfg.path!r} is not one of {', '.join(PATHS)}")
        self.cfg = cfg
        self.path = PATHS[cfg.path]  # the compute path, fixed for the life of the layer
        self.router = Router(dim, cfg)
        self.experts = Experts(dim, cfg)
        self.shared = FeedForward(dim, cfg.n_shared * cfg.moe_ffn_dim) if cfg.n_shared > 0 else None
        self.reset_parameters(init_std, n_layers)
        # float64: exact integer counts far past 2**24 tokens; not in checkpoints (per-step statistic)
        self.register_buffer(
            "load", torch.zeros(len(MODALITIES), cfg.n_experts, dtype=torch.float64), persistent=False
        )
        self.dispatcher: Dispatcher | None = None  # set by fusion/parallel/ under expert parallelism
        self.recomputing = False  # set while activation checkpointing re-runs this layer

    def reset_parameters(self, init_std: float, n_layers: int | None = None) -> None:
        """Draw every weight of the layer by the model's rule (fusion/model/init.py): the router's
        gate and the routed experts N(0, init_std); the shared expert as a feed-forward block, whose
        w2 writes into the residual stream."""
        init_linear(self.router.gate, init_std)
        self.experts.reset_parameters(init_std)
        if self.shared is not None:
            init_feed_forward(self.shared, init_std, n_layers)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, modality: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.path.forward(self, x, valid, modality)

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts held here on rows sorted by expert. (M, D), (E_local,) -> (M, D)"""
        return self.path.run_experts(self.experts, x_sorted, counts)

    # -- load statistics and aux-loss-free balancing -----------------------------------------

    @torch.no_grad()
    def count_load(self, topk_idx: torch.Tensor, tok: torch.Tensor, modality: torch.Tensor | None) -> None:
        """Add the assignments topk_idx (Nv, K) of the valid tokens `tok` (Nv,) to `load`."""
        expert = topk_idx.reshape(-1)  # (M,)
        if modality is None:
            row = torch.zeros_like(expert)  # all text
        else:
            row = modality.reshape(-1)[tok].repeat_interleave(self.cfg.top_k)  # (M,) pair order
        ones = torch.ones_like(expert, dtype=self.load.dtype)
        self.load.index_put_((row, expert), ones, accumulate=True)

    def take_load(self) -> torch.Tensor:
        """The counts since the last call, (3, E) float64 rows text/image/video; resets them."""
        load = self.load.clone()
        self.load.zero_()
        return load

    @torch.no_grad()
    def update_bias(self, total_load: torch.Tensor) -> None:
        """DeepSeek-V3 aux-loss-free step from (already all-reduced) per-expert counts (E,).

        Underloaded experts get +bias_rate, overloaded -bias_rate; then the mean is removed so the
        bias cannot drift as a whole (torchtitan #1506). Call once per optimizer step.
        """
        if self.cfg.balance != "bias":
            return
        bias = self.router.expert_bias
        load = total_load.to(device=bias.device, dtype=torch.float32)
        bias += self.cfg.bias_rate * torch.sign(load.mean() - load)
        bias -= bias.mean()


# ---------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _recomputing(block: nn.Module):
    layers = [m for m in block.modules() if isinstance(m, MoE)]
    for m in layers:
        m.recomputing = True
    try:
        yield
    finally:
        for m in layers:
            m.recomputing = False


def run_checkpointed(block: nn.Module, *args):
    """block(*args) without keeping its activations: they are recomputed in backward. MoE layers
    inside skip their load counts during the recompute, so router statistics count each token once
    (the aux and z losses come from the first forward, like every other output)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(
        block, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _recomputing(block))
    )
