"""The checks `fusion-data verify` runs: each sample of a shard against the contract of its kind
(docs/shards.md, "Members per modality"), images and videos decoded completely, and a shard's
sample count and size against its stats file.

    check_sample(sample, modality) -> [reason, ...]   [] when the sample is fine
    verify_shard(path, modality) -> ShardReport       every sample of one shard, read to its end

`modality` is the kind of shard, one of `fusion.data.shards.SHARD_KINDS` (text, image, video, vqa),
as index.json names it.

Images are opened as the builders and the loader open them (`fusion.data.images.open_image`), so
a picture fails here for the reason it would fail anywhere; videos are decoded by
`fusion.data.video.probe`. The command itself (directory, workers, report, index.json) is
`fusion.data.build.report`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fusion.data.images import DEFAULT_MAX_PIXELS, open_image
from fusion.data.shards import (
    IMAGE_EXTS,
    SHARD_KINDS,
    VIDEO_EXTS,
    VIDEO_FAILURES,
    ErrorCounter,
    SampleError,
    is_valid_key,
    missing,
    read_shard_stats,
)
from fusion.data.tar import decode_json, decode_text, iter_samples
from fusion.data.video import VideoDecodeError, probe

# ---------------------------------------------------------------- one member


def _check_image(data: bytes, max_pixels: int | None) -> tuple[str | None, tuple[int, int] | None]:
    """(reason or None, (width, height) of the decoded upright image)."""
    try:
        img = open_image(data, max_pixels or DEFAULT_MAX_PIXELS)
    except SampleError as exn:
        return exn.reason, None
    return None, img.size


def _check_video(data: bytes) -> tuple[str | None, int | None]:
    """(reason or None, decoded frame count): PyAV decodes every frame (decord, which counts from
    the container, only when PyAV is not installed)."""
    backend = "pyav" if importlib.util.find_spec("av") else "auto"
    try:
        meta = probe(data, backend=backend)
    except VideoDecodeError as exn:
        return VIDEO_FAILURES[exn.reason], None
    return None, meta.n_frames


def _check_json_object(sample: Mapping[str, Any]) -> tuple[str | None, dict | None]:
    if "json" not in sample:
        return "missing_json", None
    try:
        meta = decode_json(sample["json"])
    except SampleError as exn:
        return exn.reason, None
    if not isinstance(meta, dict):
        return "bad_json", None
    return None, meta


def _text_problems(sample: Mapping[str, Any]) -> list[str]:
    """A `.txt` member that is there and UTF-8."""
    if "txt" not in sample:
        return [missing(sample, "txt", "missing_txt")]
    try:
        decode_text(sample["txt"])
    except SampleError as exn:
        return [exn.reason]
    return []


def _media_problems(
    sample: Mapping[str, Any], allow_image: bool, allow_video: bool, max_pixels: int | None
) -> tuple[list[str], dict]:
    """Check the media member: (problems, what was measured: {width, height} or {n_frames})."""
    images = [e for e in IMAGE_EXTS if e in sample] if allow_image else []
    videos = [e for e in VIDEO_EXTS if e in sample] if allow_video else []
    if images:
        reason, size = _check_image(sample[images[0]], max_pixels)
        return [reason] if reason else [], {"width": size[0], "height": size[1]} if size else {}
    if videos:
        reason, n_frames = _check_video(sample[videos[0]])
        return [reason] if reason else [], {"n_frames": n_frames} if n_frames is not None else {}
    wanted = (IMAGE_EXTS if allow_image else ()) + (VIDEO_EXTS if allow_video else ())
    reason = {(True, False): "missing_image", (False, True): "missing_mp4"}.get(
        (allow_image, allow_video), "missing_media"
    )
    return [missing(sample, wanted, reason)], {}


def _meta_problems(sample: Mapping[str, Any], modality: str, measured: dict) -> list[str]:
    """The `.json` object of an image, video or vqa sample: a VQA question whose answer is one of
    its choices, and the size or frame count the media really has."""
    reason, meta = _check_json_object(sample)
    if reason:
        return [reason]
    problems = []
    if modality == "vqa":
        if not all(k in meta for k in ("question", "answer", "choices")) or not isinstance(
            meta["choices"], list
        ):
            return ["bad_vqa_json"]
        if meta["answer"] not in meta["choices"]:
            problems.append("answer_not_in_choices")
    if any(k in meta and meta[k] != v for k, v in measured.items()):
        problems.append("n_frames_mismatch" if "n_frames" in measured else "size_mismatch")
    return problems


# ---------------------------------------------------------------- one sample


def guess_modality(sample: Mapping[str, Any]) -> str | None:
    """The kind of shard (one of SHARD_KINDS) a raw sample's members suggest, or None."""
    has_image = any(e in sample for e in IMAGE_EXTS)
    has_video = any(e in sample for e in VIDEO_EXTS)
    if has_image or has_video:
        if "txt" not in sample and "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = None
            if isinstance(meta, dict) and "question" in meta:
                return "vqa"
        return "video" if has_video else "image"
    if "txt" in sample:
        return "text"
    return None


