"""The model: embed text, encode media, splice them in at placeholder runs, run the decoder, loss.

Shapes: B batch, T tokens, D dim, V vocab, N images, M videos, F frames, P tokens per image.
Modalities are numbered TEXT=0, IMAGE=1, VIDEO=2 everywhere (data, loss, router statistics).

Early fusion: every `<|patch|>` placeholder in `input_ids` receives one vision embedding, in
order of appearance (row-major). Placeholders inside `<|video_start|> ... <|video_end|>` take
video embeddings, the others image embeddings; the counts must match exactly or `forward` raises
with both numbers. Images and videos arrive as uint8 pixels and are normalised here.

`model(input_ids)` with a LongTensor (B, T) alone returns logits (B, T, V). Given `labels` it
returns a `ModelOutput` with the total loss the trainer backpropagates and its parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import ModelConfig
from fusion.model.decoder import Attention, Decoder
from fusion.model.kernels import Kernels
from fusion.model.moe import CudaStreams, MoE, Streams
from fusion.schema import IGNORE, MODALITIES, SpecialIds, Tokenizer

if TYPE_CHECKING:
    from fusion.model.late import LateFusion


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what is backpropagated: lm + weighted balancing losses
    lm_loss: torch.Tensor  # mean next-token loss over labelled tokens of this batch
    aux_loss: torch.Tensor  # raw Switch aux loss, mean over MoE layers
    z_loss: torch.Tensor  # raw router z-loss, mean over MoE layers
    loss_sum: torch.Tensor  # (3,) summed token losses per sample modality (detached)
    loss_count: torch.Tensor  # (3,) labelled tokens per sample modality
    logits: torch.Tensor | None = None


def check_count(slots: torch.Tensor, n_feats: int, kind: str, given: bool = True) -> None:
    """The placeholders in `slots` (B, T) bool number `n_feats` (the embeddings' count, a shape,
    known on the host). On the CPU: a ValueError with both numbers. On an accelerator the count
    lives on the device and reading it would stall every step, so the device asserts it instead
    (the error names the embeddings' count; `check_count` on CPU copies of the inputs gives both)."""
    what = (
        f"{n_feats} {kind} embeddings from the vision tower"
        if given
        else f"0 {kind} embeddings (no {kind}s were given)"
    )
    if slots.device.type == "cpu":
        n_slots = int(slots.sum())
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} {kind} placeholder tokens in input_ids but {what}")
    else:
        torch._assert_async(
            slots.sum() == n_feats,
            f"the number of {kind} placeholder tokens in input_ids is not {n_feats}: {what}",
        )


