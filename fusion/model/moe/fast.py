"""The fast MoE path (`model.moe.path: fast`): dispatch without host syncs, aligned token
groups for `torch._grouped_mm`, a memory-saving SwiGLU, the shared expert beside the routed one on
its own CUDA stream.

Owns the aligned layout and its buffers (`Layout`, `layout_pairs`, `run_rows`, `run_sorted`),
the SwiGLU autograd function, the layer's forward on this path (`forward`), the expert-parallel
dispatch of its rows (`_dispatch`), and its losses and load counts computed with masks.

What it changes against the readable path (`sorted_forward`, fusion/model/moe/layer.py), and why:

- No host-device synchronisation. Padding is not removed with `nonzero` (a sync): every token is
  routed, and the (token, expert) pairs of padding tokens go to a trash row whose input is zero
  and whose output is dropped. Counts come from `scatter_add_` (CUDA `bincount` syncs to size its
  output). Every shape depends only on B, T, K and E, so in bf16 the layer also compiles into one
  graph under `train.compile` with no graph break and no recompilation when the padding changes
  (in fp32 `_grouped_mm` cannot be compiled and a per-expert loop runs there instead).
- Aligned groups. Each expert's rows start at a multiple of ALIGN and fill a whole number of ALIGN
  rows (8 rows for bf16, as torchtitan aligns for this kernel); an expert that receives no token still
  gets ALIGN zero rows, so the kernel never sees an empty group (pytorch #152668, torchtitan #1237).
  The buffer has a fixed number of rows R = ceil((M + E * ALIGN + 1) / ALIGN) * ALIGN >= every
  possible padded total; the slack (zero rows) belongs to the last expert so that offsets end at R
  and no output row is left uninitialised (pytorch #154557). Zero rows add nothing to the output
  (silu(0) * 0 = 0) or to any weight gradient.
- Combine by gather. The rows come back in (token, k) order by gathering the destination rows, and
  the K outputs of a token are summed with a reshape: no scatter-add in the forward pass.
- SwiGLU that keeps only the gate and up projections for backward (`SwiGLU`): autograd would also
  keep silu(gate), one more (rows x H) tensor per MoE layer. Under `train.compile` the
  elementwise work fuses into one kernel.
- With a streams object (`FusionModel.use_kernels`, fusion/model/moe/streams.py; on CUDA by default)
  the shared expert runs on a side stream, overlapping the router, the permutation and the grouped
  matmuls; autograd runs its backward on that stream too. Every tensor that crosses between the
  two streams, forward and backward, passes through `_ToSide` / `_FromSide`, which make the
  reading stream wait and record the tensor on it. This module never calls torch.cuda itself.
- The router is the same module and scores in fp32; losses and load counts equal the readable
  path's (padding excluded), computed with masks instead of indexing.

Under expert parallelism (a dispatcher installed) the pairs are sorted by expert with padding
pairs last and handed to the dispatcher (fusion/parallel/), whose all-to-all needs the row
counts on the host: that one read per layer is the only host sync of the layer. The experts held
on this rank run through the aligned buffer (`run_sorted`), and the rows come back to their
(token, k) slots by one `index_copy`.

Shape legend:
    B batch, T tokens per sequence, N = B*T flattened tokens, D model dim, E experts, K top-k,
    M = N*K (token, expert) pairs, R rows of the aligned buffer, H expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusion.model.moe.experts import _DenseGrad, use_grouped_mm
from fusion.model.moe.streams import _FromSide, _ToSide

ALIGN = 8  # rows per alignment unit of a token group


# ---------------------------------------------------------------------------------------------
# SwiGLU that recomputes silu in backward
# ---------------------------------------------------------------------------------------------


class SwiGLU(torch.autograd.Function):
    """silu(a) * b, saving a and b only (not silu(a))."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = torch.ops.aten.silu_backward(grad * b, a)
        grad_b = grad * F.silu(a)
        return grad_a, grad_b


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return SwiGLU.apply(a, b)


