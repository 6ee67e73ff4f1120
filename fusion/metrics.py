"""What a run records: the step statistics (`StepStats`, on the compute device, reduced over
ranks once per logging interval), metrics.jsonl and TensorBoard (rank 0), the per-rank debug log,
and the router metrics of a logging interval."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion import dist
from fusion.config import MODALITIES

N_MOD = len(MODALITIES)


@dataclass
class StepStats:
    """Sums over the micro-steps of one or more optimizer steps, on the compute device.

    A micro-step adds to them with device operations only (no host read); `reduce` sums them over
    ranks with one all-reduce and reads them once, at a logging boundary. Host-side counts
    (`steps`, `micro_steps`, `seconds`, `skipped`) are this rank's own; equal on every rank but
    `seconds`.

    Shapes: M modalities (text, image, video), L MoE layers, E experts.
    """

    loss_sum: torch.Tensor        # (M,) float64: summed next-token losses of labelled tokens
    loss_count: torch.Tensor      # (M,) float64: labelled tokens
    tokens: torch.Tensor          # (M,) float64: non-padding tokens of each modality's rows
    aux: torch.Tensor             # () float64: raw aux loss summed over micro-steps
    z: torch.Tensor               # () float64: raw z-loss summed over micro-steps
    load: torch.Tensor | None = None  # (L, M, E) float64: routed assignments, already summed over ranks
    micro_steps: int = 0
    steps: int = 0
    skipped: int = 0              # optimizer steps skipped by the non-finite guard
    seconds: float = 0.0
    lr: float = 0.0               # of the last step
    grad_norm: object = None      # of the last step: a device scalar, a float, or None (DeepSpeed's)

    @classmethod
    def zeros(cls, device: torch.device) -> StepStats:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(loss_sum=z(N_MOD), loss_count=z(N_MOD), tokens=z(N_MOD), aux=z(()), z=z(()))

    @torch.no_grad()
    def add_micro(self, out, batch: dict) -> None:
        """One micro-step's model output (fusion.model.fusion.ModelOutput) and its batch."""
        self.loss_sum += out.loss_sum.to(torch.float64)
        self.loss_count += out.loss_count.to(torch.float64)
        real = (batch["doc_ids"] >= 0).flatten().to(torch.float64)  # padding has doc id -1
        self.tokens.index_add_(0, batch["sample_modality"].flatten(), real)
        self.aux += out.aux_loss.to(torch.float64)
        self.z += out.z_loss.to(torch.float64)
        self.micro_steps += 1

    @torch.no_grad()
    def merge(self, other: StepStats) -> StepStats:
        """`self` + `other` (the steps of one logging interval), in place; returns self."""
        for name in ("loss_sum", "loss_count", "tokens", "aux", "z"):
            getattr(self, name).add_(getattr(other, name))
        if other.load is not None:
            self.load = other.load.clone() if self.load is None else self.load + other.load
        self.micro_steps += other.micro_steps
        self.steps += other.steps
        self.skipped += other.skipped
        self.seconds += other.seconds
        self.lr, self.grad_norm = other.lr, other.grad_norm
        return self

    def reduce(self) -> dict:
        """Collective: the interval's figures summed over ranks, on the host. One all-reduce and
        one host read (a logging boundary). -> {loss_sum, loss_count, tokens: (M,) tensors,
        aux, z: means per micro-step, load: (L, M, E) or None}"""
        packed = torch.cat([self.loss_sum, self.loss_count, self.tokens, self.aux.reshape(1),
                            self.z.reshape(1)]).to(dist.comm_device())
        dist.all_reduce(packed)
        if self.load is not None:  # summed over ranks by the step already
            packed = torch.cat([packed, self.load.flatten().to(packed.device)])
        host = dist.fetch(packed, "logging: the interval's losses, tokens and router loads")
        world = dist.world()
        micro = max(self.micro_steps, 1) * world
        M = N_MOD
        return {"loss_sum": host[0:M], "loss_count": host[M:2 * M], "tokens": host[2 * M:3 * M],
                "aux": float(host[3 * M]) / micro, "z": float(host[3 * M + 1]) / micro,
                "load": None if self.load is None else host[3 * M + 2:].view(self.load.shape)}


def router_metrics(load: torch.Tensor) -> dict:
    """load (L, 3, E) routed assignments of one step, summed over ranks.
    max_load: the largest expert load over the mean load of its layer; dead: experts with none."""
    out = {}
    per_expert = load.sum(1)  # (L, E)
    mean = per_expert.mean(1, keepdim=True).clamp(min=1e-9)
    out["router/max_load"] = float((per_expert / mean).max())
    out["router/dead_experts"] = int((per_expert == 0).sum())
    for i, name in enumerate(MODALITIES):
        mod = load[:, i]  # (L, E)
        if mod.sum() > 0:
            mod_mean = mod.mean(1, keepdim=True).clamp(min=1e-9)
            out[f"router/max_load/{name}"] = float((mod / mod_mean).max())
    return out


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter and buffer of this rank's model, in float64 (equal on every rank of
    a data-parallel run; unchanged by a skipped step)."""
    with torch.no_grad():
        return float(sum(v.detach().double().sum() for v in model.state_dict().values()
                         if v.is_floating_point()))


class DebugLog:
    """`train.debug_log`: RUN/debug/rank{r}.jsonl, one line per step with the keys of the samples
    this rank consumed and a checksum of its weights (for checking exact resume and that the ranks
    agree). A resumed run appends: for a step written twice, the last line is the one that counts."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.file = None
        if enabled:
            (run_dir / "debug").mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "debug" / f"rank{rank}.jsonl", "a")

    def log(self, step: int, keys: list[str], model: torch.nn.Module, skipped: bool) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "keys": keys, "skipped": skipped,
                                    "weights": weights_checksum(model)}) + "\n")
        self.file.flush()


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0; nothing elsewhere.

    A run that starts at `start_step` (0, or the step it resumed from) repeats the steps after it,
    so rows logged past it by an earlier attempt move to metrics.replaced.jsonl (appended; nothing
    is lost) and TensorBoard purges its events past it: metrics.jsonl keeps one row per step.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / "metrics.jsonl"
        if path.is_file():
            keep, replaced = [], []
            for line in path.read_text().splitlines(keepends=True):
                try:
                    row_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    row_step = None  # a line cut short by a crash
                (keep if isinstance(row_step, int) and row_step <= start_step else replaced).append(line)
            if replaced:
                with open(run_dir / "metrics.replaced.jsonl", "a") as out:
                    out.writelines(l if l.endswith("\n") else l + "\n" for l in replaced)
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(keep))
                os.replace(tmp, path)
        self.file = open(path, "a")
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(key, value, row["step"])

    def flush(self) -> None:
        if self.enabled:
            self.file.flush()
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
