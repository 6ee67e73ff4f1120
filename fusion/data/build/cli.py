"""The `fusion-data` command line: the table of subcommands, their flags, and `main`.

Each subcommand is a `Command(name, help, configure, run)` in `COMMANDS`, in --help order:
`configure(parser)` adds its flags (the flags builders share are defined in
`fusion.data.build.flags`), `run(args) -> int` does the work. A builder's `run` binds its
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

from fusion.cli import CliError, int_at_least, pipe_safe
from fusion.data.build.flags import (
    add_build_arguments,
    add_image_arguments,
    add_max_side,
    add_media_path_arguments,
    add_video_arguments,
)
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
from fusion.data.build.readers import InputError, Record
from fusion.data.build.report import configure_stats, configure_verify, run_stats, run_verify
from fusion.data.build.writer import PROG, run_build
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
    add_media_path_arguments(p, image=True, video=False)
    add_max_side(p, "resize so that the image fits --resize-mode at this size")
    add_image_arguments(p)


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
    add_media_path_arguments(p, image=False, video=True)
    add_max_side(
        p,
        "re-encoded videos: the longer side at most N pixels, never enlarged; "
        "sizes are made even, and widths decord 0.6.0 misreads avoided",
    )
    add_video_arguments(p)


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
    add_media_path_arguments(p, image=True, video=True, either=True)
    add_max_side(p, "images: as for `fusion-data images`; videos: as for `fusion-data videos`")
    add_image_arguments(p, VQA_IMAGE_FORMATS)
    add_video_arguments(p)


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
