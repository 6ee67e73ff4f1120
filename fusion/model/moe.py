"""The mixture-of-experts layer: router, load balancing, routed experts, shared expert.

Owns token-choice top-k routing (Llama 4 sigmoid or softmax scoring, DeepSeek-V3 aux-loss-free
bias), dropless dispatch of tokens to experts, two expert compute paths (a readable per-expert
loop kept as the test oracle, and a grouped/batched path), the Switch auxiliary loss, the router
z-loss, and per-modality load statistics kept in module buffers.

Single-device code: the layer makes no torch.distributed calls. Under expert parallelism
(`model.moe.ep_size` > 1) fusion/parallel.py slices `Experts` to this rank's experts and installs
`MoE.dispatcher`, which carries the routed rows to their experts' ranks and back. Counts are
all-reduced by the trainer, which then calls `MoE.update_bias`.

Group-limited routing (DeepSeek-V3's node-limited routing): with `n_groups` > 1 the E experts form
n_groups contiguous groups; each token first keeps its best `topk_groups` groups, then takes its
top-k experts inside them. A group's score is the sum of its two best selection scores (logits
plus bias for sigmoid routing, probabilities plus bias for softmax) as in DeepSeek-V3, or its best
one when a group holds a single expert.

Activation checkpointing (`run_checkpointed`) recomputes a block's forward during backward; the
recompute is marked so that load counts are taken once (torchtitan #1593).

Shape legend:
    B batch, T tokens per sequence, N = B*T flattened tokens (or the valid ones among them),
    D model dim, E experts, K top-k, H expert hidden width, M = N*K routed (token, expert) pairs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import MoEConfig
from fusion.schema import MODALITIES
from fusion.model.ffn import FeedForward
from fusion.model.kernels import Kernels, default_kernels



# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Token-choice top-k router.

    sigmoid (Llama 4): top-k on the logits, gate = sigmoid(chosen logit).
    softmax: top-k on softmax probabilities, gate = chosen probability (optionally renormalised).
    With balance="bias" the persistent `expert_bias` (DeepSeek-V3, aux-loss-free) is added to the
    scores used for *choosing* only; the gate value never sees it.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_groups, self.topk_groups = cfg.n_groups, cfg.topk_groups
        self.gate = nn.Linear(dim, cfg.n_experts, bias=False)
        # fp32 whatever the model dtype: the bias moves by bias_rate (1e-3) steps, below bf16 resolution
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> top-k expert ids (N, K) long, gates (N, K) fp32, logits (N, E) fp32."""
        cfg = self.cfg
        # routing decisions are sensitive to rounding: score in fp32 (Megatron, torchtitan)
        logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        scores = logits if cfg.score == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
        choice = scores + self.expert_bias.float() if cfg.balance == "bias" else scores
        if self.n_groups > 1 and self.topk_groups < self.n_groups:
            choice = self.limit_to_groups(choice)
        topk_idx = choice.topk(cfg.top_k, dim=-1).indices  # (N, K)
        chosen = scores.gather(-1, topk_idx)  # (N, K), raw scores: the bias never enters the gate
        if cfg.score == "sigmoid":
            gates = chosen.sigmoid()
        else:
            gates = chosen
            if cfg.norm_topk:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return topk_idx, gates, logits

    def limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """(N, E) selection scores -> the same with experts outside each token's best topk_groups
        groups set to -inf (DeepSeek-V3 node-limited routing)."""
        N, E = choice.shape
        grouped = choice.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
        top = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values  # (N, G, 2)
        group_score = top.sum(-1) if self.cfg.score == "sigmoid" else top[..., 0]  # (N, G)
        keep = group_score.topk(self.topk_groups, dim=-1).indices  # (N, Gk)
        mask = torch.zeros(N, self.n_groups, dtype=torch.bool, device=choice.device)
        mask.scatter_(1, keep, True)
        return grouped.masked_fill(~mask[..., None], float("-inf")).view(N, E)  # (N, E)


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------


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
    Expert e computes (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e].
    """

    kernels: Kernels | None = None  # set by FusionModel.use_kernels; None: default_kernels of the device

    def __init__(self, dim: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        E, H = cfg.n_experts, cfg.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(E, dim, H))  # gate
        self.w3 = nn.Parameter(torch.empty(E, dim, H))  # up
        self.w2 = nn.Parameter(torch.empty(E, H, dim))  # down
        for p in (self.w1, self.w2, self.w3):
            nn.init.normal_(p, std=init_std)
            # `expert` keeps these out of the DeepSpeed engine: fusion/parallel.py shards, reduces,
            # steps and checkpoints them (dim 0 is the expert axis)
            p.expert = True
        self.impl = "auto"  # forward_grouped's kernel: "auto" | "grouped_mm" | "bmm"

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def forward_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul chain per expert. (M, D), (E,) -> (M, D)."""
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            outs.append(self._expert(x_sorted[start:start + n], e))
            start += n
        if not outs:
            # nothing routed: still run the (empty) chain so every weight gets a (zero) gradient
            return self._expert(x_sorted, 0)
        return torch.cat(outs)  # (M, D)

    def forward_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                        impl: str | None = None) -> torch.Tensor:
        """Fast path: one grouped matmul per weight, or padded bmm. (M, D), (E,) -> (M, D)."""
        impl = impl or self.impl
        if impl not in ("auto", "grouped_mm", "bmm"):
            raise ValueError(f"Experts impl must be auto, grouped_mm or bmm, got {impl!r}")
        if impl == "auto":
            impl = "grouped_mm" if use_grouped_mm(x_sorted, self.w1, self.kernels) else "bmm"
        elif impl == "grouped_mm" and not grouped_mm_fits(x_sorted, self.w1):
            raise ValueError(f"torch._grouped_mm does not support {x_sorted.dtype} on {x_sorted.device} "
                             f"with dim={x_sorted.shape[-1]}, hidden={self.w1.shape[-1]}")
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


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts (Llama 4: one shared, top-1 routed).

    forward(x (B, T, D), valid (B, T) bool | None, modality (B, T) long | None)
        -> (y (B, T, D), aux_loss, z_loss), both losses raw (unweighted) fp32 scalars over valid
        tokens; the caller multiplies by cfg.aux_coef / cfg.z_coef.

    Dropless: every valid token reaches its K experts; padding (valid False) is never dispatched.
    The `load` buffer counts routed assignments per (modality, expert) in training mode, once
    per real forward: the recompute of activation checkpointing is not counted.
    """

    # the shared expert's side stream on path "fast" (fusion/model/streams.py), set by
    # FusionModel.use_kernels; None: no overlap
    streams = None

    def __init__(self, dim: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = Experts(dim, cfg, init_std)
        self.shared = FeedForward(dim, cfg.n_shared * cfg.moe_ffn_dim) if cfg.n_shared > 0 else None
        nn.init.normal_(self.router.gate.weight, std=init_std)
        if self.shared is not None:
            for lin in (self.shared.w1, self.shared.w2, self.shared.w3):
                nn.init.normal_(lin.weight, std=init_std)
        # float64: exact integer counts far past 2**24 tokens; not in checkpoints (per-step statistic)
        self.register_buffer("load", torch.zeros(len(MODALITIES), cfg.n_experts, dtype=torch.float64),
                             persistent=False)
        self.dispatcher = None  # set by fusion/parallel.py under expert parallelism
        self.recomputing = False  # set while activation checkpointing re-runs this layer

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                modality: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.path == "fast":
            from fusion.model import grouped  # sync-free aligned dispatch

            return grouped.forward(self, x, valid, modality)
        B, T, D = x.shape
        K = cfg.top_k
        xf = x.reshape(B * T, D)  # (N, D)

        # only valid tokens are routed (Megatron-LM #2121): padding gets no expert, no loss, no count
        if valid is None:
            tok = torch.arange(B * T, device=x.device)  # (Nv,)
            xv = xf  # (Nv, D)
        else:
            tok = valid.reshape(B * T).nonzero().squeeze(1)  # (Nv,) a host sync, like the loop/bmm paths
            xv = xf[tok]  # (Nv, D)
        n_valid = xv.shape[0]
        topk_idx, gates, logits = self.router(xv)  # (Nv, K), (Nv, K), (Nv, E)

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
        if self.dispatcher is None:
            routed_out = self.run_experts(routed_in, counts)  # (M, D)
        else:
            routed_out = self.dispatcher(routed_in, counts, self.run_experts)  # (M, D) via other ranks
        if cfg.gate_on == "output":
            routed_out = routed_out * pair_gate.to(routed_out.dtype)

        # un-permute and sum the K expert outputs of each token into its original position
        y = xf.new_zeros(B * T, D, dtype=routed_out.dtype)  # (N, D) padding rows stay 0
        y = y.index_add_(0, tok[pair_token], routed_out)
        if self.shared is not None:
            y = y + self.shared(xf)
        y = y.reshape(B, T, D).to(x.dtype)  # (B, T, D)

        aux_loss = self._aux_loss(logits, counts, n_valid)
        z_loss = self._z_loss(logits, n_valid)
        if self.training and not self.recomputing:
            self._count(topk_idx, tok, modality)
        return y, aux_loss, z_loss

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts held here on rows sorted by expert. (M, D), (E_local,) -> (M, D)"""
        if self.cfg.path == "loop":
            return self.experts.forward_loop(x_sorted, counts)
        if self.cfg.path == "fast":
            from fusion.model import grouped

            return grouped.run_sorted(self.experts, x_sorted, counts)
        return self.experts.forward_grouped(x_sorted, counts)

    # -- losses ------------------------------------------------------------------------------

    def _aux_loss(self, logits: torch.Tensor, counts: torch.Tensor, n_valid: int) -> torch.Tensor:
        """Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e."""
        if self.cfg.balance != "aux" or n_valid == 0:
            return logits.sum() * 0.0  # zero, still attached to the router graph
        if self.cfg.score == "softmax":
            probs = logits.softmax(dim=-1)  # (Nv, E)
        else:
            s = logits.sigmoid()
            probs = s / s.sum(dim=-1, keepdim=True)  # (Nv, E)
        f = counts.float() / (n_valid * self.cfg.top_k)  # (E,) fraction of assignments, no gradient
        p = probs.mean(dim=0)  # (E,) mean router probability: the gradient path
        return self.cfg.n_experts * (f * p).sum()

    def _z_loss(self, logits: torch.Tensor, n_valid: int) -> torch.Tensor:
        """ST-MoE (Zoph et al. 2022, eq. 5): mean logsumexp(logits)^2, keeps logits small."""
        if self.cfg.z_coef <= 0 or n_valid == 0:
            return logits.sum() * 0.0
        return logits.logsumexp(dim=-1).square().mean()

    # -- load statistics and aux-loss-free balancing -----------------------------------------

    @torch.no_grad()
    def _count(self, topk_idx: torch.Tensor, tok: torch.Tensor, modality: torch.Tensor | None) -> None:
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

    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recomputing(block)))
