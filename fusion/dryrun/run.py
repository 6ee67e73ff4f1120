"""The dry run itself: one step of a config as rank 0 of N ranks on the stand-ins, and its report."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fusion import dist
from fusion.config import Config, ConfigError, finalize
from fusion.dryrun.standins import (
    META,
    CheckedStreams,
    DryRunError,
    StandInEngine,
    SyntheticBatches,
    fake_world,
    gpu_precision,
)
from fusion.dryrun.watch import StepWatch, _dtype

GPU_GIB = 80  # an H100's memory, for the dry run's warning


@dataclass
class Report:
    config: str
    world: int
    checks: list[str] = field(default_factory=list)
    shapes: dict[str, str] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)
    host_reads: Counter = field(default_factory=Counter)
    collectives: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    plan: str = ""

    def format(self) -> str:
        lines = [f"dry run of {self.config} as rank 0 of {self.world} (meta tensors, fake process group)"]
        lines.append("checked:")
        lines += [f"  ok  {c}" for c in self.checks]
        if self.notes:
            lines.append("notes:")
            lines += [f"  -   {n}" for n in self.notes]
        lines.append("shapes (first call of each part; layer numbers folded):")
        width = max((len(k) for k in self.shapes), default=0)
        lines += [f"  {k:<{width}}  {v}" for k, v in self.shapes.items()]
        if self.kernels:
            lines.append("kernels (operand shapes):")
            lines += [f"  {k}: {v}" for k, v in self.kernels.items()]
        lines.append("host reads in one step (allowed, at boundaries):")
        lines += [f"  {n:>4} x {why}" for why, n in self.host_reads.most_common()]
        lines.append("collectives in one step:")
        lines += [f"  {n:>4} x {what}" for what, n in sorted(self.collectives.items())]
        if self.plan:
            lines.append("memory per GPU predicted by fusion-plan:")
            lines += [f"  {line}" for line in self.plan.splitlines()]
        return "\n".join(lines)


def dry_run(cfg: Config, world: int, name: str = "the config") -> Report:
    """One training step of `cfg` as rank 0 of `world` ranks on meta tensors. Returns what was
    checked; raises DryRunError (or the error the step hit) on what a GPU run would hit."""
    if world < 1:
        raise ConfigError(f"--world must be at least 1, got {world}")
    derived = finalize(cfg, world)
    report = Report(config=name, world=world)
    if cfg.model.moe.path != "fast" and cfg.model.moe.n_experts and not cfg.model.dense_baseline:
        report.notes.append(
            f"model.moe.path={cfg.model.moe.path} reads expert counts on the host in every "
            "MoE layer by design; the dry run checks the step with model.moe.path=fast"
        )
        cfg.model.moe.path = "fast"
    flex = cfg.model.attn_impl == "flex"
    if flex:
        report.notes.append(
            "model.attn_impl=flex: the whole step runs with sdpa masks on meta (FlexAttention "
            "refuses meta tensors); flex is checked in a forward on fake CUDA tensors"
        )
        cfg.model.attn_impl = "sdpa"
    tokenizer = _tokenizer(cfg, report)
    with fake_world(world):
        parts, streams, fpt = _stand_in_parts(cfg, tokenizer)
        report.checks.append(_check_parameter_dtypes(parts.model, parts.experts, gpu_precision(cfg)))
        batches = SyntheticBatches(cfg, tokenizer, parts.model, ["text", "image", "video"])
        report.notes += [f"no {why}: that modality is left out of the step" for why in batches.skipped]
        watch = StepWatch(parts.model, gpu_precision(cfg))
        try:
            with dist.recording() as (reads, collectives), watch:
                n_metrics = _step_and_boundaries(parts, batches, derived, fpt)
        finally:
            watch.remove()
        if watch.violations:
            raise DryRunError("dtype: " + "; ".join(dict.fromkeys(watch.violations)))
        _check_streams(streams, parts.model, cfg.train.grad_accum)
        report.checks += _step_checks(cfg, batches, streams, parts.experts, n_metrics)
        report.shapes = {k: v for k, v in watch.shapes.items() if k.count(".") <= 4}
        report.kernels = watch.kernels
        report.host_reads = Counter(reads)
        report.collectives = Counter(
            f"{c['op']} {c['dtype']} {c['device']} over {c['group_size']} ranks" for c in collectives
        )
    if flex:
        cfg.model.attn_impl = "flex"
        report.checks.append(_flex_forward_on_fake_cuda(cfg, tokenizer))
    _add_plan(report, cfg, world)
    return report


def _stand_in_parts(cfg: Config, tokenizer):
    """The model on meta with the GPU's kernel choices, the experts sharded, the stand-in engine,
    the guard: what the trainer builds, on the stand-ins. -> (StepParts, streams, FLOPs per token)"""
    from fusion.faults import Faults
    from fusion.guard import NonFiniteGuard
    from fusion.metrics import flops_per_token
    from fusion.model.fusion import build_model
    from fusion.model.kernels import Kernels
    from fusion.parallel import ExpertParallel
    from fusion.step import StepParts, build_optimizers

    t, compute = cfg.train, gpu_precision(cfg)
    torch.manual_seed(t.seed)
    with torch.device(META):
        model = build_model(cfg.model, tokenizer)
    model.tokenizer = tokenizer
    model.loss_average = t.loss_average  # as fusion.train.build_parts sets them
    model.decoder.checkpoint_every = t.activation_checkpointing
    fpt = flops_per_token(model, cfg)
    streams = CheckedStreams()
    model.use_kernels(Kernels(grouped_mm=True, side_stream=True, compile_flex=False), streams=streams)
    experts = ExpertParallel(model, cfg.model.moe.ep_size)
    optimizer, expert_groups = build_optimizers(model, cfg, foreach=False)
    engine = StandInEngine(
        experts.engine_module(), optimizer, compute == torch.bfloat16, t.grad_accum, t.zero_stage, t.grad_clip
    )
    experts.attach(engine, expert_groups, t.betas, t.grad_clip, t.optimizer)
    experts.restore_buffer_dtypes()  # as the trainer does after the engine's cast
    guard = NonFiniteGuard(model, [optimizer, experts.optimizer], META, streams)
    parts = StepParts(
        cfg=cfg,
        engine=engine,
        optimizer=optimizer,
        experts=experts,
        guard=guard,
        faults=Faults("", 0, model),
        distiller=None,
        model=model,
        device=META,
        bf16=compute == torch.bfloat16,
    )
    engine.train()
    return parts, streams, fpt


def _step_and_boundaries(parts, batches, derived, fpt: float) -> int:
    """The real code of a step and of its boundaries: `train_step`, the logging row and its writers,
    the checkpoint's plots and expert gather, checkpoint selection, the evaluation's reduction.
    -> the number of metrics in the row"""
    from fusion.checkpoint import choose_checkpoint
    from fusion.eval.vqa import RESULT_COLUMNS, reduce_results
    from fusion.metrics import MetricsLog, draw_plots, log_row
    from fusion.step import train_step

    stats = train_step(parts, batches, 0)
    stats.seconds = 1.0
    row = log_row(stats.reduce(), stats, 1, parts, derived, batches, fpt, None)
    if parts.cfg.model.moe.ep_size > 1 and parts.experts.names:
        parts.experts.full_state_dict()  # what a checkpoint and evaluation gather
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        log = MetricsLog(run_dir, True)
        log.log(row)  # metrics.jsonl and TensorBoard take the row
        draw_plots(run_dir, stats.load, derived.moe_layers, log)  # the checkpoint's plots
        log.close()
        choose_checkpoint("auto", run_dir, 0)
    reduce_results(dist.zeros(16, len(RESULT_COLUMNS), dtype=torch.float64))
    return len(row)


def _check_streams(streams: CheckedStreams, model: nn.Module, grad_accum: int) -> None:
    shared_layers = sum(1 for m in model.moe_layers if m.shared is not None)
    expected = 4 * shared_layers * grad_accum  # in, out; forward and backward
    if streams.handovers < expected:
        streams.violations.append(
            f"{streams.handovers} hand-overs between the main and the side "
            f"stream, {expected} expected ({shared_layers} shared expert(s) "
            f"x {grad_accum} micro-step(s) x in and out, forward and backward)"
        )
    if streams.violations:
        raise DryRunError("side stream: " + "; ".join(dict.fromkeys(streams.violations)))


def _step_checks(cfg: Config, batches, streams: CheckedStreams, experts, n_metrics: int) -> list[str]:
    t, ep = cfg.train, cfg.model.moe.ep_size > 1 and bool(experts.names)
    checks = [
        f"a step of {t.grad_accum} micro-step(s) of {t.micro_batch} x {t.seq_len} tokens "
        f"({', '.join(batches.order)} rows): forward, backward, clipping, the optimizer update",
        f"no host read inside a micro-step except those listed below; {n_metrics} metrics logged",
        f"every collective took {dist.comm_device().type} tensors (a CPU tensor would have failed)",
        f"matrix products in {_dtype(gpu_precision(cfg))} (the router in fp32 by design); "
        "no float64 under autograd",
        f"the shared experts' side stream: {streams.handovers} hand-overs, each waited for and recorded",
        "the logging row and its writers, the checkpoint's plots, checkpoint selection and its "
        "broadcast, the evaluation's reduction" + ("; the experts' gather for checkpoints" if ep else ""),
    ]
    if ep:
        checks.append(
            f"expert parallelism {cfg.model.moe.ep_size}: the all-to-all dispatcher forward "
            "and backward, the expert gradients' reduction"
        )
    return checks


def _add_plan(report: Report, cfg: Config, world: int) -> None:
    from fusion.plan import format_plan, make_plan

    plan = make_plan(cfg, world=world)
    report.plan = _plan_memory(format_plan(plan, cfg), cfg.train.zero_stage)
    row = plan["memory"]["bytes"][cfg.train.zero_stage]
    need = (row["total_ckpt"] if cfg.train.activation_checkpointing else row["total"]) / 2**30
    if need > GPU_GIB:
        report.notes.append(
            f"fusion-plan predicts {need:.0f} GiB per GPU at train.zero_stage="
            f"{cfg.train.zero_stage}: more than an {GPU_GIB} GiB GPU holds (raise "
            "model.moe.ep_size or the ZeRO stage, turn on train.activation_checkpointing, "
            "lower train.micro_batch)"
        )


def _tokenizer(cfg: Config, report: Report):
    from fusion.data.tokenizer import build_tokenizer

    spec = cfg.data.tokenizer
    if spec not in ("", "byte") and not Path(spec).is_file():
        report.notes.append(
            f"data.tokenizer {spec} is not here: the byte tokenizer stands in "
            f"(vocabulary {cfg.model.vocab_size or 'of bytes'})"
        )
        spec = cfg.data.tokenizer = "byte"
    return build_tokenizer(spec)


def _check_parameter_dtypes(model: nn.Module, experts, compute: torch.dtype) -> str:
    wrong = [f"{n} {_dtype(p.dtype)}" for n, p in model.named_parameters() if p.dtype != compute]
    if wrong:
        raise DryRunError(
            f"dtype: parameters not in {_dtype(compute)} after the engine's cast: " + ", ".join(wrong[:3])
        )
    for moe in model.moe_layers:
        if moe.router.expert_bias.dtype != torch.float32:
            raise DryRunError(
                f"dtype: the router bias is {_dtype(moe.router.expert_bias.dtype)}: its "
                "1e-3 steps vanish below bf16 resolution (keep it fp32)"
            )
        if moe.load.dtype != torch.float64:
            raise DryRunError(
                f"dtype: the expert-load counts are {_dtype(moe.load.dtype)}: counts past "
                "2^8 (bf16) or 2^24 (fp32) are not exact (keep them float64)"
            )
    masters = [m for _, m in (experts.masters or [])]
    if any(m.dtype != torch.float32 for m in masters):
        raise DryRunError("dtype: the routed experts' master weights are not fp32")
    return (
        f"parameters in {_dtype(compute)}"
        + (f", {len(masters)} fp32 expert master weights" if masters else "")
        + ("; router bias fp32 and load counts float64" if model.moe_layers else "")
    )


def _flex_forward_on_fake_cuda(cfg: Config, tokenizer) -> str:
    """A forward of the model with FlexAttention on FakeTensorMode CUDA tensors (no driver needed):
    block masks built for CUDA, the attention kernel's shape and dtype checks, the CUDA branches.
    The model is built there in the run's dtype (a module of fake tensors cannot be cast)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusion.model.fusion import build_model
    from fusion.model.kernels import Kernels

    with torch.device(META):  # the batch is made outside the fake mode, from the config's sizes
        sizes = build_model(cfg.model, tokenizer)
    batch = next(SyntheticBatches(cfg, tokenizer, sizes, ["text", "image", "video"]))
    default = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda = torch.device("cuda", 0)
        torch.set_default_dtype(gpu_precision(cfg))
        try:
            with cuda:
                model = build_model(cfg.model, tokenizer)
        finally:
            torch.set_default_dtype(default)
        model.use_kernels(
            Kernels(grouped_mm=True, side_stream=True, compile_flex=False), streams=CheckedStreams()
        )
        fake = {k: v.to(cuda) for k, v in batch.items()}
        with torch.no_grad():
            out = model(
                fake["input_ids"],
                labels=fake["labels"],
                positions=fake["positions"],
                doc_ids=fake["doc_ids"],
                sample_modality=fake["sample_modality"],
                images=fake.get("images"),
                videos=fake.get("videos"),
            )
    return (
        f"a forward with model.attn_impl=flex on fake CUDA tensors ({_dtype(gpu_precision(cfg))}, "
        f"uncompiled: no driver to compile for): loss {_dtype(out.loss.dtype)} on {out.loss.device}"
    )


def _plan_memory(text: str, stage: int) -> str:
    """fusion-plan's memory table, the configured ZeRO stage marked."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("memory per GPU")), None)
    if start is None:
        return ""
    out = []
    for line in lines[start:]:
        fields = line.split()
        mark = "   <- train.zero_stage" if fields and fields[0] == str(stage) and len(fields) > 5 else ""
        out.append(line + mark)
    return "\n".join(out)


def explain(error: BaseException) -> str:
    """One line for an error the step hit on the stand-in: what it means on a GPU, and the
    innermost line of fusion's code it came from."""
    import traceback

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "No backend type associated with device type cpu" in text:
        what = "a CPU tensor was handed to a collective (NCCL takes CUDA tensors only)"
    elif "meta" in text and any(
        k in text for k in ("item()", "Cannot copy out", "nonzero", "data-dependent", "no data", "fake impl")
    ):
        what = f"a host sync inside the step (reading a device value: {text})"
    else:
        what = f"{type(error).__name__}: {text}"
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if "/fusion/" in f.filename and "/fusion/dryrun/" not in f.filename
    ]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return what + where
