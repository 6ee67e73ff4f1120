"""Shard samples from input records, one maker per kind of shard: text, image, video, vqa.

    make_text_sample(key, fields, meta, *, text_col, min_chars) -> {"txt", "json"}
    make_image_sample(key, fields, meta, *, caption_col, image_col, base, image) -> {jpg|png|webp, "txt", "json"}
    make_video_sample(key, fields, meta, *, caption_col, video_col, base, video) -> {"mp4", "txt", "json"}
    make_vqa_sample(key, fields, meta, *, question_col, ..., turns_col) -> {jpg|png or mp4, "json"}

A maker runs in a worker process (`fusion.data.build.writer`), so it is a module-level function,
bound to its settings with `functools.partial`; the partial's repr is part of the resume
fingerprint. A bad record raises `SampleError(reason)`, counted in the shard's stats instead of
stopping the build: missing_file, unreadable_file, empty_file, bad_image, too_many_pixels,
unsupported_format, corrupt_video, no_video_stream, zero_frames, empty_caption, not_text, bad_utf8;
vqa adds empty_question, bad_choices, answer_not_in_choices, ambiguous_media, bad_turns.

Media files are read from the paths a record names (relative to the input file) and decoded
completely. Images go through `fusion.data.images`; videos are re-encoded by
`fusion.data.video.transcode` (libx264, one thread, fixed options: deterministic, so a resumed
build is byte-identical) and their `n_frames` is PyAV's decoded count of the stored bytes
(`fusion.data.video.probe`). A vqa record's media is whichever of the image and video columns it
fills, and its pictures are stored as jpg or png only (docs/shards.md); a record whose `turns`
column holds several questions is one conversation about its media.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from fusion.data.images import DEFAULT_MAX_PIXELS, ENCODINGS, EXTENSION, encode, read_image, resize
from fusion.data.shards import VIDEO_FAILURES, SampleError, vqa_type
from fusion.data.video import VideoDecodeError, container_format, transcode
from fusion.data.video import measure as measure_video
from fusion.data.video import probe as probe_video

# ---------------------------------------------------------------- text


def make_text_sample(key: str, fields: dict, meta: dict, *, text_col: str, min_chars: int) -> dict:
    """A text record -> {"txt": text, "json": other columns + source and line}.

    Failures: `empty_text` (missing, null or blank), `not_text` (a number, list...), `bad_utf8`
    (bytes that were not UTF-8 in the input), `too_short` (fewer than `min_chars` characters
    once stripped).
    """
    text = checked_text(fields, text_col, "empty_text")
    stripped = text.strip()
    if len(stripped) < min_chars:
        raise SampleError("too_short", f"{len(stripped)} < {min_chars} characters")
    other = {k: v for k, v in fields.items() if k != text_col}
    other.update(meta)
    try:
        info = json.dumps(other, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise SampleError("bad_utf8", "a column other than the text is not UTF-8") from None
    return {"txt": text, "json": info}


# ---------------------------------------------------------------- media: shared by images, videos, vqa


@dataclass(frozen=True)
class ImageOptions:
    """How `images` and `vqa` store a picture (repr is part of the resume fingerprint)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = 0  # 0 = keep the size
    resize_mode: str = "keep_ratio"  # images.RESIZE_MODES
    format: str = "keep"  # keep | jpg | png | webp
    quality: int = 90


@dataclass(frozen=True)
class VideoOptions:
    """How `videos` and `vqa` store a clip (repr is part of the resume fingerprint)."""

    reencode: bool = True
    fps: float = 0.0  # 0 = the source's average rate
    max_side: int = 0  # 0 = keep the size (made even and decord-safe)
    keyframe_interval: int = 8
    crf: int = 23
    preset: str = "medium"


