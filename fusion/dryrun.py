"""The GPU dry run: one training step of a config on an accelerator stand-in, on any machine.

    fusion-train --config configs/small.yaml --dry-run --world 8
    fusion-train --dry-run --world 64 model.size=llama4-scout train.seq_len=8192 model.moe.ep_size=16

It runs the real model and the real code of a step (`fusion.train.train_step`, the logging
reduction, checkpoint selection, the evaluation reduction) as rank 0 of a world of N ranks, and
fails on what a GPU run would hit. What stands in for what:

- The device: `meta` tensors (shapes, dtypes, strides; no values, no memory), so a 100-billion-
  parameter model fits a laptop. Forward, backward, the experts' all-to-all and the optimizer
  update all run on them. A host read of a meta tensor raises (`.item()`, `.tolist()`, `nonzero`,
  boolean indexing, `bincount`): a host sync cannot hide, except through `fusion.dist.fetch`, the
  step's named, allowed reads, which the report lists.
- The process group: PyTorch's fake backend registered for `meta` only, so a CPU tensor handed to
  any collective raises "No backend type associated with device type cpu", as under NCCL.
- The GPU's kernel choices (`Kernels(grouped_mm=True, side_stream=True)`): `torch._grouped_mm`'s
  meta kernel checks strides and alignment as the CUDA kernel does; the shared expert's side
  stream is `CheckedStreams`, which fails when a tensor crosses streams without a wait and a
  record, forward or backward.
- CUDA itself, for the CUDA-only branches: a forward of the model on FakeTensorMode "cuda"
  tensors with `model.attn_impl=flex` (FlexAttention refuses meta tensors; its eager path runs
  on fake CUDA tensors). Backward cannot run there: the autograd engine asks the CUDA driver for
  a context.
- DeepSpeed's engine: `StandInEngine`, the calls `train_step` makes on it, done the way ZeRO 1/2
  data parallelism does them (bf16 module, gradients all-reduced in one flat fp32 buffer over the
  communication device, clipping by the global norm). DeepSpeed itself cannot run here: building
  the engine places the module on its accelerator's device and flattens parameter data, which
  meta tensors do not have.
- dtypes: the module is cast to the run's precision (bf16 on a GPU with `train.precision=auto`)
  as DeepSpeed casts it; matrix products outside the router (fp32 by design) must run in that
  precision; no float64 op may take part in autograd; the router's bias and load buffers keep
  their own dtypes.

What it leaves to a real GPU: numerics, kernel speed and real memory use, inductor/triton code
generation (compiled FlexAttention, `train.compile`), NCCL itself (hangs, timeouts, topology),
DeepSpeed's engine (ZeRO partitioning, its bf16 optimizer, its own host syncs), the data loader
and checkpoint files. `tools/gpu_bench.sh` runs those on a GPU when one is lent.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fusion import dist
from fusion.config import Config, ConfigError, finalize

META = torch.device("meta")


class DryRunError(RuntimeError):
    """What a GPU run of the config would hit; the message names the part."""


# ---------------------------------------------------------------------------------------------
# stand-ins
# ---------------------------------------------------------------------------------------------


class CheckedStreams:
    """The streams interface of fusion/model/streams.py for tensors that live nowhere: streams are
    the names "main" and "side".

    CUDA's rule for a tensor made on one stream and read on another: the reading stream waits for
    the producing one (`wait`), and the tensor is recorded on the reading stream (`record`), so
    that the caching allocator does not hand its memory out while the reader still reads it. A
    `record` not preceded by a `wait` of the same stream on the other one is a violation; the dry
    run also counts the hand-overs against those the step must make (each MoE layer's shared
    expert: input to the side stream and output back, forward and backward).
    """

    def __init__(self):
        self.stack = ["main"]
        self.last_wait: tuple[str, str] | None = None
        self.handovers = 0
        self.violations: list[str] = []

    def current(self) -> str:
        return self.stack[-1]

    def side(self) -> str:
        return "side"

    def wait(self, waiter: str, waitee: str) -> None:
        if waiter == waitee:
            self.violations.append(f"stream {waiter} waits for itself")
        self.last_wait = (waiter, waitee)

    @contextlib.contextmanager
    def use(self, stream: str):
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    def record(self, tensor: torch.Tensor, stream: str) -> None:
        if self.last_wait is None or self.last_wait[0] != stream:
            self.violations.append(f"a tensor {tuple(tensor.shape)} handed to stream {stream} without "
                                   f"{stream} waiting for the stream that made it")
        self.last_wait = None
        self.handovers += 1


class _StandInOptimizer:
    """What train_step and fusion.parallel see of DeepSpeed's ZeRO 1/2 optimizer wrapper: the torch
    optimizer it steps (`.optimizer`), the dense gradient norm (`scaled_global_norm`, which
    ExpertParallel extends with the experts' share) and `loss_scale`."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]):
        self.optimizer = optimizer
        self.params = params
        self.loss_scale = 1.0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def scaled_global_norm(self, norm_type: int = 2) -> torch.Tensor:
        sq = [p.grad.float().pow(2).sum() for p in self.params if p.grad is not None]
        return torch.stack(sq).sum().sqrt() if sq else dist.zeros(())


class StandInEngine:
    """The DeepSpeed engine calls of `fusion.train.train_step`, done as ZeRO 1/2 does them.

    bf16: the module is cast as DeepSpeed casts it. At the accumulation boundary the dense
    gradients are all-reduced (one flat fp32 buffer on the communication device, divided by the
    world size), clipped with the global norm, and the torch optimizer steps."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, bf16: bool,
                 grad_accum: int, zero_stage: int, grad_clip: float):
        if bf16:
            module.to(torch.bfloat16)
        self.module = module
        self.params = [p for _, p in module.named_parameters() if p.requires_grad]
        self.optimizer = _StandInOptimizer(optimizer, self.params)
        self.bf16, self.grad_accum, self.zero_stage, self.grad_clip = bf16, grad_accum, zero_stage, grad_clip
        self.micro_steps = 0
        self.norm: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1).float() for g in grads])
                dist.all_reduce(flat)
                flat /= dist.world()
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            self.norm = self.optimizer.scaled_global_norm()
            if self.grad_clip > 0:
                coef = (self.grad_clip / (self.norm + 1e-6)).clamp(max=1.0)
                for g in grads:
                    g.mul_(coef.to(g.dtype))
            self.optimizer.optimizer.step()
            self.optimizer.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return self.norm

    def zero_optimization_stage(self) -> int:
        return self.zero_stage

    def bfloat16_enabled(self) -> bool:
        return self.bf16

    def fp16_enabled(self) -> bool:
        return False


class SyntheticBatches:
    """Packed micro-batches holding text, image and video rows (round robin over the modalities
    the model takes), made by the real packer from placeholder runs of the config's sizes; token
    ids are ordinary text ids, pixels are zeros (values never matter on meta)."""

    def __init__(self, cfg: Config, tokenizer, model, modalities: list[str]):
        from fusion.data.sequence import Packer, build_sample, collate

        self.collate = collate
        t, v = cfg.train, model.vision
        T = t.seq_len
        text = " ".join(["the red circle is left of the blue square."] * 8)
        groups = cfg.data.n_frames // max(cfg.model.vision.temporal_merge, 1)
        size = cfg.model.vision.img_size
        makers = {
            "text": lambda: ([text], {}),
            "image": lambda: ([("image", v.tokens_per_image), " a caption."],
                              {"images": [torch.zeros(3, size, size, dtype=torch.uint8)]}),
            "video": lambda: ([("video", groups, v.tokens_per_frame_group), " a caption."],
                              {"videos": [torch.zeros(cfg.data.n_frames, 3, size, size, dtype=torch.uint8)]}),
        }
        self.rows: dict[str, list[dict]] = {}
        self.skipped: list[str] = []
        for m in modalities:
            packer = Packer(T, tokenizer.pad_id)
            modality = ("text", "image", "video").index(m)
            while not packer.ready:
                parts, media = makers[m]()
                tokens, mask, min_pairs = build_sample(tokenizer, parts)
                if min_pairs > T:
                    self.skipped.append(f"{m}: one sample needs {min_pairs} tokens, train.seq_len is {T}")
                    break
                packer.add(tokens, modality, mask, min_pairs=min_pairs, **media)
                if m != "text":
                    packer.add(tokens, modality, mask, min_pairs=min_pairs, **media)  # fill the row
                    packer.flush()
            if packer.ready:
                self.rows[m] = packer.ready[:1]
        self.order = [m for m in modalities if m in self.rows]
        if not self.order:
            raise DryRunError("no modality fits one row of train.seq_len tokens")
        self.micro_batch = t.micro_batch
        self.next_index = 0
        self.tokens = {m: 0 for m in ("text", "image", "video")}
        self.probs = {m: 1.0 / len(self.order) for m in self.order}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.micro_batch):
            m = self.order[self.next_index % len(self.order)]
            self.next_index += 1
            rows.append(self.rows[m][0])
        return self.collate(rows)

    # what the logging row asks of the loader
    def shares(self) -> dict[str, float]:
        return dict(self.probs)

    def failures(self) -> dict[str, int]:
        return {}


# ---------------------------------------------------------------------------------------------
# watching the step
# ---------------------------------------------------------------------------------------------

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "convolution", "_convolution",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_fused_attention_overrideable", "scaled_dot_product_attention"}
FP32_BY_DESIGN = ("router",)  # module names whose matrix products run in fp32 on purpose


class _AttentionScope(TorchFunctionMode):
    """`F.scaled_dot_product_attention` as one kernel: its inputs' dtype is checked here, and the
    ops it decomposes into on meta tensors (the math reference, which upcasts bf16 to fp32 where a
    GPU runs a fused bf16 kernel) are not checked one by one."""

    def __init__(self, watch: StepWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.watch.attention(args[:3])
        self.watch.inside_attention += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.watch.inside_attention -= 1


class StepWatch(TorchDispatchMode):
    """Records, during a step: the output shape and dtype of the first call of every module kind
    (layer indices folded), the shapes of the grouped matmuls and attention kernels, and dtype
    violations: a matrix product in a dtype other than `compute` outside the router, and any
    float64 result while autograd is recording. Use as a context manager."""

    def __init__(self, model: nn.Module, compute: torch.dtype):
        super().__init__()
        self.compute = compute
        self.inside_attention = 0
        self.scope = _AttentionScope(self)
        self.stack: list[str] = []
        self.shapes: dict[str, str] = {}
        self.kernels: dict[str, str] = {}
        self.violations: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name)))

    @staticmethod
    def _kind(name: str) -> str:
        return ".".join("*" if part.isdigit() else part for part in name.split(".")) or "model"

    @staticmethod
    def in_backward() -> bool:
        """Inside autograd's backward (activation checkpointing re-runs forwards there, and may stop
        one half-way: module context is tracked in the real forward only)."""
        return torch._C._current_graph_task_id() != -1

    def _enter(self, name):
        def hook(module, args):
            if not self.in_backward():
                self.stack.append(name)
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            if self.in_backward():
                return
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            kind = self._kind(name)
            if kind not in self.shapes:
                self.shapes[kind] = _describe(output)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self):
        self.scope.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.scope.__exit__(*exc)

    def attention(self, qkv) -> None:
        if self.in_backward():  # a recompute: checked in the forward
            return
        where = self._kind(self.stack[-1]) if self.stack else "?"
        self.kernels.setdefault("scaled_dot_product_attention",
                                " x ".join(f"{tuple(t.shape)}" for t in qkv) + f" {_dtype(qkv[0].dtype)}")
        bad = [t.dtype for t in qkv if t.dtype != self.compute]
        if bad:
            self.violations.append(f"attention in {where} runs in {_dtype(bad[0])}, the GPU run computes "
                                   f"in {_dtype(self.compute)}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_attention:
            return out
        op = func._schema.name.split("::")[-1]
        forward = bool(self.stack) and not self.in_backward()
        where = self._kind(self.stack[-1]) if forward else "(backward or outside a module)"
        if op in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if op not in self.kernels and forward:  # backward shapes are the forward's transposes
                self.kernels[op] = " x ".join(f"{tuple(a.shape)}" for a in tensors[:3]) + f" {_dtype(tensors[0].dtype)}" if tensors else ""
            in_router = any(part in FP32_BY_DESIGN for part in where.split("."))
            bad = [a.dtype for a in tensors if a.dtype != self.compute]
            if bad and not (in_router and all(d == torch.float32 for d in bad)) and forward:
                self.violations.append(f"{op} in {where} runs in {_dtype(bad[0])}, the GPU run computes in "
                                       f"{_dtype(self.compute)}")
        if torch.is_grad_enabled():
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.requires_grad:
                    self.violations.append(f"{op} in {where} makes a float64 tensor that autograd "
                                           f"records (float64 runs at a fraction of GPU speed)")
        return out


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {_dtype(x.dtype)}"
    if isinstance(x, (tuple, list)):
        return ", ".join(_describe(v) for v in x if isinstance(v, (torch.Tensor, tuple, list)))
    if hasattr(x, "loss") and isinstance(getattr(x, "loss"), torch.Tensor):
        return f"loss {_describe(x.loss)}"
    return type(x).__name__


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks (this process is rank 0) with a backend for meta
    tensors only; fusion.dist's communication device is meta inside the block."""
    import torch.distributed as tdist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if tdist.is_initialized():
        raise DryRunError("a process group is already up: run the dry run in its own process")
    tdist.init_process_group(backend="meta:fake", store=FakeStore(), rank=0, world_size=world)
    dist.setup(META)
    try:
        yield
    finally:
        dist.teardown()
        tdist.destroy_process_group()