def media_slots(input_ids: torch.Tensor, ids: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, T) masks of image and video placeholder positions."""
    patch = input_ids == ids.patch
    depth = (input_ids == ids.video_start).long().cumsum(1) - (input_ids == ids.video_end).long().cumsum(1)
    in_video = depth > 0
    return patch & ~in_video, patch & in_video


class FusionModel(nn.Module):
    """The early-fusion model (or, with `model.fusion=late`, its late-fusion baseline): token
    embeddings with vision embeddings spliced in at the placeholders, the decoder, the loss.
    `forward` says what goes in and what comes out."""

    pixel_mean: torch.Tensor  # (3, 1, 1) fp32 buffer, registered in __init__
    pixel_std: torch.Tensor  # (3, 1, 1) fp32 buffer, registered in __init__
    # the tokenizer of the model's vocabulary: set by fusion.build_model and fusion.load_model (and
    # the trainer), not by the constructor, which needs only the special ids
    tokenizer: Tokenizer
    # where its VQA prompts put the question, "after" the media or "before" it (`data.question`):
    # set beside the tokenizer and kept in model.json, so evaluation asks as training did
    question: str = "after"
    # how the next-token loss averages over its tokens (`train.loss_average`, see `lm_loss_of`): set
    # by the trainer; "token" (a plain mean over the loss-bearing tokens) everywhere else
    loss_average: str = "token"

    def __init__(self, cfg: ModelConfig, vocab_size: int, special: SpecialIds):
        super().__init__()
        from fusion.model.vision import VisionTower

        self.cfg = cfg
        self.vocab_size = vocab_size
        self.special = special
        self.decoder = Decoder(cfg, vocab_size)
        self.vision = VisionTower(cfg.vision, cfg.dim, cfg.init_std)
        self.register_buffer("pixel_mean", torch.tensor(cfg.vision.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.vision.std).view(3, 1, 1), persistent=False)
        # model.fusion=late: gated cross-attention blocks (fusion/model/late.py)
        self.late: LateFusion | None = None
        if cfg.fusion == "late":
            from fusion.model.late import LateFusion

            self.late = LateFusion(cfg)

    @property
    def moe_layers(self) -> list[MoE]:
        """The decoder's MoE layers, in layer order."""
        return self.decoder.moe_layers

    def use_kernels(self, kernels: Kernels, streams: Streams | None = None) -> None:
        """Hand a kernel choice (fusion/model/kernels.py `Kernels`, e.g. `Kernels.for_device(device,
        dtype)`) to every MoE layer and attention, once the model is on its device. `streams`
        (fusion/model/moe/streams.py) carries the shared experts' side stream; by default
        `CudaStreams` on the model's device when `kernels.side_stream`."""
        install_kernels(self, kernels, streams)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> normalised float in the model's dtype."""
        x = pixels.float() / 255.0
        x = (x - self.pixel_mean) / self.pixel_std
        return x.to(self.decoder.tok_embeddings.weight.dtype)

    def embed(
        self, input_ids: torch.Tensor, images: torch.Tensor | None = None, videos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with vision embeddings spliced in. -> (h (B, T, D), token_modality (B, T))"""
        h = self.decoder.tok_embeddings(input_ids)  # (B, T, D)
        img_slots, vid_slots = media_slots(input_ids, self.special)
        token_modality = img_slots.long() + 2 * vid_slots.long()  # (B, T)
        v = self.cfg.vision
        dummy = h.new_zeros(())
        if images is not None and len(images):
            feats = self.vision.encode_images(self.normalize(images))  # (N, P, D)
            h = self._splice(h, img_slots, feats.flatten(0, 1), "image")
        else:
            self._check_empty(img_slots, "image")
            if self.training:  # every vision parameter gets a (zero) gradient on every rank
                blank = h.new_zeros(1, 3, v.img_size, v.img_size)
                dummy = dummy + self.vision.encode_images(blank).sum() * 0.0
        if videos is not None and len(videos):
            feats = self.vision.encode_videos(self.normalize(videos))  # (M, F/k, P, D)
            h = self._splice(h, vid_slots, feats.flatten(0, 2), "video")
        else:
            self._check_empty(vid_slots, "video")
            if self.training:
                blank = h.new_zeros(1, v.temporal_merge, 3, v.img_size, v.img_size)
                dummy = dummy + self.vision.encode_videos(blank).sum() * 0.0
        return h + dummy.to(h.dtype), token_modality

    @staticmethod
    def _splice(h: torch.Tensor, slots: torch.Tensor, feats: torch.Tensor, kind: str) -> torch.Tensor:
        check_count(slots, feats.shape[0], kind)
        # row-major order of placeholders == order of media in the batch
        return h.masked_scatter(slots[..., None], feats.to(h.dtype))

    @staticmethod
    def _check_empty(slots: torch.Tensor, kind: str) -> None:
        check_count(slots, 0, kind, given=False)

    @overload
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        sample_modality: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        videos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        sample_modality: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        videos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> ModelOutput: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        sample_modality: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        videos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | ModelOutput:
        """Run the model on a batch of B rows of T tokens.

        input_ids: (B, T) long, token ids; every `<|patch|>` placeholder takes one vision
            embedding, in row-major order (those inside `<|video_start|> ... <|video_end|>` from
            `videos`, the others from `images`); the counts must match (`check_count`: a
            ValueError on the CPU, a device-side assert on an accelerator).
        labels: (B, T) long, the target of each position, already shifted (the id of the token
            that should come next), `fusion.schema.IGNORE` (-100) where no loss is taken; None:
            no loss.
        positions: (B, T) long, each token's position in its document; None: 0 .. T-1 per row.
        doc_ids: (B, T) long, the document of each token of a packed row, -1 on padding; attention
            stays inside a document. None: one document per row, no padding.
        sample_modality: (B, T) long, the modality (`fusion.schema.MODALITIES` index: text 0,
            image 1, video 2) of the sample each token belongs to, for the per-modality loss sums;
            None: all text.
        images: (N, 3, S, S) uint8 pixels, S = `model.vision.img_size`, one image per image
            placeholder run; None or empty: no images.
        videos: (M, F, 3, S, S) uint8 pixels, F frames (a multiple of `vision.temporal_merge`),
            one video per video placeholder run; None or empty: no videos.
        valid: (B, T) bool, the tokens the MoE layers route (padding is not routed); None:
            `doc_ids >= 0` when doc_ids is given, else every token. Late fusion takes the tokens
            to route from doc_ids alone.
        return_logits: with `labels`, also put the logits in the `ModelOutput`.

        Returns, without `labels`: the logits, (B, T, V) in the model's dtype, V = the vocabulary
        size. With `labels`: a `ModelOutput` with the loss to backpropagate (fp32 scalar: mean
        next-token loss plus the weighted router losses) and its parts.
        """
        if self.late is not None:  # the decoder reads text only; media by cross-attention
            logits, aux, z = self.late(self, input_ids, positions, doc_ids, images, videos)
        else:
            h, token_modality = self.embed(input_ids, images, videos)
            if valid is None and doc_ids is not None:
                valid = doc_ids >= 0
            logits, aux, z = self.decoder(
                h, positions=positions, doc_ids=doc_ids, valid=valid, token_modality=token_modality
            )
        if labels is None:
            return logits
        return self.loss(logits, labels, aux, z, sample_modality, return_logits, doc_ids)

    if TYPE_CHECKING:  # model(...) is forward(...), with its overloads
        __call__ = forward

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        aux: torch.Tensor,
        z: torch.Tensor,
        sample_modality: torch.Tensor | None,
        return_logits: bool,
        doc_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The batch's loss from the logits (B, T, V) and the labels (B, T); `aux`, `z` the raw
        router losses (fp32 scalars), weighted here by `model.moe`; `doc_ids` (B, T) for a
        `loss_average` other than "token"."""
        per_token = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
        )  # (B*T,)
        mask = labels.flatten() != IGNORE  # (B*T,)
        lm_loss = lm_loss_of(per_token, labels, doc_ids, self.loss_average)
        if sample_modality is None:
            sample_modality = torch.zeros_like(labels)
        # per-modality sums into fixed sizes (no boolean indexing, no bincount: no host sync);
        # ignored positions have a per-token loss of 0 and count 0
        mod = sample_modality.flatten()  # (B*T,)
        loss_sum = per_token.new_zeros(len(MODALITIES)).index_add_(0, mod, per_token.detach())
        loss_count = per_token.new_zeros(len(MODALITIES)).index_add_(0, mod, mask.to(per_token.dtype))
        moe = self.cfg.moe
        total = lm_loss + moe.z_coef * z
        if moe.balance == "aux":
            total = total + moe.aux_coef * aux
        return ModelOutput(
            loss=total,
            lm_loss=lm_loss.detach(),
            aux_loss=aux.detach(),
            z_loss=z.detach(),
            loss_sum=loss_sum,
            loss_count=loss_count,
            logits=logits if return_logits else None,
        )


