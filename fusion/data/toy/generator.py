"""`fusion-data toy`: checks of the arguments, the parallel generator, its summary and its command
line.
(fusion/data/toy/__init__.py describes the world.)"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing
import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusion.cli import CliError, default_workers, int_at_least
from fusion.data.shards import read_index, shard_name, write_index
from fusion.data.toy.scenes import encode_mp4
from fusion.data.toy.splits import (
    SPLITS,
    SPLITS_BY_NAME,
    TOKENIZER_FILE,
    VIDEO_SPLITS,
    check_toy_output,
    count_types,
    remove_stale_shards,
    write_toy_shard,
    write_toy_tokenizer,
)
from fusion.data.toy.world import (
    BACKGROUND,
    CHOICES,
    COLORS,
    DEFAULTS,
    EXTRA_COLORS,
    FPS,
    IMAGE_TYPES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    QUESTIONS,
    SHAPES,
    World,
    choose_held_out,
)
from fusion.data.video import (
    DECORD_BAD_WIDTHS,
    VideoDecodeError,
    backend_available,
    decode,
)
from fusion.files import sha256_file

# ---------------------------------------------------------------- checks


@functools.cache
def check_image_size(size: int) -> int:
    """`size`, or ValueError saying why it cannot be the image and video frame size."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(f"image size must be an integer, got {size!r}")
    size = int(size)
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} "
            f"(below {MIN_IMAGE_SIZE} px the shapes are too small to tell apart)"
        )
    if size % 2:
        raise ValueError(f"image size {size} is odd; H.264 yuv420p frames need an even size")
    if size in DECORD_BAD_WIDTHS or not _decord_reads(size):
        good = next(
            k
            for k in range(size + 2, MAX_IMAGE_SIZE + 1, 2)
            if k not in DECORD_BAD_WIDTHS and _decord_reads(k)
        )
        raise ValueError(
            f"image size {size}: decord 0.6.0 misdecodes videos {size} pixels wide; "
            f"use e.g. {good} (32 and 64 work)"
        )
    return size


@functools.cache
def _decord_reads(size: int) -> bool:
    """True unless decord is installed and decodes a tiny clip of this width wrongly."""
    if not (backend_available("pyav") and backend_available("decord")):
        return True
    frames = np.zeros((2, size, size, 3), np.uint8)
    try:
        got = decode(encode_mp4(frames), [0, 1], backend="decord")
    except VideoDecodeError:
        return False
    return got.shape == frames.shape


def _check_counts(counts: dict[str, int], samples_per_shard: int, n_frames: tuple[int, int]) -> None:
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be an integer >= 1, got {samples_per_shard!r}")
    lo, hi = n_frames
    if not 2 <= lo <= hi:
        raise ValueError(f"n_frames must be (min, max) with 2 <= min <= max, got {n_frames!r}")
    if any(counts[SPLITS_BY_NAME[v].count_arg] for v in VIDEO_SPLITS) and not backend_available("pyav"):
        raise ValueError(
            "toy videos are encoded with PyAV, which is not installed "
            "(pip install av), or ask for no videos: --n-video 0 "
            "--n-video-vqa-train 0 --n-video-vqa-test 0"
        )


# ---------------------------------------------------------------- the generator


def _check_conversation_args(vqa_turns: int, extra_colors: Sequence[str]) -> tuple[str, ...]:
    if (
        isinstance(vqa_turns, bool)
        or not isinstance(vqa_turns, int)
        or not 1 <= vqa_turns <= len(IMAGE_TYPES)
    ):
        raise ValueError(f"vqa_turns must be an integer 1..{len(IMAGE_TYPES)}, got {vqa_turns!r}")
    extra_colors = tuple(extra_colors)
    unknown = [c for c in extra_colors if c not in EXTRA_COLORS]
    if unknown or len(set(extra_colors)) != len(extra_colors):
        raise ValueError(
            f"extra colors must be distinct names from {', '.join(EXTRA_COLORS)}, "
            f"got {', '.join(extra_colors)}"
        )
    return extra_colors


