"""The all-to-all dispatcher: the only code that moves routed tokens between ranks.

`MoE.forward` calls an installed `ExpertDispatcher` with its routed rows sorted by global expert
id; the dispatcher carries them to the rank holding their expert, runs the local experts there,
and carries the results back. The gradient takes the same road in reverse (`_AllToAll`).

Shapes: M routed (token, expert) pairs on this rank, R rows received, D dim, E experts,
P = ep_size ranks, El = E / P local experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusion import dist


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

    def __call__(
        self,
        x_sorted: torch.Tensor,
        counts: torch.Tensor,
        run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        P, El = self.ep_size, self.n_experts // self.ep_size
        # 1. counts: row (s, l) of recv_counts = rows source s sends to my local expert l
        recv_counts = torch.empty_like(counts)  # (E,) = (P * El,)
        dist.all_to_all(recv_counts, counts, group=self.group)
        both = torch.stack([counts, recv_counts]).view(2, P, El).sum(2)  # (2, P) rows per rank
        rows = x_sorted.shape[0]
        host = dist.fetch(
            both,
            "expert parallelism: rows per rank for the all-to-all",
            stand_in=lambda: even_split(rows, P).expand(2, P),
        )
        send_splits, recv_splits = host.tolist()  # rows for each destination / from each source rank
        x_sorted = x_sorted[: sum(send_splits)]  # padding pairs stay home
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
