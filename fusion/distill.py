"""Distillation: a student trained on the usual mixture against a frozen teacher's logits.

    fusion-train --config configs/demo.yaml model.dense_baseline=true \
        distill.teacher=runs/demo distill.temperature=2 distill.weight=0.5

The loss the student backpropagates, with W = distill.weight and T = distill.temperature:

    (1 - W) * next-token loss + W * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + the student's own MoE balancing losses (unchanged)

The KL is the mean over the positions that carry a next-token label (not padding, placeholders or
prompts the data masks), computed in fp32; T^2 keeps its gradient on the scale of the next-token
loss's whatever T is (Hinton et al., 2015). The logged `loss` stays the next-token loss, so runs
with and without a teacher compare; `distill/kl` is the KL at temperature T.

The teacher is any run or checkpoint directory `fusion.load_model` reads (model.safetensors +
model.json; nothing is unpickled). It lives in the same process on the same device, in eval mode,
with gradients off, in the student's precision, and sees the student's exact inputs, media
included (early or late fusion, MoE or dense: any model with the same tokenizer and image size).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fusion.config import Config, ConfigError
from fusion.model.fusion import lm_loss_of
from fusion.schema import IGNORE


def kl_divergence(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over the masked positions of KL(softmax(teacher / T) || softmax(student / T)).
    student, teacher (B, T, V); mask (B, T) bool. A fp32 scalar (0, attached, with no position).
    Masked by multiplication, not indexing: no host sync."""
    s = (student.float() / temperature).log_softmax(-1)  # (B, T, V)
    t = (teacher.float() / temperature).log_softmax(-1)  # (B, T, V)
    per_pos = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


class Distiller:
    """The frozen teacher and the loss mixing; one per training process."""

    def __init__(
        self, teacher: torch.nn.Module, temperature: float, weight: float, loss_average: str = "token"
    ):
        self.teacher = teacher
        self.temperature = temperature
        self.weight = weight
        self.loss_average = loss_average  # the student's `train.loss_average`, to take its loss apart
        self._kl_sum: torch.Tensor | None = None  # on the device: no host read per micro-step
        self._n = 0

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        return self.teacher(
            batch["input_ids"],
            positions=batch.get("positions"),
            doc_ids=batch.get("doc_ids"),
            images=batch.get("images"),
            videos=batch.get("videos"),
        )  # (B, T, V)

    def mix(self, out, batch: dict) -> torch.Tensor:
        """The student's loss with the teacher's term mixed in. `out` is the student's ModelOutput,
        computed with return_logits=True."""
        if out.logits is None:
            raise ValueError(
                "distillation needs the student's logits: call the model with return_logits=True"
            )
        labels = batch["labels"]
        mask = labels != IGNORE
        kl = kl_divergence(out.logits, self.teacher_logits(batch), mask, self.temperature)
        # out.loss holds the next-token loss with its gradient; its detached value is out.lm_loss.
        # Recompute it with a gradient to move W of its weight onto the KL term.
        per_token = F.cross_entropy(
            out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
        )
        lm = lm_loss_of(per_token, labels, batch.get("doc_ids"), self.loss_average)  # as out.loss's
        kl_det = kl.detach().double()
        self._kl_sum = kl_det if self._kl_sum is None else self._kl_sum + kl_det
        self._n += 1
        return out.loss + self.weight * (self.temperature**2 * kl - lm)

    def take_metrics(self) -> dict:
        """{"distill/kl": mean KL over this rank's micro-steps since the last call, averaged over
        ranks}. Collective when a process group is up: call it on every rank."""
        from fusion import dist

        t = dist.zeros(2, dtype=torch.float64)
        if self._kl_sum is not None:
            t[0] = self._kl_sum.to(t.device)
        t[1] = self._n
        dist.all_reduce(t)
        self._kl_sum, self._n = None, 0
        kl_sum, n = dist.fetch(t, "logging: distill/kl").tolist()
        return {"distill/kl": kl_sum / max(n, 1.0)}


def load_teacher(path: str, student, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """fusion.load_model(path), frozen, in eval mode, checked against the student. ConfigError
    naming `distill.teacher` when it cannot serve."""
    from fusion.checkpoint import CheckpointError, load_model

    if not Path(path).exists():
        raise ConfigError(f"config key 'distill.teacher': no run or checkpoint at {path}")
    try:
        teacher = load_model(path, device)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise ConfigError(f"config key 'distill.teacher': {e}") from None
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"config key 'distill.teacher': the teacher's vocabulary has {teacher.vocab_size} "
            f"tokens, the student's {student.vocab_size}: they must share a tokenizer"
        )
    tv, sv = teacher.cfg.vision, student.cfg.vision
    if teacher.vision.tokens_per_image != student.vision.tokens_per_image or tv.img_size != sv.img_size:
        raise ConfigError(
            f"config key 'distill.teacher': the teacher reads {tv.img_size} px images as "
            f"{teacher.vision.tokens_per_image} tokens, the student {sv.img_size} px as "
            f"{student.vision.tokens_per_image}: the same batches cannot feed both"
        )
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def build_distiller(cfg: Config, student, device: torch.device, bf16: bool) -> Distiller | None:
    """The run's Distiller, or None without `distill.teacher`."""
    d = cfg.distill
    if not d.teacher:
        return None
    teacher = load_teacher(d.teacher, student, device, torch.bfloat16 if bf16 else torch.float32)
    return Distiller(teacher, d.temperature, d.weight, cfg.train.loss_average)
