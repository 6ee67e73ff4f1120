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
from fusion.config import Config
from fusion.schema import MODALITIES

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

    loss_sum: torch.Tensor  # (M,) float64: summed next-token losses of labelled tokens
    loss_count: torch.Tensor  # (M,) float64: labelled tokens
    tokens: torch.Tensor  # (M,) float64: non-padding tokens of each modality's rows
    aux: torch.Tensor  # () float64: raw aux loss summed over micro-steps
    z: torch.Tensor  # () float64: raw z-loss summed over micro-steps
    load: torch.Tensor | None = None  # (L, M, E) float64: routed assignments, already summed over ranks
    micro_steps: int = 0
    steps: int = 0
    skipped: int = 0  # optimizer steps skipped by the non-finite guard
    seconds: float = 0.0
    lr: float = 0.0  # of the last step
    grad_norm: object = None  # of the last step: a device scalar, a float, or None (DeepSpeed's)

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
        packed = torch.cat(
            [self.loss_sum, self.loss_count, self.tokens, self.aux.reshape(1), self.z.reshape(1)]
        ).to(dist.comm_device())
        dist.all_reduce(packed)
        if self.load is not None:  # summed over ranks by the step already
            packed = torch.cat([packed, self.load.flatten().to(packed.device)])
        host = dist.fetch(packed, "logging: the interval's losses, tokens and router loads")
        world = dist.world()
        micro = max(self.micro_steps, 1) * world
        M = N_MOD
        return {
            "loss_sum": host[0:M],
            "loss_count": host[M : 2 * M],
            "tokens": host[2 * M : 3 * M],
            "aux": float(host[3 * M]) / micro,
            "z": float(host[3 * M + 1]) / micro,
            "load": None if self.load is None else host[3 * M + 2 :].view(self.load.shape),
        }


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
        return float(
            sum(v.detach().double().sum() for v in model.state_dict().values() if v.is_floating_point())
        )


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
        self.file.write(
            json.dumps({"step": step, "keys": keys, "skipped": skipped, "weights": weights_checksum(model)})
            + "\n"
        )
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


def log_row(
    reduced: dict, stats: StepStats, step: int, parts, derived, batches, fpt: float, peak: float | None
) -> dict:
    """The metrics.jsonl row of a logging interval (figures already reduced over ranks); `parts` is
    the step's fusion.step.StepParts (engine, guard, distiller, device)."""
    n, seconds = stats.steps, max(stats.seconds, 1e-9)
    tokens = derived.tokens_per_step * n
    count = reduced["loss_count"]
    row = {"step": step, "loss": float(reduced["loss_sum"].sum() / count.sum().clamp(min=1)), "lr": stats.lr}
    for i, name in enumerate(MODALITIES):
        if count[i] > 0:
            row[f"loss/{name}"] = float(reduced["loss_sum"][i] / count[i])
        row[f"tokens/{name}"] = round(float(reduced["tokens"][i]) / n)  # per step, all ranks
    # of every row position trained on: padding, and positions whose target carries the loss
    row["data/padding"] = 1.0 - float(reduced["tokens"].sum()) / tokens
    row["data/loss_tokens"] = float(count.sum()) / tokens
    grad_norm = stats.grad_norm
    if grad_norm is None:
        grad_norm = parts.engine.get_global_grad_norm()
    if isinstance(grad_norm, torch.Tensor):
        grad_norm = dist.fetch_float(grad_norm, "logging: grad_norm")
    row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    row["tokens_per_s"] = tokens / seconds
    row["mfu"] = (fpt * tokens / seconds / (peak * 1e12 * dist.world())) if peak else None
    if parts.device.type == "cuda":  # this rank's peak since start (fusion-plan predicts it)
        row["mem/peak_gib"] = torch.cuda.max_memory_allocated(parts.device) / 2**30
    row["aux_loss"], row["z_loss"] = reduced["aux"], reduced["z"]
    if parts.distiller is not None:
        row.update(parts.distiller.take_metrics())  # distill/kl (all ranks: it all-reduces)
    row["nonfinite_skips"] = parts.guard.total
    if reduced["load"] is not None:
        row.update(router_metrics(reduced["load"]))
    for m, share in batches.shares().items():
        row[f"data/share/{m}"] = share
        row[f"data/target/{m}"] = batches.probs[m]
    for reason, count in batches.failures().items():
        row[f"data/failed/{reason}"] = count
    return row


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(row: dict, step: int, steps: int, elapsed: float, done: int) -> str:
    """The step line: loss, learning rate, throughput, time elapsed and the estimate of what is left
    (from the steps done in this process, so a resumed run estimates from its own pace)."""
    eta = elapsed / max(done, 1) * (steps - step)
    return (
        f"step {step}/{steps} loss {row['loss']:.4f} lr {row['lr']:.2e} tok/s {row['tokens_per_s']:.0f} "
        f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
    )


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """Training FLOPs per token, the count `fusion-plan` reports (formula in fusion/plan.py):
    6 x active matmul parameters + causal attention scores (chunked layers over their chunk)."""
    from fusion.plan import flops_per_token as planned

    return planned(cfg.model, model.vocab_size, cfg.train.seq_len)


KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def host_load(run_load: torch.Tensor):
    """The expert loads summed since the start (L, 3, E), read on the host for the heatmap at a
    checkpoint boundary."""
    return dist.fetch(run_load, "checkpoint: the expert-load heatmap").numpy()


def draw_plots(run_dir: Path, run_load, layer_ids: list[int], log) -> None:
    from fusion.plots import plot_expert_load, plot_losses

    log.flush()
    plot_losses(run_dir / "metrics.jsonl", run_dir / "plots" / "loss.png")
    if run_load is not None:
        plot_expert_load(host_load(run_load), layer_ids, run_dir / "plots" / "expert_load.png")