# ---------------------------------------------------------------------------------------------
# the aligned layout
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where each routed row goes in the aligned buffer, and the group ends for `_grouped_mm`."""

    dest: torch.Tensor  # (M,) long: buffer row of each input row; padding pairs -> rows - 1
    offs: torch.Tensor  # (E,) int32: cumulative group ends, offs[-1] == rows
    counts: torch.Tensor  # (E,) long: real rows per expert
    rows: int  # R, fixed by M, E and ALIGN alone


def buffer_rows(m: int, n_experts: int, align: int = ALIGN) -> int:
    """R: room for every padded group (each <= count + align) plus one trash row, in whole units."""
    return -(-(m + n_experts * align + 1) // align) * align


def layout_pairs(
    expert: torch.Tensor, keep: torch.Tensor | None, n_experts: int, align: int = ALIGN
) -> Layout:
    """Aligned layout of rows in any order. expert (M,) long, keep (M,) bool or None (all kept).

    Rows of one expert keep their relative order (stable sort). Rows not kept all go to the last
    buffer row, which no kept row uses and which holds zeros.
    """
    M, E = expert.shape[0], n_experts
    R = buffer_rows(M, E, align)
    key = expert if keep is None else torch.where(keep, expert, E)  # (M,) dropped rows sort last
    counts_all = torch.zeros(E + 1, dtype=torch.long, device=expert.device)
    counts_all.scatter_add_(0, key, torch.ones_like(key))  # (E+1,) no host sync (bincount has one)
    counts = counts_all[:E]
    padded = ((counts + align - 1) // align * align).clamp(min=align)  # (E,) every group non-empty
    ends = padded.cumsum(0)  # (E,)
    pad_start = torch.cat([ends - padded, ends.new_full((1,), R - 1)])  # (E+1,) dropped -> trash row
    order = key.argsort(stable=True)  # (M,)
    sorted_key = key[order]
    start = counts_all.cumsum(0) - counts_all  # (E+1,) first sorted position of each key
    rank = torch.arange(M, device=expert.device) - start[sorted_key]  # (M,) position inside its group
    dest_sorted = torch.where(sorted_key < E, pad_start[sorted_key] + rank, R - 1)
    dest = torch.empty_like(dest_sorted).scatter_(0, order, dest_sorted)  # (M,) back to input order
    offs = torch.cat([ends[:-1], ends.new_full((1,), R)]).to(torch.int32)  # (E,) slack -> last expert
    return Layout(dest=dest, offs=offs, counts=counts, rows=R)


# ---------------------------------------------------------------------------------------------
# expert compute on the aligned buffer
# ---------------------------------------------------------------------------------------------


def _ragged_loop(experts, buf: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert matmuls over the aligned buffer, where `_grouped_mm` is not available."""
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        xe = buf[start:end]
        outs.append(swiglu(xe @ experts.w1[e], xe @ experts.w3[e]) @ experts.w2[e])
        start = end
    return torch.cat(outs)  # (R, D)


