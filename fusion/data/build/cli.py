"""The `fusion-data` command line: the table of subcommands, their flags, and `main`.

Each subcommand is a `Command(name, help, configure, run)` in `COMMANDS`, in --help order:
`configure(parser)` adds its flags, `run(args) -> int` does the work. A builder's `run` binds its
sample maker (`fusion.data.build.makers`) to the flags with `functools.partial` and hands it to
`fusion.data.build.writer.run_build`; `verify` and `stats` are `fusion.data.build.report`, `toy`
and `tokenizer` are `fusion.data.toy` and `fusion.data.tokenizer_train`. A `CliError` (an
`InputError` names the file and line) is printed as one line, exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fusion.cli import CliError, default_workers, int_at_least, pipe_safe
from fusion.data.build.makers import (
    VQA_IMAGE_FORMATS,
    ImageOptions,
    VideoOptions,
    make_image_sample,
    make_text_sample,
    make_video_sample,
    make_vqa_sample,
    names_file,
    parse_turns,
)
from fusion.data.build.readers import INPUT_FORMATS, InputError, Record
from fusion.data.build.report import configure_stats, configure_verify, run_stats, run_verify
from fusion.data.build.writer import PROG, run_build
from fusion.data.images import DEFAULT_MAX_PIXELS, ENCODINGS, RESIZE_MODES
from fusion.data.shards import SampleError
from fusion.data.video import backend_available, encoder_available

# ---------------------------------------------------------------- parser and main


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    # One line on a bad flag (argparse prints the whole usage first).
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Build, verify and summarise WebDataset shards "
        '(one modality per directory; README.md, "Preparing data", gives the format).',
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return pipe_safe(lambda: _main(argv))  # `fusion-data stats D | head`: no traceback


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "_accept_unknown", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exn:  # --help (0) or a bad flag (2, already reported)
        return exn.code if isinstance(exn.code, int) else 1
    try:
        return COMMANDS[args.command].run(args)
    except CliError as exn:
        print(f"{PROG} {args.command}: error: {exn}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- shared builder arguments


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


# ---------------------------------------------------------------- text


def _configure_text(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, text_help="column holding the document")
    p.add_argument(
        "--min-chars",
        type=int_at_least(0),
        default=1,
        metavar="N",
        help="documents with fewer characters (stripped) fail as too_short (default: 1)",
    )


def run_text(args: argparse.Namespace) -> int:
    make = functools.partial(make_text_sample, text_col=args.text_col, min_chars=args.min_chars)
    return run_build(args, "text", make)


# ---------------------------------------------------------------- images, videos, vqa commands


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


def _add_media_path_arguments(
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


def _add_image_arguments(p: argparse.ArgumentParser, formats: Sequence[str] = ENCODINGS) -> None:
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


def _add_video_arguments(p: argparse.ArgumentParser) -> None:
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


def _add_max_side(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--max-side",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help=f"{what} (default: 0 = keep the size)",
    )


def _image_options(args) -> ImageOptions:
    return ImageOptions(
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        resize_mode=args.resize_mode,
        format=args.format,
        quality=args.quality,
    )


def _video_options(args, check_encoder: bool = True) -> VideoOptions:
    if args.crf > 51:
        raise CliError(f"--crf: must be <= 51, got {args.crf}")
    if check_encoder and args.reencode and not encoder_available("libx264"):
        raise CliError(
            "--reencode needs PyAV built with libx264 (pip install av); "
            "or store the files as they are with --copy"
        )
    return VideoOptions(
        reencode=args.reencode,
        fps=args.fps,
        max_side=args.max_side,
        keyframe_interval=args.keyframe_interval,
        crf=args.crf,
        preset=args.preset,
    )


def _require_pyav(command: str) -> None:
    if not backend_available("pyav"):
        raise CliError(
            f"{command} needs PyAV to read and write videos: pip install av "
            f"(or install the project with the 'pyav' extra)"
        )


def _input_base(args) -> str:
    return str(Path(args.input).resolve().parent)


def _configure_images(p: argparse.ArgumentParser) -> None:
    add_build_arguments(
        p, text_col="caption", text_flag="--caption-col", text_help="column holding the caption"
    )
    _add_media_path_arguments(p, image=True, video=False)
    _add_max_side(p, "resize so that the image fits --resize-mode at this size")
    _add_image_arguments(p)


def run_images(args: argparse.Namespace) -> int:
    make = functools.partial(
        make_image_sample,
        caption_col=args.text_col,
        image_col=args.image_col,
        base=_input_base(args),
        image=_image_options(args),
    )
    return run_build(args, "image", make, [args.image_col])


def _configure_videos(p: argparse.ArgumentParser) -> None:
    add_build_arguments(
        p,
        text_col="caption",
        text_flag="--caption-col",
        text_help="column holding the caption",
        samples_per_shard=100,
    )
    _add_media_path_arguments(p, image=False, video=True)
    _add_max_side(
        p,
        "re-encoded videos: the longer side at most N pixels, never enlarged; "
        "sizes are made even, and widths decord 0.6.0 misreads avoided",
    )
    _add_video_arguments(p)


def run_videos(args: argparse.Namespace) -> int:
    _require_pyav("fusion-data videos")
    make = functools.partial(
        make_video_sample,
        caption_col=args.text_col,
        video_col=args.video_col,
        base=_input_base(args),
        video=_video_options(args),
    )
    return run_build(args, "video", make, [args.video_col])


def _configure_vqa(p: argparse.ArgumentParser) -> None:
    add_build_arguments(
        p, text_col="question", text_flag="--question-col", text_help="column holding the question"
    )
    p.add_argument(
        "--answer-col",
        default="answer",
        metavar="COL",
        help="column holding the answer, one of the choices (default: answer)",
    )
    p.add_argument(
        "--choices-col",
        default="choices",
        metavar="COL",
        help="column holding the choices: a JSON list or 'a|b|c' (default: choices)",
    )
    p.add_argument(
        "--type-col",
        default="type",
        metavar="COL",
        help="column holding the question type, used to group accuracy; a record "
        "without it (or with it empty) has type 'default' (default: type)",
    )
    p.add_argument(
        "--turns-col",
        default="turns",
        metavar="COL",
        help="column holding several questions about the record's media, a list of "
        "{question, answer, choices[, type]} (JSON in a CSV cell): a "
        "conversation trained as one sample, the loss on every answer; a record "
        "that fills it needs no question, answer or choices (default: turns)",
    )
    _add_media_path_arguments(p, image=True, video=True, either=True)
    _add_max_side(p, "images: as for `fusion-data images`; videos: as for `fusion-data videos`")
    _add_image_arguments(p, VQA_IMAGE_FORMATS)
    _add_video_arguments(p)


def run_vqa(args: argparse.Namespace) -> int:
    # Each record decides for itself: its media is whichever of --image-col / --video-col it
    # fills (a JSONL record needs one of the two keys; a CSV header or parquet schema one of the
    # two columns), its type is its --type-col value or 'default'.
    source = Path(args.input)
    untyped = total = 0
    video_checked = False

    def inspect(rec: Record) -> None:
        nonlocal untyped, total, video_checked
        total += 1
        try:
            turns = parse_turns(rec.fields.get(args.turns_col))
        except SampleError:  # counted when the record is built
            turns = None
        if turns is not None:  # a conversation: typed when every turn is
            untyped += not all(isinstance(t, dict) and str(t.get("type") or "").strip() for t in turns)
        else:
            value = rec.fields.get(args.type_col)
            untyped += value is None or not str(value).strip()
        if not video_checked and names_file(rec.fields, args.video_col):
            # Only an input with videos needs PyAV: checked at its first video, named by line.
            try:
                _require_pyav("fusion-data vqa with videos")
                _video_options(args)
            except CliError as exn:
                raise InputError(source, rec.line, f"a video question, but {exn}") from None
            video_checked = True

    make = functools.partial(
        make_vqa_sample,
        question_col=args.text_col,
        answer_col=args.answer_col,
        choices_col=args.choices_col,
        type_col=args.type_col,
        image_col=args.image_col,
        video_col=args.video_col,
        base=_input_base(args),
        image=_image_options(args),
        video=_video_options(args, check_encoder=False),
        turns_col=args.turns_col,
    )
    status = run_build(
        args,
        "vqa",
        make,
        [(args.answer_col, args.turns_col), (args.choices_col, args.turns_col)],
        one_of=[args.image_col, args.video_col],
        inspect=inspect,
        text_or=args.turns_col,
    )
    if untyped:
        print(
            f"{PROG} vqa: note: {untyped:,} of {total:,} records in {source.name} have no "
            f"'{args.type_col}' column or leave it empty: their type is 'default'",
            file=sys.stderr,
        )
    return status


# ---------------------------------------------------------------- toy


def _configure_toy(p: argparse.ArgumentParser) -> None:
    # fusion.data.toy is imported here, when the parser is built; if it cannot be, `toy` says why
    # when it is run and every other command (and --help) still works.
    try:
        from fusion.data.toy import add_toy_arguments

        add_toy_arguments(p)
    except Exception as exn:  # ImportError, or a bug in the module: keep the CLI usable
        p.set_defaults(_toy_error=f"{type(exn).__name__}: {exn}", _accept_unknown=True)
        p.description = f"{p.description} (unavailable: {type(exn).__name__}: {exn})"


def run_toy_command(args: argparse.Namespace) -> int:
    error = getattr(args, "_toy_error", None)
    if error:
        raise CliError(f"fusion.data.toy cannot be imported ({error})")
    from fusion.data.toy import run_toy

    return run_toy(args)


# ---------------------------------------------------------------- tokenizer


def _configure_tokenizer(p: argparse.ArgumentParser) -> None:
    from fusion.data.tokenizer_train import add_tokenizer_arguments

    add_tokenizer_arguments(p)


def run_tokenizer_command(args: argparse.Namespace) -> int:
    from fusion.data.tokenizer_train import run_tokenizer

    return run_tokenizer(args)


# ---------------------------------------------------------------- the table, in --help order

COMMANDS: dict[str, Command] = {
    cmd.name: cmd
    for cmd in [
        Command(
            "text",
            "build text shards (KEY.txt + KEY.json) from .jsonl/.txt/.csv/.parquet",
            _configure_text,
            run_text,
        ),
        Command(
            "images",
            "build image-caption shards (KEY.jpg|png|webp + KEY.txt + KEY.json) from "
            ".jsonl/.csv/.parquet listing local image files",
            _configure_images,
            run_images,
        ),
        Command(
            "videos",
            "build video-caption shards (KEY.mp4 + KEY.txt + KEY.json) from "
            ".jsonl/.csv/.parquet listing local video files",
            _configure_videos,
            run_videos,
        ),
        Command(
            "vqa",
            "build VQA shards (KEY.jpg|png or KEY.mp4 + KEY.json {question, answer, "
            "choices, type}) from .jsonl/.csv/.parquet",
            _configure_vqa,
            run_vqa,
        ),
        Command(
            "toy",
            "generate the offline toy corpora (text, image-caption, video-caption) and "
            "toy VQA train/test sets, already sharded",
            _configure_toy,
            run_toy_command,
        ),
        Command(
            "tokenizer",
            "train a Hugging Face tokenizer.json (byte-level BPE or word-level) with "
            "fusion's special tokens on the text of shard directories",
            _configure_tokenizer,
            run_tokenizer_command,
        ),
        Command(
            "verify",
            "read every shard, check keys and members (decoding every image and video), (re)write index.json",
            configure_verify,
            run_verify,
        ),
        Command(
            "stats",
            "summarise counts, failures by reason, bytes and shards from *_stats.json",
            configure_stats,
            run_stats,
        ),
    ]
}