def check_sample(sample: Mapping[str, Any], modality: str, max_pixels: int | None = None) -> list[str]:
    """Reasons a raw sample breaks the shard contract for `modality`, one of SHARD_KINDS ([] when
    it is fine).

    text: `.txt` UTF-8, `.json` (if any) parses.
    image: an image member that decodes fully (`images.open_image`, at most `max_pixels`, default
    `images.DEFAULT_MAX_PIXELS`: reasons bad_image, too_many_pixels, unsupported_format,
    empty_file), `.txt` UTF-8, `.json` object whose width/height (when present) are the decoded
    size (`size_mismatch`).
    video: `.mp4` that decodes to at least one frame (PyAV decodes all of them: empty_file,
    corrupt_video, no_video_stream, zero_frames), `.txt`, `.json` object whose n_frames (when
    present) is the decoded count (`n_frames_mismatch`).
    vqa: an image or `.mp4` checked the same way, `.json` object with question, answer and a list
    of choices (`bad_vqa_json`) holding the answer (`answer_not_in_choices`).
    """
    if modality not in SHARD_KINDS:
        raise ValueError(f"unknown modality {modality!r} (one of {', '.join(SHARD_KINDS)})")
    problems = [] if is_valid_key(sample.get("__key__", "")) else ["bad_key"]
    if modality == "text":
        problems += _text_problems(sample)
        if "json" in sample:
            try:
                decode_json(sample["json"])
            except SampleError as exn:
                problems.append(exn.reason)
        return problems
    media, measured = _media_problems(sample, modality != "video", modality != "image", max_pixels)
    problems += media
    if modality != "vqa":
        problems += _text_problems(sample)
    return problems + _meta_problems(sample, modality, measured)


# ---------------------------------------------------------------- one shard


@dataclass
class ShardReport:
    name: str
    n_samples: int
    keys: list[str]
    problems: list[tuple[str, str]]  # (key or '', reason)
    unreadable: dict[str, int]  # reason -> n: the shard could not be read to its end
    message: str  # first read error, for the report


def verify_shard(path: str, modality: str, max_pixels: int | None = None) -> ShardReport:
    """Read one shard completely and check every sample against `modality`'s contract (images
    decoded, videos decoded to their last frame: see `check_sample`)."""
    counter = ErrorCounter(max_examples=1)
    keys, problems = [], []
    for sample in iter_samples([path], counter):
        key = sample["__key__"]
        keys.append(key)
        for reason in check_sample(sample, modality, max_pixels):
            problems.append((key, reason))
    read_errors = dict(counter.counts)
    stats = read_shard_stats(path)
    if stats is not None:
        if "successes" in stats and stats["successes"] != len(keys):
            problems.append(
                ("", f"stats_mismatch: {stats['successes']} samples in stats, {len(keys)} in the tar")
            )
        if "bytes" in stats and stats["bytes"] != os.path.getsize(path):
            problems.append(
                ("", f"stats_mismatch: {stats['bytes']} bytes in stats, {os.path.getsize(path)} on disk")
            )
    message = next((m[0] for m in counter.examples.values() if m), "")
    return ShardReport(os.path.basename(path), len(keys), keys, problems, read_errors, message)
