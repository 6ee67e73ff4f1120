"""Streams for the shared expert's overlap on the fast path, and the crossings between them.

Owns the side-stream interface (`Streams`), its CUDA implementation (`CudaStreams`), and the
autograd functions that hand a tensor from one stream to the other (`_ToSide`, `_FromSide`).
The fast MoE path (fusion/model/moe/fast.py) runs the shared expert on a side stream while the
main stream routes and runs the routed experts. It never calls torch.cuda itself: it asks a
streams object, installed by `FusionModel.use_kernels`. `CudaStreams` is the real one; a dry run
or a test installs a stand-in with the same five methods (tests/unit/test_streams.py records every
call). The non-finite guard (fusion/guard.py) takes the same interface.

Stream safety, following PyTorch's CUDA semantics notes ("CUDA streams", "Stream semantics of
backward passes", docs/source/notes/cuda.rst): a tensor produced on one stream and read on another
needs (1) the reader's stream to wait for the producer's (`wait`), and (2) the caching allocator
told that the reader uses its memory (`record`, i.e. `Tensor.record_stream`), or the block may be
handed out again when the tensor is freed on the producer's side while the reader still reads it.

Shape legend: the crossings are identities on any shape; the fast path sends (N, D) tensors
(N = B*T tokens, D model dim) through them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch


class Streams(Protocol):
    """What the fast path and the guard need of a stream API."""

    def current(self):
        """The stream work is queued on now."""

    def side(self):
        """The side stream of the shared expert (one per device)."""

    def wait(self, waiter, waitee) -> None:
        """Work queued on `waiter` from now on waits for what is queued on `waitee` now."""

    def use(self, stream) -> contextlib.AbstractContextManager:
        """Within the block, work is queued on `stream`."""

    def record(self, tensor: torch.Tensor, stream) -> None:
        """`tensor`'s memory is in use by `stream`: not reused before the work queued there now is done."""


class CudaStreams:
    """`Streams` on a CUDA device: the current stream, one side stream made here."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaStreams needs a CUDA device, got {self.device}")
        self._side = torch.cuda.Stream(device=self.device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def side(self):
        return self._side

    def wait(self, waiter, waitee) -> None:
        waiter.wait_stream(waitee)

    @contextlib.contextmanager
    def use(self, stream) -> Iterator[None]:
        with torch.cuda.stream(stream):
            yield

    def record(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


# ---------------------------------------------------------------------------------------------
# crossings between the streams
# ---------------------------------------------------------------------------------------------


class _Crossing(torch.autograd.Function):
    """Identity that hands a tensor from stream `src` to stream `dst`, and its gradient back.

    forward: `dst` waits for `src` (the tensor is ready) and the tensor is recorded on `dst` (its
    memory is not reused while `dst` reads it). backward: the gradient crosses the other way, so
    `src` waits for `dst` and the gradient is recorded on `src`. Autograd runs a Function's
    backward on the stream its forward ran on (PyTorch notes, "Stream semantics of backward passes").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, streams, src, dst) -> torch.Tensor:
        ctx.streams, ctx.src, ctx.dst = streams, src, dst
        streams.wait(dst, src)
        streams.record(x, dst)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.streams.wait(ctx.src, ctx.dst)
        ctx.streams.record(grad, ctx.src)
        return grad, None, None, None


class _ToSide(_Crossing):
    """The shared expert's input, main -> side; applied on the side stream (its backward runs there)."""


class _FromSide(_Crossing):
    """The shared expert's output, side -> main; applied on the main stream (its backward runs there)."""