def _write_shards(world: World, output: Path, counts: dict, samples_per_shard: int, workers: int) -> None:
    """Every split's shards (in `workers` processes), stale ones removed, then the tokenizer of
    all the text written."""
    tasks = []  # (split, shard, start, stop)
    for split in SPLITS:
        n = counts[split.count_arg]
        n_shards = -(-n // samples_per_shard)
        remove_stale_shards(output / split.name, n_shards)
        tasks += [
            (split.name, k, k * samples_per_shard, min(n, (k + 1) * samples_per_shard))
            for k in range(n_shards)
        ]
    # Videos are the slow part: start them first so the workers finish together.
    tasks.sort(key=lambda t: t[0] not in VIDEO_SPLITS)
    words: set[str] = set()
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: the caller may hold threads (torch, a DataLoader) that fork would copy
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
            for future in [pool.submit(write_toy_shard, world, str(output), *t) for t in tasks]:
                words |= future.result()
    else:
        for t in tasks:
            words |= write_toy_shard(world, str(output), *t)
    write_toy_tokenizer(output / TOKENIZER_FILE, words)


def _shard_names(n: int, samples_per_shard: int) -> list[str]:
    return [shard_name(k) for k in range(-(-n // samples_per_shard))]


def _splits_summary(counts: dict, samples_per_shard: int) -> dict:
    """The summary's `splits`: {name: {dir, modality, n_samples, shards, by_type}}."""
    return {
        split.name: {
            "dir": split.name,
            "modality": split.modality,
            "n_samples": counts[split.count_arg],
            "shards": len(_shard_names(counts[split.count_arg], samples_per_shard)),
            "by_type": count_types(split, counts[split.count_arg]),
        }
        for split in SPLITS
    }


def _write_indexes(output: Path, counts: dict, samples_per_shard: int) -> None:
    """index.json of every split that has samples."""
    for split in SPLITS:
        n = counts[split.count_arg]
        names = _shard_names(n, samples_per_shard)
        if names:
            write_index(
                output / split.name,
                split.modality,
                names=names,
                counts={
                    name: min(samples_per_shard, n - k * samples_per_shard) for k, name in enumerate(names)
                },
            )


def _complete_world(output: Path, summary: dict, samples_per_shard: int) -> bool:
    """True when `output` holds the world `summary` describes, whole: its toy.json (written last,
    after every shard) says the same, the tokenizer is there, and every split's index.json lists
    the expected shards, each on disk with the size and sha256 the index gives it (about 1 s for
    the 290 MB world of `make demo`)."""
    try:
        if json.loads((output / "toy.json").read_text()) != json.loads(json.dumps(summary)):
            return False
        if not (output / TOKENIZER_FILE).is_file():
            return False
        for name, split in summary["splits"].items():
            names = _shard_names(split["n_samples"], samples_per_shard)
            if not names:
                continue
            index = read_index(output / name)
            listed = [] if index is None else index["shards"]
            if [entry["name"] for entry in listed] != names or any(
                (output / name / entry["name"]).stat().st_size != entry["bytes"]
                or sha256_file(output / name / entry["name"]) != entry["sha256"]
                for entry in listed
            ):
                return False
    except (OSError, ValueError, LookupError, TypeError):
        return False
    return True


def _summary(world: World, counts: dict, samples_per_shard: int, splits: dict) -> dict:
    """toy.json: what the world is and what was written (no timing: same flags, same bytes)."""
    seed, image_size, n_frames = world.seed, world.size, world.n_frames
    vqa_turns, extra_colors = world.vqa_turns, world.extra_colors
    summary = {
        "seed": seed,
        "image_size": image_size,
        "n_frames": list(n_frames),
        "fps": FPS,
        "samples_per_shard": samples_per_shard,
        "counts": counts,
        "vqa_turns": vqa_turns,
        "extra_colors": {c: list(EXTRA_COLORS[c]) for c in extra_colors},
        "held_out_pairs": [list(p) for p in world.held_out],
        "colors": {c: list(rgb) for c, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "background": list(BACKGROUND),
        "questions": QUESTIONS,
        "choices": CHOICES,
        "splits": splits,
        "tokenizer": TOKENIZER_FILE,
    }
    return summary


def generate_toy(
    output: str | os.PathLike,
    seed: int = 0,
    image_size: int = 32,
    n_text: int = DEFAULTS["n_text"],
    n_image: int = DEFAULTS["n_image"],
    n_video: int = DEFAULTS["n_video"],
    n_vqa_train: int = DEFAULTS["n_vqa_train"],
    n_vqa_test: int = DEFAULTS["n_vqa_test"],
    n_video_vqa_train: int = DEFAULTS["n_video_vqa_train"],
    n_video_vqa_test: int = DEFAULTS["n_video_vqa_test"],
    n_frames: tuple[int, int] = (8, 16),
    samples_per_shard: int = DEFAULTS["samples_per_shard"],
    n_vqa_compositional: int | None = None,
    workers: int = 1,
    vqa_turns: int = DEFAULTS["vqa_turns"],
    extra_colors: Sequence[str] = DEFAULTS["extra_colors"],
    force: bool = False,
) -> dict:
    """Write the toy corpora and VQA sets under `output`; return the summary (also DIR/toy.json).

    The defaults take about 20 s on 2 cores at 32 px (workers=2). `n_vqa_compositional` defaults
    to `n_vqa_test`. `workers` > 1 writes shards in that many processes; the output is the same.
    A complete world from the same flags already in `output` (its toy.json equal to the one this
    call would write, the tokenizer there, every shard as its index.json gives it) is reused as it
    is, unless `force`: same flags, same bytes, so there is nothing to redo. Otherwise toy shards
    already there (any seed, size or counts) are overwritten, surplus ones from a larger run
    removed; anything else a run would overwrite or delete makes it raise ValueError first
    (`check_toy_output`).
    Summary: {seed, image_size, n_frames, fps, samples_per_shard, held_out_pairs,
    splits: {name: {dir, modality, n_samples, shards, by_type}}, seconds, reused}.
    """
    t0 = time.perf_counter()
    check_image_size(image_size)
    counts = {
        "n_text": n_text,
        "n_image": n_image,
        "n_video": n_video,
        "n_vqa_train": n_vqa_train,
        "n_vqa_test": n_vqa_test,
        "n_vqa_compositional": n_vqa_test if n_vqa_compositional is None else n_vqa_compositional,
        "n_video_vqa_train": n_video_vqa_train,
        "n_video_vqa_test": n_video_vqa_test,
    }
    n_frames = (int(n_frames[0]), int(n_frames[1]))
    _check_counts(counts, samples_per_shard, n_frames)
    output = Path(output)
    extra_colors = _check_conversation_args(vqa_turns, extra_colors)
    world = World(
        seed=seed,
        size=image_size,
        held_out=choose_held_out(seed),
        n_frames=n_frames,
        vqa_turns=vqa_turns,
        extra_colors=extra_colors,
    )
    summary = _summary(world, counts, samples_per_shard, _splits_summary(counts, samples_per_shard))
    if not force and _complete_world(output, summary, samples_per_shard):
        return {**summary, "output": str(output), "seconds": 0.0, "reused": True}
    check_toy_output(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "toy.json").unlink(missing_ok=True)  # written last: it marks a complete set

    _write_shards(world, output, counts, samples_per_shard, workers)
    _write_indexes(output, counts, samples_per_shard)
    # The manifest is written last and holds no timing: same flags, same bytes.
    tmp = output / "toy.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, output / "toy.json")
    return {**summary, "output": str(output), "seconds": round(time.perf_counter() - t0, 2), "reused": False}


def format_summary(summary: dict) -> str:
    """The printed summary: one line per split with its counts per question type."""
    held = ", ".join(f"{c} {s}" for c, s in summary["held_out_pairs"])
    done = (
        "reused: its toy.json matches these flags; --force writes it again"
        if summary.get("reused")
        else f"{summary['seconds']:.1f} s"
    )
    lines = [
        f"toy world in {summary['output']}: seed {summary['seed']}, "
        f"{summary['image_size']}x{summary['image_size']} px, held-out pairs: {held} ({done})"
    ]
    for name, sp in summary["splits"].items():
        types = ", ".join(f"{t} {n}" for t, n in sp["by_type"].items())
        lines.append(
            f"  {name:<25} {sp['modality']:<5} {sp['n_samples']:>6} samples "
            f"{sp['shards']:>3} shards" + (f"   {types}" if types else "")
        )
    lines.append(f"  manifest: {Path(summary['output']) / 'toy.json'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def _image_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return check_image_size(value)
    except ValueError as exn:
        raise argparse.ArgumentTypeError(str(exn)) from None


def _turns(text: str) -> int:
    value = int_at_least(1)(text)
    if value > len(IMAGE_TYPES):
        raise argparse.ArgumentTypeError(
            f"must be at most {len(IMAGE_TYPES)} (one question per type), got {value}"
        )
    return value


def _extra_colors(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if any(c not in EXTRA_COLORS for c in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct names from {', '.join(EXTRA_COLORS)}, comma-separated, got {text!r}"
        )
    return names


def _add_count_arguments(parser: argparse.ArgumentParser) -> None:
    """How many samples each split gets."""
    n = int_at_least(0)
    d = DEFAULTS
    parser.add_argument(
        "--n-text",
        type=n,
        default=d["n_text"],
        metavar="N",
        help=f"text documents: captions, events, facts, Q/A lines (default {d['n_text']})",
    )
    parser.add_argument(
        "--n-image",
        type=n,
        default=d["n_image"],
        metavar="N",
        help=f"image-caption pairs (default {d['n_image']})",
    )
    parser.add_argument(
        "--n-video",
        type=n,
        default=d["n_video"],
        metavar="N",
        help=f"video-caption pairs, 8-16 frames at {FPS} fps (default {d['n_video']})",
    )
    parser.add_argument(
        "--n-vqa-train",
        type=n,
        default=d["n_vqa_train"],
        metavar="N",
        help=f"image VQA training questions (default {d['n_vqa_train']})",
    )
    parser.add_argument(
        "--n-vqa-test",
        type=n,
        default=d["n_vqa_test"],
        metavar="N",
        help=f"image VQA test questions on seen pairs (default {d['n_vqa_test']})",
    )
    parser.add_argument(
        "--n-vqa-compositional",
        type=n,
        default=None,
        metavar="N",
        help="image VQA test questions on the held-out colour-shape pairs (default: as many as --n-vqa-test)",
    )
    parser.add_argument(
        "--n-video-vqa-train",
        type=n,
        default=d["n_video_vqa_train"],
        metavar="N",
        help=f"video VQA (direction) training questions (default {d['n_video_vqa_train']})",
    )
    parser.add_argument(
        "--n-video-vqa-test",
        type=n,
        default=d["n_video_vqa_test"],
        metavar="N",
        help=f"video VQA (direction) test questions (default {d['n_video_vqa_test']})",
    )


def add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `fusion-data toy`."""
    d = DEFAULTS
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory for the toy datasets (one shard directory per split, "
        "plus toy.json); toy shards already there are overwritten, a split "
        "directory holding other shards is refused",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed: scenes, captions and the held-out colour-shape pairs; "
        "the same seed and flags give byte-identical shards (default 0)",
    )
    parser.add_argument(
        "--image-size",
        type=_image_size,
        default=32,
        metavar="PX",
        help="side of the square images and video frames in pixels, even, "
        f"{MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE}, e.g. 64 (default 32); sizes "
        "decord cannot decode (48, 72) are refused",
    )
    _add_count_arguments(parser)
    parser.add_argument(
        "--vqa-turns",
        type=_turns,
        default=d["vqa_turns"],
        metavar="N",
        help="questions per vqa_image_train record, 1-5: the balanced question, "
        "then up to N-1 more about the same picture, one per other type "
        "with a right answer there, stored as the record's `turns` (test "
        f"sets keep one question per record; default {d['vqa_turns']})",
    )
    parser.add_argument(
        "--extra-colors",
        type=_extra_colors,
        default=d["extra_colors"],
        metavar="C,C",
        help=f"colours ({', '.join(EXTRA_COLORS)}) that distractor objects in the "
        "training splits may also wear, named in captions, never asked about: "
        "every shape is seen in more colours (default: none)",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int_at_least(1),
        default=d["samples_per_shard"],
        metavar="N",
        help=f"samples per tar shard (default {d['samples_per_shard']})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write the world even when --output already holds a complete one made "
        "with the same flags (by default that one is reused as it is)",
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=default_workers(),
        metavar="N",
        help="processes writing shards; the output does not depend on it (default: CPUs, at most 8)",
    )


def run_toy(args: argparse.Namespace) -> int:
    """`fusion-data toy`: generate, print the summary, return 0."""
    try:
        summary = generate_toy(
            args.output,
            seed=args.seed,
            image_size=args.image_size,
            n_text=args.n_text,
            n_image=args.n_image,
            n_video=args.n_video,
            n_vqa_train=args.n_vqa_train,
            n_vqa_test=args.n_vqa_test,
            n_vqa_compositional=getattr(args, "n_vqa_compositional", None),
            n_video_vqa_train=args.n_video_vqa_train,
            n_video_vqa_test=args.n_video_vqa_test,
            samples_per_shard=args.samples_per_shard,
            workers=getattr(args, "workers", 1),
            vqa_turns=getattr(args, "vqa_turns", DEFAULTS["vqa_turns"]),
            extra_colors=getattr(args, "extra_colors", DEFAULTS["extra_colors"]),
            force=getattr(args, "force", False),
        )
    except (ValueError, OSError) as exn:
        raise CliError(str(exn)) from exn
    print(format_summary(summary))
    return 0