def checked_text(fields: dict, col: str, empty: str) -> str:
    """The column's string, as it is, once it is known to be a non-blank UTF-8 string; else
    SampleError(empty | not_text | bad_utf8)."""
    value = fields.get(col)
    if value is None:
        raise SampleError(empty, f"column '{col}' is null")
    if not isinstance(value, str):
        raise SampleError("not_text", f"column '{col}' is {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SampleError("bad_utf8", f"column '{col}' is not UTF-8") from None
    if not value.strip():
        raise SampleError(empty, f"column '{col}' is blank")
    return value


MAX_MEDIA_TEXT = 1 << 16  # bytes of a caption or question; more is counted as text_too_long


def media_text(fields: dict, col: str, empty: str) -> str:
    """A caption or question, stripped (see `checked_text`); at most MAX_MEDIA_TEXT bytes."""
    text = checked_text(fields, col, empty).strip()
    if len(text) > MAX_MEDIA_TEXT // 4 and len(text.encode("utf-8")) > MAX_MEDIA_TEXT:
        raise SampleError("text_too_long", f"column '{col}' holds {len(text.encode('utf-8')):,} bytes")
    return text


def read_media(value, base: str) -> bytes:
    """The bytes of the file a record names; a relative path is relative to `base` (the input
    file's directory). SampleError('missing_file' | 'unreadable_file')."""
    if not isinstance(value, str) or not value.strip():
        raise SampleError("missing_file", f"no path (got {value!r})")
    path = os.path.join(base, value)  # not pathlib: its parsing shows beside a small picture
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SampleError("missing_file", f"no such file: '{path}'") from None
    except OSError as exn:
        raise SampleError("unreadable_file", f"'{path}': {exn.strerror or exn}") from None


def store_image(
    data: bytes, opts: ImageOptions, formats: Sequence[str] = ENCODINGS
) -> tuple[str, bytes, dict]:
    """An image file -> (extension, bytes to store, {width, height} of the stored image).

    The file is always decoded completely (so a bad one fails here, not in training). `formats`:
    the extensions the modality may store (image: jpg, png, webp; vqa: jpg, png). With
    `--format keep` the original bytes are stored when nothing changes: a JPEG, PNG (or WEBP,
    when allowed), not resized, without an EXIF rotation; other formats become PNG (lossless).
    """
    decoded = read_image(data, opts.max_pixels)
    img = resize(decoded.image, opts.max_side, opts.resize_mode)
    source_ext = EXTENSION.get(decoded.format)
    source_ext = source_ext if source_ext in formats else None
    fmt = opts.format
    if fmt == "keep":
        if img is decoded.image and source_ext and not decoded.rotated:
            return source_ext, data, {"width": img.width, "height": img.height}
        fmt = source_ext or "png"
    try:
        stored = encode(img, fmt, opts.quality)
    except (OSError, ValueError) as exn:  # e.g. WEBP refuses sides over 16383 pixels
        raise SampleError("encode_failed", f"{fmt} {img.width}x{img.height}: {exn}") from None
    return fmt, stored, {"width": img.width, "height": img.height}


# Shard failure reasons for the video module's strict reading (`transcode`, `measure`, ...).
_READ_FAILURES = {**VIDEO_FAILURES, "unsupported_format": "unsupported_format"}


def store_video(data: bytes, opts: VideoOptions) -> tuple[bytes, dict]:
    """A video file -> (mp4 bytes to store, {fps, n_frames, duration, width, height} of them).

    n_frames is the number of frames PyAV decodes from the stored bytes, not the header's count.
    `--copy` stores the input bytes (an mp4/mov container; anything else needs re-encoding) after
    decoding them completely.
    """
    try:
        if not opts.reencode:
            return data, _copy_check(data)
        stored = transcode(
            data,
            fps=opts.fps,
            max_side=opts.max_side,
            crf=opts.crf,
            keyframe_interval=opts.keyframe_interval,
            preset=opts.preset,
        )
    except VideoDecodeError as exn:
        raise SampleError(_READ_FAILURES[exn.reason], exn.message) from None
    try:
        meta = probe_video(stored, backend="pyav")
    except VideoDecodeError as exn:  # our own encoder's output: should never happen
        raise SampleError(VIDEO_FAILURES[exn.reason], str(exn)) from None
    return stored, _video_info(meta)


def _copy_check(data: bytes) -> dict:
    """`--copy`: decode the mp4 completely (one pass) and measure it as `video.probe` does."""
    name = container_format(data)
    if "mp4" not in name.split(","):
        raise SampleError(
            "unsupported_format", f"a {name} container: --copy stores mp4 files only (use --reencode)"
        )
    return _video_info(measure_video(data))


def _video_info(meta) -> dict:
    """A `VideoMeta` as the sample's json fields, in their stored order."""
    return {
        "fps": meta.fps,
        "n_frames": meta.n_frames,
        "duration": meta.duration,
        "width": meta.width,
        "height": meta.height,
    }


def make_image_sample(
    key: str, fields: dict, meta: dict, *, caption_col: str, image_col: str, base: str, image: ImageOptions
) -> dict:
    """An image-caption record -> {jpg|png|webp, txt: caption, json: {width, height, source}}."""
    caption = media_text(fields, caption_col, "empty_caption")
    ext, data, size = store_image(read_media(fields.get(image_col), base), image)
    return {ext: data, "txt": caption, "json": {**size, "source": fields[image_col]}}


def make_video_sample(
    key: str, fields: dict, meta: dict, *, caption_col: str, video_col: str, base: str, video: VideoOptions
) -> dict:
    """A video-caption record -> {mp4, txt: caption, json: {fps, n_frames, duration, width,
    height, source}}."""
    caption = media_text(fields, caption_col, "empty_caption")
    data, info = store_video(read_media(fields.get(video_col), base), video)
    return {"mp4": data, "txt": caption, "json": {**info, "source": fields[video_col]}}


def parse_choices(value) -> list[str]:
    """A JSON list, a string holding one, or 'a|b|c' -> the choices; SampleError('bad_choices')
    unless there are at least two distinct, non-blank ones. Numbers become strings."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError as exn:
            raise SampleError("bad_choices", f"not a JSON list: {exn}") from None
    elif isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, (list, tuple)):
        raise SampleError("bad_choices", f"expected a list or 'a|b|c', got {type(value).__name__}")
    choices = []
    for c in value:
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = str(c)
        if not isinstance(c, str) or not c.strip():
            raise SampleError("bad_choices", f"choice {c!r} is not a non-blank string")
        choices.append(c.strip())
    if len(choices) < 2:
        raise SampleError("bad_choices", f"{len(choices)} choice(s); at least 2 are needed")
    if len(set(choices)) != len(choices):
        raise SampleError("bad_choices", f"repeated choices in {choices}")
    return choices


VQA_IMAGE_FORMATS = ("jpg", "png")  # docs/shards.md: a vqa sample's picture is .jpg or .png


def names_file(fields: dict, col: str | None) -> bool:
    """The record names a file in `col`: a non-blank string."""
    return col is not None and isinstance(fields.get(col), str) and fields[col].strip() != ""


def vqa_turn(
    fields: dict, question_col: str, answer_col: str, choices_col: str, type_col: str | None
) -> dict:
    """One question of a record (or of its `turns`) -> {question, answer, choices, type}; the
    answer must be one of the choices (`answer_not_in_choices`), the type defaults to 'default'."""
    question = media_text(fields, question_col, "empty_question")
    answer = fields.get(answer_col)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    choices = parse_choices(fields.get(choices_col))
    if not isinstance(answer, str) or answer.strip() not in choices:
        raise SampleError("answer_not_in_choices", f"answer {answer!r} not in {choices}")
    qtype = vqa_type(fields.get(type_col) if type_col else None)
    return {"question": question, "answer": answer.strip(), "choices": choices, "type": qtype}


def parse_turns(value) -> list[dict] | None:
    """A record's `turns` value (a list, or a string holding a JSON list) -> the list of turn
    objects; None when the record leaves it empty; SampleError('bad_turns') otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exn:
            raise SampleError("bad_turns", f"not a JSON list: {exn}") from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(t, dict) for t in value):
        raise SampleError("bad_turns", "expected a non-empty list of {question, answer, choices[, type]}")
    return list(value)


