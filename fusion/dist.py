"""The one door to torch.distributed: every collective of training, checkpointing, evaluation and
expert parallelism goes through this module, and so does every read of a device value by the host.

Why a door. A backend takes tensors of one device type only: NCCL registers a backend for CUDA
tensors and none for CPU ("No backend type associated with device type cpu"), gloo (CPU runs)
takes CPU tensors. Code that makes a statistics tensor with `torch.zeros(n)` passes on CPU and
crashes at the first step on a GPU. Here the *communication device* is decided once, when the
process group comes up (`setup`): the compute device under NCCL, CPU under gloo, `meta` in a dry
run (fusion/dryrun/). Collectives refuse a tensor on any other device with a message naming it,
and `zeros` / `tensor` make tensors where collectives want them.

Host reads. Reading a device value on the host (`.item()`, `.tolist()`, `float(t)`) waits for the
device to finish everything queued before it. The training step does it only at its boundaries
(logging, checkpoints, evaluation, the optimizer step's skip decision) and where expert
parallelism needs row counts on the host to size its all-to-all. Each such read is `fetch(t, why)`
here, with its reason; in a dry run, where tensors hold no data, `fetch` returns a stand-in of the
right shape and records the reason, so the dry run can list every host sync of a step. Any other
read of a meta tensor raises: a host sync cannot hide in the dry run.

Without a process group (a single process that never called `setup`, or tests of model code),
collectives are no-ops on a world of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class _State:
    device: torch.device | None = None  # the communication device; None: not set up
    host_reads: list[str] | None = None  # reasons of `fetch` calls, while recording
    collectives: list[dict] | None = None  # collectives issued, while recording
    groups: dict = field(default_factory=dict)  # (kind, ep_size) -> this rank's process group


_STATE = _State()


# ---------------------------------------------------------------------------------------------
# the process group and the communication device
# ---------------------------------------------------------------------------------------------


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def setup(device: torch.device) -> None:
    """Record the communication device after the process group came up: `device` itself (the
    compute device) except under gloo, which takes CPU tensors."""
    device = torch.device(device)
    if initialized() and device.type not in ("cpu", "meta") and dist.get_backend() == "gloo":
        device = torch.device("cpu")
    _STATE.device = device
    _STATE.groups.clear()


def teardown() -> None:
    _STATE.device = None
    _STATE.groups.clear()


def comm_device() -> torch.device:
    """Where tensors handed to a collective must live (CPU until `setup` says otherwise)."""
    return _STATE.device if _STATE.device is not None else torch.device("cpu")


def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=comm_device())


def tensor(values, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Host values as a tensor on the communication device (one host-to-device copy)."""
    return torch.as_tensor(values, dtype=dtype).to(comm_device())


def _check(t: torch.Tensor, op: str) -> None:
    want = comm_device()
    if t.device.type != want.type:
        raise RuntimeError(
            f"{op}: a {t.device.type} tensor {tuple(t.shape)} was handed to a collective "
            f"whose backend takes {want.type} tensors (make it with fusion.dist.zeros / "
            f".to(fusion.dist.comm_device()))"
        )


def _alone(group) -> bool:
    """This rank is the whole group: a collective over it would move nothing."""
    return dist.get_world_size(group) == 1


def _record(op: str, t: torch.Tensor, group=None) -> None:
    if _STATE.collectives is not None:
        size = dist.get_world_size(group) if initialized() else 1
        _STATE.collectives.append(
            {
                "op": op,
                "shape": tuple(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "device": t.device.type,
                "group_size": size,
            }
        )


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In place over `group` (all ranks by default); returns `t`."""
    _check(t, "all_reduce")
    if initialized() and not _alone(group):
        _record("all_reduce", t, group)
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on all ranks), in rank order of `group`."""
    _check(t, "all_gather")
    if not initialized() or _alone(group):
        return [t]
    _record("all_gather", t, group)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def all_to_all(
    out: torch.Tensor,
    x: torch.Tensor,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
    group=None,
) -> torch.Tensor:
    """`all_to_all_single` (rows of `x` split by `in_splits` go to each rank of `group`)."""
    _check(x, "all_to_all")
    _check(out, "all_to_all")
    _record("all_to_all", x, group)
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def broadcast_bytes(payload: bytes | None, src: int = 0) -> bytes:
    """`payload` of rank `src` on every rank (its length first, then the bytes, each on the
    communication device). Other ranks pass None."""
    if not initialized() or world() == 1:
        return payload or b""
    me = rank() == src
    length = tensor([len(payload) if me else 0], dtype=torch.int64)
    _record("broadcast", length)
    dist.broadcast(length, src=src)
    n = len(payload) if me else int(fetch(length, "broadcast: message length")[0])
    if n == 0:
        return b""
    data = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(comm_device())
        if me
        else zeros(n, dtype=torch.uint8)
    )
    _record("broadcast", data)
    dist.broadcast(data, src=src)
    # the source already holds the bytes: only the others read the device back
    return payload if me else fetch(data, "broadcast: message").numpy().tobytes()


def barrier() -> None:
    """Every rank reaches this point. In a dry run (meta tensors, no CPU backend) a one-element
    all-reduce stands in: a real barrier would make a CPU tensor of its own."""
    if not initialized():
        return
    device = comm_device()
    if device.type == "meta":
        all_reduce(zeros(1))
    elif device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# expert-parallel groups
# ---------------------------------------------------------------------------------------------


def expert_groups(ep_size: int) -> tuple[object, object]:
    """(expert-parallel group, expert-data-parallel group) of this rank for `ep_size`.

    Ranks [0..P-1], [P..2P-1], ... each hold one copy of every expert (the expert-parallel
    groups); {r % P, r % P + P, ...} hold the same experts (the expert-data-parallel group of r).
    Every rank creates every group, as torch.distributed requires; cached per ep_size.
    """
    key = ("expert", ep_size)
    if key not in _STATE.groups:
        W, r = world(), rank()
        ep_group = ep_dp_group = None
        for start in range(0, W, ep_size):
            g = dist.new_group(list(range(start, start + ep_size)))
            if start <= r < start + ep_size:
                ep_group = g
        for first in range(ep_size):
            g = dist.new_group(list(range(first, W, ep_size)))
            if r % ep_size == first:
                ep_dp_group = g
        _STATE.groups[key] = (ep_group, ep_dp_group)
    return _STATE.groups[key]


# ---------------------------------------------------------------------------------------------
# host reads
# ---------------------------------------------------------------------------------------------


def fetch(t: torch.Tensor, why: str, stand_in: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """`t` on the host (CPU), a sync allowed for the reason `why`. A meta tensor has no values:
    the dry run gets `stand_in()` (zeros of t's shape and dtype by default) and the read is
    recorded."""
    if _STATE.host_reads is not None:
        _STATE.host_reads.append(why)
    if t.device.type == "meta":
        value = stand_in() if stand_in is not None else torch.zeros(t.shape, dtype=t.dtype)
        return value.to("cpu")
    return t.detach().cpu()


def fetch_float(t: torch.Tensor, why: str) -> float:
    return float(fetch(t, why).reshape(()))


@contextlib.contextmanager
def recording() -> Iterator[tuple[list[str], list[dict]]]:
    """Within the block, host reads (their reasons) and collectives (op, shape, dtype, device,
    group size) are appended to the two lists yielded."""
    saved = _STATE.host_reads, _STATE.collectives
    _STATE.host_reads, _STATE.collectives = [], []
    try:
        yield _STATE.host_reads, _STATE.collectives
    finally:
        _STATE.host_reads, _STATE.collectives = saved
