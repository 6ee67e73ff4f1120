"""A VQA set's questions: a VQA shard sample (media + .json {question, answer, choices, type};
docs/shards.md) becomes a `Question` with its media decoded and its placeholder run, through the
training code's own sample maker, so evaluation sees exactly what training saw."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


class EvalError(ValueError):
    """Bad input, reported by the CLI as one line."""


@dataclass
class Question:
    key: str
    question: str
    answer: str
    choices: list[str]
    type: str
    part: tuple  # ("image", n_tokens) or ("video", n_groups, n_tokens): the media run
    pixels: torch.Tensor  # uint8 (3, S, S) image or (F, 3, S, S) video frames
    modality: int  # 1 image, 2 video
    where: str = "after"  # the question "after" the media or "before" it (`data.question`)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.choices)


def make_sample_maker(model, n_frames: int, counter=None):
    """A `SampleMaker` for evaluation: the model's own vision config, deterministic media
    (centre crop, `segment_middle` frames)."""
    from fusion.config import Config, ConfigError, validate
    from fusion.data.samples import SampleMaker

    cfg = Config()
    cfg.model = model.cfg
    cfg.data.n_frames = n_frames
    cfg.data.frame_strategy = "segment_middle"
    cfg.data.question = getattr(model, "question", "after")  # as the model was trained to be asked
    try:
        validate(cfg)
    except ConfigError as e:
        raise EvalError(f"--n-frames {n_frames}: {e}") from None
    return SampleMaker(cfg, model.tokenizer, train=False, counter=counter)


def make_question(raw: dict, maker) -> Question | None:
    """A raw VQA shard sample -> Question, or None (the reason goes to `maker.counter`)."""
    from fusion.data.samples import IMAGE_EXTS
    from fusion.data.shards import SampleError, vqa_type
    from fusion.data.tar import decode_json

    def skip(reason):
        if maker.counter is not None:
            maker.counter(reason, key)
        return None

    key = raw.get("__key__", "")
    if "json" not in raw:
        return skip("missing_json")
    try:
        meta = decode_json(raw["json"])
    except SampleError as e:
        return skip(e)
    choices = meta.get("choices") if isinstance(meta, dict) else None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("question"), str)
        or "answer" not in meta
        or not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, (str, int, float)) for c in choices)
    ):
        return skip("bad_vqa_json")
    choices = [str(c).strip() for c in choices]
    answer = str(meta["answer"]).strip()
    if answer not in choices:
        return skip("answer_not_in_choices")
    rng = random.Random(f"{maker.cfg.train.seed}-{key}")  # as SampleMaker.__call__ seeds it
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is not None:
        media = maker.image(raw[ext], rng)
    elif "mp4" in raw:
        media = maker.video(raw["mp4"], meta, rng)
    else:
        return skip("missing_media")
    if media is None:  # counted by the maker
        return None
    part, pixels, modality = media
    return Question(
        key=key,
        question=meta["question"].strip(),
        answer=answer,
        choices=choices,
        type=vqa_type(meta.get("type")),
        part=part,
        pixels=torch.as_tensor(pixels),
        modality=modality,
        where=maker.cfg.data.question,
    )


def iter_questions(vqa_dir: str | Path, maker) -> Iterator[Question]:
    """Usable questions of a VQA set, in shard order; the others are counted in `maker.counter`."""
    from fusion.data.tar import iter_samples

    for raw in iter_samples(set_shards(vqa_dir), maker.counter):
        q = make_question(raw, maker)
        if q is not None:
            yield q


def set_shards(vqa_dir: str | Path) -> list[str]:
    from fusion.data.shards import list_shards

    path = Path(vqa_dir)
    if not path.is_dir():
        raise EvalError(f"--vqa {vqa_dir}: no such directory")
    try:
        return list_shards(str(path))
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"--vqa {vqa_dir}: {e}") from None


def set_size(vqa_dir: str | Path) -> int | None:
    """n_samples from the set's index.json, if it has a readable one (for the progress bar)."""
    from fusion.data.shards import read_index

    try:
        index = read_index(vqa_dir)
    except ValueError:
        return None
    n = index.get("n_samples") if index else None
    return n if isinstance(n, int) else None


@dataclass
class Shown:
    """A question kept for the picture of examples."""

    question: Question
    prediction: str
    correct: bool


def set_name(vqa_dir: str | Path) -> str:
    """SET: the VQA directory's name as the user wrote it (a symlink keeps its own name), trailing
    slashes ignored; `.` or `..` name the directory they stand for."""
    name = Path(vqa_dir).name
    return name if name not in ("", ".", "..") else Path(vqa_dir).resolve().name