def make_vqa_sample(
    key: str,
    fields: dict,
    meta: dict,
    *,
    question_col: str,
    answer_col: str,
    choices_col: str,
    type_col: str | None,
    image_col: str | None,
    video_col: str | None,
    base: str,
    image: ImageOptions,
    video: VideoOptions,
    turns_col: str | None = None,
) -> dict:
    """A VQA record -> {jpg|png or mp4, json: {question, answer, choices, type, source,
    width, height [, fps, n_frames, duration]}}.

    The media column is `image_col` or `video_col`, whichever this record fills (both filled:
    `ambiguous_media`; neither: `missing_file`). Pictures are stored as jpg or png only (WEBP,
    GIF... become png). The type is the record's `type_col` value, or 'default' when it has none.
    The answer must be one of the choices (`answer_not_in_choices`).

    A record whose `turns_col` holds a list of {question, answer, choices[, type]} is a
    conversation about its media: every turn is checked as above (a bad one fails the record) and
    stored in order as the json's `turns`, the first one repeated at its top level.
    """
    turns = parse_turns(fields.get(turns_col)) if turns_col else None
    if turns is None:
        info = vqa_turn(fields, question_col, answer_col, choices_col, type_col)
    else:
        turns = [vqa_turn(t, "question", "answer", "choices", "type") for t in turns]
        info = {**turns[0], "turns": turns}
    if names_file(fields, image_col) and names_file(fields, video_col):
        raise SampleError("ambiguous_media", f"both '{image_col}' and '{video_col}' are set")
    if names_file(fields, video_col) or image_col is None:
        data, measured = store_video(read_media(fields.get(video_col), base), video)
        return {"mp4": data, "json": {**info, "source": fields[video_col], **measured}}
    ext, data, measured = store_image(read_media(fields.get(image_col), base), image, VQA_IMAGE_FORMATS)
    return {ext: data, "json": {**info, "source": fields[image_col], **measured}}