def gpu_precision(cfg: Config) -> torch.dtype:
    """The dtype a GPU run computes in: `auto` is bf16 on a bf16-capable GPU."""
    return torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16


def dry_run(cfg: Config, world: int, name: str = "the config") -> Report:
    """One training step of `cfg` as rank 0 of `world` ranks on meta tensors. Returns what was
    checked; raises DryRunError (or the error the step hit) on what a GPU run would hit."""
    from fusion.checkpoint import choose_checkpoint
    from fusion.data.tokenizer import build_tokenizer
    from fusion.faults import Faults
    from fusion.guard import NonFiniteGuard
    from fusion.model.fusion import build_model
    from fusion.model.kernels import Kernels
    from fusion.parallel import ExpertParallel
    from fusion.plan import format_plan, make_plan
    from fusion.train import StepParts, flops_per_token, host_load, log_row, param_groups, train_step

    if world < 1:
        raise ConfigError(f"--world must be at least 1, got {world}")
    derived = finalize(cfg, world)
    report = Report(config=name, world=world)
    if cfg.model.moe.path != "fast" and cfg.model.moe.n_experts and not cfg.model.dense_baseline:
        report.notes.append(f"model.moe.path={cfg.model.moe.path} reads expert counts on the host in every "
                            "MoE layer by design; the dry run checks the step with model.moe.path=fast")
        cfg.model.moe.path = "fast"
    if cfg.model.attn_impl == "flex":
        report.notes.append("model.attn_impl=flex: the whole step runs with sdpa masks on meta (FlexAttention "
                            "refuses meta tensors); flex is checked in a forward on fake CUDA tensors")
    compute = gpu_precision(cfg)
    tokenizer = _tokenizer(cfg, report)
    modalities = ["text", "image", "video"]
    fpt = 0.0
    with fake_world(world):
        torch.manual_seed(cfg.train.seed)
        flex = cfg.model.attn_impl == "flex"
        cfg.model.attn_impl = "sdpa" if flex else cfg.model.attn_impl
        with torch.device(META):
            model = build_model(cfg.model, tokenizer)
        model.tokenizer = tokenizer
        model.decoder.checkpoint_every = cfg.train.activation_checkpointing
        fpt = flops_per_token(model, cfg)
        streams = CheckedStreams()
        model.use_kernels(Kernels(grouped_mm=True, side_stream=True, compile_flex=False), streams=streams)
        t = cfg.train
        experts = ExpertParallel(model, cfg.model.moe.ep_size)
        groups = param_groups(model, t.weight_decay, cfg.model.vision.lr_scale)
        optimizer = torch.optim.AdamW([g for g in groups if g["name"] != "experts"], lr=t.lr,
                                      betas=tuple(t.betas), weight_decay=t.weight_decay, foreach=False)
        engine = StandInEngine(experts.engine_module(), optimizer, compute == torch.bfloat16,
                               t.grad_accum, t.zero_stage, t.grad_clip)
        experts.attach(engine, [g for g in groups if g["name"] == "experts"], t.betas, t.grad_clip)
        _keep_buffer_dtypes(model)
        report.checks.append(_check_parameter_dtypes(model, experts, compute))
        guard = NonFiniteGuard(model, [optimizer, experts.optimizer], META, streams)
        parts = StepParts(cfg=cfg, engine=engine, optimizer=optimizer, experts=experts, guard=guard,
                          faults=Faults("", 0, model), distiller=None, model=model, device=META,
                          bf16=compute == torch.bfloat16)
        batches = SyntheticBatches(cfg, tokenizer, model, modalities)
        for why in batches.skipped:
            report.notes.append(f"no {why}: that modality is left out of the step")
        watch = StepWatch(model, compute)
        engine.train()
        try:
            with dist.recording() as (reads, collectives), watch:
                stats = train_step(parts, batches, 0)
                stats.seconds = 1.0
                row = log_row(stats.reduce(), stats, 1, parts, derived, batches, fpt, None)
                if stats.load is not None:
                    host_load(stats.load)  # the checkpoint's expert-load heatmap
                if cfg.model.moe.ep_size > 1 and experts.names:
                    experts.full_state_dict()  # what a checkpoint and evaluation gather
                with tempfile.TemporaryDirectory() as run_dir:
                    choose_checkpoint("auto", Path(run_dir), 0)
                from fusion.eval.vqa import reduce_results
                reduce_results(dist.zeros(16, 5))
        finally:
            watch.remove()
        if watch.violations:
            raise DryRunError("dtype: " + "; ".join(dict.fromkeys(watch.violations)))
        shared_layers = sum(1 for m in model.moe_layers if m.shared is not None)
        expected = 4 * shared_layers * t.grad_accum  # in, out; forward and backward
        if streams.handovers < expected:
            streams.violations.append(f"{streams.handovers} hand-overs between the main and the side "
                                      f"stream, {expected} expected ({shared_layers} shared expert(s) "
                                      f"x {t.grad_accum} micro-step(s) x in and out, forward and backward)")
        if streams.violations:
            raise DryRunError("side stream: " + "; ".join(dict.fromkeys(streams.violations)))
        rows = batches.order
        report.checks += [
            f"a step of {t.grad_accum} micro-step(s) of {t.micro_batch} x {t.seq_len} tokens "
            f"({', '.join(rows)} rows): forward, backward, clipping, the optimizer update",
            f"no host read inside a micro-step except those listed below; {len(row)} metrics logged",
            f"every collective took {dist.comm_device().type} tensors (a CPU tensor would have failed)",
            f"matrix products in {_dtype(compute)} (the router in fp32 by design); no float64 under autograd",
            f"the shared experts' side stream: {streams.handovers} hand-overs, each waited for and recorded",
            "checkpoint selection and its broadcast; the evaluation's reduction"
            + ("; the experts' gather for checkpoints" if cfg.model.moe.ep_size > 1 and experts.names else ""),
        ]
        if cfg.model.moe.ep_size > 1 and experts.names:
            report.checks.append(f"expert parallelism {cfg.model.moe.ep_size}: the all-to-all dispatcher forward "
                                 "and backward, the expert gradients' reduction")
        report.shapes = {k: v for k, v in watch.shapes.items() if k.count(".") <= 4}
        report.kernels = watch.kernels
        report.host_reads = Counter(reads)
        report.collectives = Counter(f"{c['op']} {c['dtype']} {c['device']} over {c['group_size']} ranks"
                                     for c in collectives)
    if flex:
        cfg.model.attn_impl = "flex"
        report.checks.append(_flex_forward_on_fake_cuda(cfg, tokenizer))
    plan = make_plan(cfg, world=world)
    report.plan = _plan_memory(format_plan(plan, cfg), cfg.train.zero_stage)
    return report


