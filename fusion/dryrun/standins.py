"""What stands in for the GPU, NCCL, DeepSpeed's engine and the data in a dry run (the package
docstring, fusion/dryrun/__init__.py, says what each leaves unchecked)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fusion import dist
from fusion.config import Config

META = torch.device("meta")


class DryRunError(RuntimeError):
    """What a GPU run of the config would hit; the message names the part."""


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


class CheckedStreams:
    """The streams interface of fusion/model/moe/streams.py for tensors that live nowhere: streams are
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
            self.violations.append(
                f"a tensor {tuple(tensor.shape)} handed to stream {stream} without "
                f"{stream} waiting for the stream that made it"
            )
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

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        bf16: bool,
        grad_accum: int,
        zero_stage: int,
        grad_clip: float,
    ):
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
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
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
            "image": lambda: (
                [("image", v.tokens_per_image), " a caption."],
                {"images": [torch.zeros(3, size, size, dtype=torch.uint8)]},
            ),
            "video": lambda: (
                [("video", groups, v.tokens_per_frame_group), " a caption."],
                {"videos": [torch.zeros(cfg.data.n_frames, 3, size, size, dtype=torch.uint8)]},
            ),
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