LOSS_AVERAGES = ("token", "sample", "square")


def lm_loss_of(
    per_token: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None, how: str = "token"
) -> torch.Tensor:
    """The next-token loss of a batch from its per-token losses (B*T,) (0 where labels (B, T) are
    IGNORE): a weighted mean over the loss-bearing tokens, each token weighted by its document's
    count n of loss-bearing tokens (doc_ids (B, T); None: one document per row). "token": weight 1,
    every token counts the same, so a caption of 15 words outweighs a one-word VQA answer 15 to 1;
    "sample": 1 / n, every document counts the same; "square": 1 / sqrt(n), in between (InternVL 2.5's "loss
    reweighting", arXiv:2412.05271, compares the three). Never NaN: 0 without labels."""
    mask = labels.flatten() != IGNORE
    if how == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    if how not in LOSS_AVERAGES:
        raise ValueError(f"loss average {how!r} is not one of {', '.join(LOSS_AVERAGES)}")
    B, T = labels.shape
    doc = torch.zeros_like(labels) if doc_ids is None else doc_ids.clamp(min=0)  # padding: no labels
    key = (torch.arange(B, device=labels.device)[:, None] * T + doc).flatten()  # (B*T,) < B*T
    m = mask.to(per_token.dtype)
    count = per_token.new_zeros(B * T).index_add_(0, key, m)[key].clamp(min=1)  # n of each token's doc
    weight = m / (count if how == "sample" else count.sqrt())
    return (per_token * weight).sum() / weight.sum().clamp(min=1e-12)


def install_kernels(model: nn.Module, kernels: Kernels, streams: Streams | None = None) -> None:
    """Hand `kernels` to every MoE layer, decoder and attention inside `model` (a FusionModel, a
    Decoder or a single MoE layer), and the streams of the shared experts' overlap to every MoE
    layer: `streams` when given, else `CudaStreams` on the model's device when
    `kernels.side_stream`, else none (no overlap)."""
    if not isinstance(kernels, Kernels):
        raise TypeError(f"use_kernels takes a fusion.model.kernels.Kernels, got {type(kernels).__name__}")
    if streams is not None and not kernels.side_stream:
        raise ValueError("use_kernels: a streams object was given but kernels.side_stream is False")
    if kernels.side_stream and streams is None:
        streams = CudaStreams(next(model.parameters()).device)
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts.kernels = kernels
            m.streams = streams
        elif isinstance(m, (Decoder, Attention)):
            m.kernels = kernels


def build_model(cfg: ModelConfig, tokenizer: Tokenizer) -> FusionModel:
    """A model with fresh weights for `cfg`, its vocabulary `model.vocab_size` or, when that is 0,
    the tokenizer's; `model.tokenizer` is left to the caller (fusion.build_model sets it)."""
    vocab = cfg.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(
            f"config key 'model.vocab_size': {vocab} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens"
        )
    return FusionModel(cfg, vocab, SpecialIds.of(tokenizer))