def _tokenizer(cfg: Config, report: Report):
    from fusion.data.tokenizer import build_tokenizer

    spec = cfg.data.tokenizer
    if spec not in ("", "byte") and not Path(spec).is_file():
        report.notes.append(f"data.tokenizer {spec} is not here: the byte tokenizer stands in "
                            f"(vocabulary {cfg.model.vocab_size or 'of bytes'})")
        spec = cfg.data.tokenizer = "byte"
    return build_tokenizer(spec)


def _keep_buffer_dtypes(model: nn.Module) -> None:
    """What the trainer does after the engine's cast (fusion.parallel.restore_buffer_dtypes)."""
    from fusion import parallel

    restore = getattr(parallel, "restore_buffer_dtypes", None)
    if restore is not None:
        restore(model)


def _check_parameter_dtypes(model: nn.Module, experts, compute: torch.dtype) -> str:
    wrong = [f"{n} {_dtype(p.dtype)}" for n, p in model.named_parameters() if p.dtype != compute]
    if wrong:
        raise DryRunError(f"dtype: parameters not in {_dtype(compute)} after the engine's cast: "
                          + ", ".join(wrong[:3]))
    for moe in model.moe_layers:
        if moe.router.expert_bias.dtype != torch.float32:
            raise DryRunError(f"dtype: the router bias is {_dtype(moe.router.expert_bias.dtype)}: its "
                              "1e-3 steps vanish below bf16 resolution (keep it fp32)")
        if moe.load.dtype != torch.float64:
            raise DryRunError(f"dtype: the expert-load counts are {_dtype(moe.load.dtype)}: counts past "
                              "2^8 (bf16) or 2^24 (fp32) are not exact (keep them float64)")
    masters = [m for _, m in (experts.masters or [])]
    if any(m.dtype != torch.float32 for m in masters):
        raise DryRunError("dtype: the routed experts' master weights are not fp32")
    return (f"parameters in {_dtype(compute)}"
            + (f", {len(masters)} fp32 expert master weights" if masters else "")
            + ("; router bias fp32 and load counts float64" if model.moe_layers else ""))


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
        model.use_kernels(Kernels(grouped_mm=True, side_stream=True, compile_flex=False),
                          streams=CheckedStreams())
        fake = {k: v.to(cuda) for k, v in batch.items()}
        with torch.no_grad():
            out = model(fake["input_ids"], labels=fake["labels"], positions=fake["positions"],
                        doc_ids=fake["doc_ids"], sample_modality=fake["sample_modality"],
                        images=fake.get("images"), videos=fake.get("videos"))
    return (f"a forward with model.attn_impl=flex on fake CUDA tensors ({_dtype(gpu_precision(cfg))}, "
            f"uncompiled: no driver to compile for): loss {_dtype(out.loss.dtype)} on {out.loss.device}")


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
    elif "meta" in text and any(k in text for k in ("item()", "Cannot copy out", "nonzero",
                                                  "data-dependent", "no data", "fake impl")):
        what = f"a host sync inside the step (reading a device value: {text})"
    else:
        what = f"{type(error).__name__}: {text}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/fusion/" in f.filename and not f.filename.endswith("dryrun.py")]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return what + where