def run_buffer(experts, buf: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The E SwiGLU experts on the aligned buffer. (R, D) -> (R, D)."""
    # the layer's kernel choice (fusion/model/kernels.py) and a static dtype/alignment check: under
    # torch.compile, and on meta tensors, the kernel's meta function takes bf16 only, so fp32 runs
    # the loop there
    if not use_grouped_mm(buf, experts.w1, getattr(experts, "kernels", None)):
        return _ragged_loop(experts, buf, offs)
    gate = torch._grouped_mm(buf, experts.w1, offs=offs)  # (R, H)
    up = torch._grouped_mm(buf, experts.w3, offs=offs)  # (R, H)
    h = swiglu(gate, up)  # (R, H)
    return _DenseGrad.apply(torch._grouped_mm(h, experts.w2, offs=offs))  # (R, D)


class _ToBuffer(torch.autograd.Function):
    """rows (M, D) -> buffer (R, D) with buf[dest[i]] = rows[i], zeros elsewhere; backward a gather."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, dest: torch.Tensor, n_rows: int) -> torch.Tensor:
        ctx.save_for_backward(dest)
        return rows.new_zeros(n_rows, rows.shape[-1]).index_put_((dest,), rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dest,) = ctx.saved_tensors
        return grad[dest], None, None


class _FromBuffer(torch.autograd.Function):
    """buffer (R, D) -> rows (M, D) = buf[dest]; backward a plain scatter, not autograd's sorting
    scatter-add: kept rows own their slot, and only dropped rows share one (the trash row, whose
    input is zero, so what its gradient holds reaches no weight and no kept row)."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dest)
        ctx.n_rows = buf.shape[0]
        return buf[dest]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dest,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n_rows, grad.shape[-1]).index_put_((dest,), grad), None


def run_rows(experts, rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Rows in any order through their experts via the aligned buffer. (M, D) -> (M, D).
    Rows that share the trash row (rows - 1) must be zero."""
    buf = _ToBuffer.apply(rows, layout.dest, layout.rows)  # (R, D)
    return _FromBuffer.apply(run_buffer(experts, buf, layout.offs), layout.dest)  # (M, D)


def run_sorted(experts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The experts of path "fast" on rows sorted by expert, counts (E,): what the dispatcher runs
    on this rank. (M, D) -> (M, D)"""
    E, M = counts.shape[0], x_sorted.shape[0]
    expert = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=M)  # (M,)
    return run_rows(experts, x_sorted, layout_pairs(expert, None, E))


# ---------------------------------------------------------------------------------------------
# the layer's forward
# ---------------------------------------------------------------------------------------------


def overlaps_shared(moe) -> bool:
    """The shared expert runs on the side stream: the layer has one and a streams object (set by
    `FusionModel.use_kernels`), and it is not being compiled (a compiled graph has one stream)."""
    return (
        moe.shared is not None
        and not torch.compiler.is_compiling()
        and getattr(moe, "streams", None) is not None
    )


def shared_on_side(moe, xf: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Queue the shared expert on the side stream. xf (N, D) on the main stream -> (its output on
    the side stream, the main stream); `shared_to_main` hands the output back."""
    streams = moe.streams
    main, side = streams.current(), streams.side()
    with streams.use(side):
        xs = _ToSide.apply(xf, streams, main, side)  # side waits for main; xf recorded on side
        return moe.shared(xs), main  # (N, D)


def shared_to_main(moe, out: torch.Tensor, main) -> torch.Tensor:
    """The side stream's shared-expert output, usable on `main` (called on the main stream)."""
    return _FromSide.apply(out, moe.streams, moe.streams.side(), main)  # main waits; recorded on main


def forward(
    moe, x: torch.Tensor, valid: torch.Tensor | None = None, modality: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MoE.forward` on path "fast", with or without a dispatcher: the readable path's inputs,
    outputs, losses and load counts."""
    cfg = moe.cfg
    B, T, D = x.shape
    N, K, E = B * T, cfg.top_k, cfg.n_experts  # E: every expert, wherever it is held
    xf = x.reshape(N, D)  # (N, D)
    keep = None if valid is None else valid.reshape(N)  # (N,) bool

    # the shared expert sees every token (padding included, as in the readable path); with a
    # streams object it runs on the side stream, beside the router and the routed experts
    shared_out: torch.Tensor | None = None
    main: object = None  # the main stream, when the shared expert runs on the side stream
    if overlaps_shared(moe):
        shared_out, main = shared_on_side(moe, xf)  # (N, D) on the side stream
    elif moe.shared is not None:
        shared_out = moe.shared(xf)  # (N, D)

    topk_idx, gates, logits = moe.router(xf)  # (N, K) long, (N, K) fp32, (N, E) fp32
    pair_keep = None if keep is None else keep[:, None].expand(N, K).reshape(N * K)  # (M,)
    rows = xf if K == 1 else xf[:, None].expand(N, K, D).reshape(N * K, D)  # (M, D) in (token, k) order
    gate = gates.reshape(N * K, 1)  # (M, 1)
    if cfg.gate_on == "input":
        rows = rows * gate.to(rows.dtype)  # Llama 4 scales the expert input
    if pair_keep is not None:
        rows = torch.where(pair_keep[:, None], rows, 0)  # padding rows are exactly zero, even if non-finite
    if moe.dispatcher is None:
        layout = layout_pairs(topk_idx.reshape(N * K), pair_keep, E)
        out, counts = run_rows(moe.experts, rows, layout), layout.counts  # (M, D), (E,)
    else:
        out, counts = _dispatch(moe, rows, topk_idx.reshape(N * K), pair_keep)  # via other ranks
    if cfg.gate_on == "output":
        out = out * gate.to(out.dtype)
        if pair_keep is not None:
            out = torch.where(pair_keep[:, None], out, 0)
    y = out.view(N, K, D).sum(1) if K > 1 else out  # (N, D)

    if shared_out is not None:
        if main is not None:  # computed on the side stream: hand it back to the main one first
            shared_out = shared_to_main(moe, shared_out, main)
        y = y + shared_out
    y = y.reshape(B, T, D).to(x.dtype)  # (B, T, D)

    aux, z = losses(moe, logits, counts, keep)
    if moe.training and not moe.recomputing:
        count_load(moe, topk_idx, keep, modality)
    return y, aux, z


def _dispatch(
    moe, rows: torch.Tensor, expert: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (M, D) in (token, k) order through the experts of every rank of the expert-parallel
    group. Padding pairs sort after every real pair and are not sent; their output rows are 0.
    -> (out (M, D), real pairs per expert (E,))"""
    E = moe.cfg.n_experts  # global ids: the router scores every expert
    key = expert if keep is None else torch.where(keep, expert, E)  # (M,) padding sorts last
    order = key.argsort(stable=True)  # (M,)
    counts = torch.zeros(E + 1, dtype=torch.long, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))  # (E+1,) no host sync
    out_sorted = moe.dispatcher(rows[order], counts[:E], moe.run_experts)  # (Mv, D) real pairs only
    # back to (token, k) order; padding slots stay zero
    out = rows.new_zeros(rows.shape).index_copy(0, order[: out_sorted.shape[0]], out_sorted)  # (M, D)
    return out, counts[:E]


def losses(
    moe, logits: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Switch aux loss and the router z-loss over kept tokens, as the readable path's
    `aux_loss` / `z_loss` (fusion/model/moe/layer.py) but with masks instead of indexing (no sync;
    zero, still attached, when no token is kept)."""
    cfg = moe.cfg
    N = logits.shape[0]
    if keep is None:
        keep = torch.ones(N, dtype=torch.bool, device=logits.device)
    logits = torch.where(keep[:, None], logits, 0.0)  # padding logits (maybe non-finite) never enter
    n = keep.sum().to(torch.float32).clamp(min=1.0)
    zero = logits.sum() * 0.0
    if cfg.balance == "aux":
        if cfg.score == "softmax":
            probs = logits.softmax(dim=-1)  # (N, E)
        else:
            s = logits.sigmoid()
            probs = s / s.sum(dim=-1, keepdim=True)  # (N, E)
        f = counts.float() / (n * cfg.top_k)  # (E,) fraction of assignments, no gradient
        p = torch.where(keep[:, None], probs, 0.0).sum(0) / n  # (E,)
        aux = cfg.n_experts * (f * p).sum()
    else:
        aux = zero
    if cfg.z_coef > 0:
        lse = logits.logsumexp(dim=-1)  # (N,)
        z = torch.where(keep, lse.square(), 0.0).sum() / n
    else:
        z = zero
    return aux, z


@torch.no_grad()
def count_load(moe, topk_idx: torch.Tensor, keep: torch.Tensor | None, modality: torch.Tensor | None) -> None:
    """Add this forward's kept assignments to `moe.load` (modality x expert), without a sync."""
    N, K = topk_idx.shape
    expert = topk_idx.reshape(-1)  # (M,)
    row = (
        torch.zeros_like(expert) if modality is None else modality.reshape(N, 1).expand(N, K).reshape(-1)
    )  # (M,)
    ones = (
        torch.ones(N * K, dtype=moe.load.dtype, device=expert.device)
        if keep is None
        else keep.reshape(N, 1).expand(N, K).reshape(-1).to(moe.load.dtype)
    )  # (M,)
    moe.load.index_put_((row, expert), ones, accumulate=True)
