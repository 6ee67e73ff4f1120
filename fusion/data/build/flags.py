"""The builders' flags: the argument definitions the `fusion-data` builders (text, images, videos,
vqa) share, and the value types they parse with. `add_build_arguments` adds what every builder
takes (input, output, columns, sharding, workers); `add_media_path_arguments`,
`add_image_arguments`, `add_video_arguments` and `add_max_side` add the media ones. Reading the
parsed flags into `ImageOptions` / `VideoOptions` is the commands' work (cli.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from PIL import Image

from fusion.cli import default_workers, int_at_least
from fusion.data.build.readers import INPUT_FORMATS
from fusion.data.images import DEFAULT_MAX_PIXELS, ENCODINGS, RESIZE_MODES


def add_build_arguments(
    p: argparse.ArgumentParser,
    *,
    text_col: str = "text",
    text_help: str = "column holding the text",
    text_flag: str = "--text-col",
    samples_per_shard: int = 1000,
) -> None:
    """The flags every builder takes: input/output, columns, sharding, workers, progress.

    The text column's flag is `text_flag` (`--caption-col`, `--question-col`), always stored as
    `args.text_col`.
    """
    p.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help=f"input records: {', '.join(INPUT_FORMATS)} (.parquet needs pyarrow)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="dataset directory for the shards (created): one modality from one input "
        "file; the same command again resumes, another input there is refused "
        "(see --overwrite)",
    )
    p.add_argument(
        text_flag,
        dest="text_col",
        default=text_col,
        metavar="COL",
        help=f"{text_help} (default: {text_col}"
        + ("; ignored by .txt input)" if text_flag == "--text-col" else ")"),
    )
    p.add_argument(
        "--key-col",
        default=None,
        metavar="COL",
        help="column whose value becomes the sample key, mapped to [0-9A-Za-z_-] "
        "(default: the record index, %%09d)",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int_at_least(1),
        default=samples_per_shard,
        metavar="N",
        help=f"input records per shard; record i goes to shard i // N (default: {samples_per_shard})",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(1),
        default=default_workers(),
        metavar="N",
        help="worker processes, each writing whole shards (default: CPUs, at most 8)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the shards and index.json already in --output, whatever built "
        "them, then build anew (without it, a directory holding shards of another "
        "input is refused, and one holding shards of this input is resumed)",
    )


def _quality(text: str) -> int:
    value = int_at_least(1)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be <= 100, got {value}")
    return value


def _fps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value < 1000):
        raise argparse.ArgumentTypeError(f"must be in [0, 1000), got {value}")
    return value


def add_media_path_arguments(
    p: argparse.ArgumentParser, image: bool, video: bool, either: bool = False
) -> None:
    note = "; each record's media is whichever of --image-col / --video-col it fills" if either else ""
    if image:
        p.add_argument(
            "--image-col",
            default="image",
            metavar="COL",
            help="column with the image file path, relative to the input file's "
            f"directory (default: image{note})",
        )
    if video:
        p.add_argument(
            "--video-col",
            default="video",
            metavar="COL",
            help="column with the video file path, relative to the input file's "
            f"directory (default: video{note})",
        )


EXTENSION_NAMES = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def add_image_arguments(p: argparse.ArgumentParser, formats: Sequence[str] = ENCODINGS) -> None:
    kept = "/".join(EXTENSION_NAMES[f] for f in formats)
    converted = "GIF, BMP -> png" if "webp" in formats else "WEBP, GIF, BMP -> png, lossless"
    g = p.add_argument_group("images")
    g.add_argument(
        "--max-pixels",
        type=int_at_least(1),
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="images whose header says more pixels fail as too_many_pixels before "
        f"decoding (default: {DEFAULT_MAX_PIXELS:,}; Pillow's own bomb limit of "
        f"{Image.MAX_IMAGE_PIXELS:,} also applies and is never raised)",
    )
    g.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="keep_ratio",
        help="keep_ratio: longer side <= --max-side, never enlarged; center_crop / pad: "
        "exactly --max-side squared (cropped / padded with white); none: as is "
        "(default: keep_ratio)",
    )
    g.add_argument(
        "--format",
        choices=("keep", *formats),
        default="keep",
        help=f"stored image format, one of {', '.join(formats)}; keep stores the "
        f"original bytes of an unchanged {kept} and re-encodes the rest in their "
        f"format ({converted}) (default: keep)",
    )
    g.add_argument(
        "--quality",
        type=_quality,
        default=90,
        metavar="Q",
        help=f"{'/'.join(EXTENSION_NAMES[f] for f in formats if f != 'png')} quality "
        f"1-100 when encoding (default: 90)",
    )


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("videos")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--reencode",
        dest="reencode",
        action="store_true",
        default=True,
        help="re-encode to H.264 mp4 (libx264, yuv420p, no audio, deterministic) (default)",
    )
    mode.add_argument(
        "--copy",
        dest="reencode",
        action="store_false",
        help="store the input mp4 bytes unchanged (after a full decode check); "
        "--fps, --max-side, --crf... are ignored for videos",
    )
    g.add_argument(
        "--fps",
        type=_fps,
        default=0.0,
        metavar="F",
        help="frame rate of re-encoded videos, frames dropped or repeated "
        "(default: 0 = the source's average rate)",
    )
    g.add_argument(
        "--keyframe-interval",
        type=int_at_least(1),
        default=8,
        metavar="N",
        help="a keyframe every N frames: a short GOP makes seeking cheap (default: 8)",
    )
    g.add_argument(
        "--crf",
        type=int_at_least(0),
        default=23,
        metavar="N",
        help="x264 constant rate factor, 0 (lossless) .. 51 (default: 23)",
    )
    g.add_argument(
        "--preset",
        default="medium",
        choices=(
            "ultrafast",
            "superfast",
            "veryfast",
            "faster",
            "fast",
            "medium",
            "slow",
            "slower",
            "veryslow",
        ),
        help="x264 speed/size preset (default: medium)",
    )


def add_max_side(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--max-side",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help=f"{what} (default: 0 = keep the size)",
    )
