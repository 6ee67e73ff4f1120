"""The mixture-of-experts layer of the decoder, as a package.

    router.py   Router: token-choice top-k scores and gates, group-limited routing
    experts.py  Experts: stacked SwiGLU experts; the per-expert loop (the test oracle) and the
                grouped/bmm path; when `torch._grouped_mm` can run; `mark_expert` / `is_expert`,
                the marker of routed-expert weights
    fast.py     the sync-free path: aligned layout, buffers, SwiGLU, expert-parallel dispatch,
                losses and load counts with masks
    streams.py  the side-stream interface of the shared expert's overlap, CudaStreams, crossings
    layer.py    MoE: routing, dispatch, shared expert, losses, load statistics, bias update, the
                compute path picked at construction; run_checkpointed

Shape legend (every file): B batch, T tokens per sequence, N tokens, D model dim, E experts,
K top-k, H expert hidden width, M routed (token, expert) pairs.
"""

from fusion.model.moe.experts import (
    Experts,
    grouped_mm_fits,
    grouped_mm_supported,
    is_expert,
    mark_expert,
    use_grouped_mm,
)
from fusion.model.moe.layer import PATHS, ComputePath, MoE, run_checkpointed
from fusion.model.moe.router import Router
from fusion.model.moe.streams import CudaStreams, Streams

__all__ = [
    "MoE",
    "Router",
    "Experts",
    "ComputePath",
    "PATHS",
    "run_checkpointed",
    "grouped_mm_fits",
    "grouped_mm_supported",
    "use_grouped_mm",
    "CudaStreams",
    "Streams",
    "mark_expert",
    "is_expert",
]
