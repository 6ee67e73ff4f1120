"""Names every part shares: the special tokens and their ids, the label that carries no loss, the
modality ids, and how many sequence tokens an image or a video becomes.

The model, the data pipeline, evaluation, distillation and the configuration's checks all read
these from here; this module imports nothing of fusion. docs/shards.md and README's "How media
become tokens" describe the token layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# The multimodal stream's markers. Order is part of the checkpoint format: append, never reorder.
SPECIAL_TOKENS = (
    "<|pad|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|video_start|>",
    "<|video_end|>",
    "<|frame_sep|>",
)

IGNORE = -100  # label value with no loss: padding, placeholders, media markers, prompts

# The modalities, in the order of `data.weights` and of every per-modality tensor (data, loss,
# router statistics, metrics): their ids are their positions.
MODALITIES = ("text", "image", "video")
TEXT, IMAGE, VIDEO = 0, 1, 2


class Tokenizer(Protocol):
    """What the model, the data pipeline and evaluation use of a tokenizer (fusion.data.tokenizer
    has two): the vocabulary size, text <-> ids, and the ids of `SPECIAL_TOKENS`."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    image_start_id: int
    image_end_id: int
    patch_id: int
    video_start_id: int
    video_end_id: int
    frame_sep_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class SpecialIds:
    """The ids the model itself needs (to find placeholder runs), detached from any tokenizer."""

    pad: int
    bos: int
    eos: int
    image_start: int
    image_end: int
    patch: int
    video_start: int
    video_end: int
    frame_sep: int

    @classmethod
    def of(cls, tok: Tokenizer) -> SpecialIds:
        """From a tokenizer's `*_id` attributes (fusion.data.tokenizer)."""
        return cls(
            tok.pad_id,
            tok.bos_id,
            tok.eos_id,
            tok.image_start_id,
            tok.image_end_id,
            tok.patch_id,
            tok.video_start_id,
            tok.video_end_id,
            tok.frame_sep_id,
        )


class VisionShape(Protocol):
    """What the token counts depend on (fusion.config's VisionConfig has these)."""

    img_size: int
    patch_size: int
    pixel_shuffle: bool
    temporal_merge: int


def tokens_per_image(v: VisionShape) -> int:
    """Placeholder tokens one image (or one video frame group) becomes: one per patch, a quarter of
    that after Llama 4's pixel shuffle (ratio 0.5)."""
    n = (v.img_size // v.patch_size) ** 2
    return n // 4 if v.pixel_shuffle else n


def frame_groups(v: VisionShape, n_frames: int) -> int:
    """Frame groups of a video: `temporal_merge` consecutive frames become one group."""
    return n_frames // v.temporal_merge


def tokens_per_video(v: VisionShape, n_frames: int) -> int:
    """Sequence tokens of a video: its groups' placeholders, a separator between groups, and the
    start and end markers."""
    groups = frame_groups(v, n_frames)
    return groups * tokens_per_image(v) + (groups - 1) + 2
