"""`fusion-data`: build WebDataset shards, verify them, summarise them.

    fusion-data text   --input docs.jsonl  --output data/text  --samples-per-shard 1000 --workers 4
    fusion-data images --input pairs.jsonl --output data/image --max-side 512 --format jpg
    fusion-data videos --input clips.csv   --output data/video --fps 8 --max-side 256
    fusion-data vqa    --input qa.jsonl    --output data/vqa
    fusion-data toy    --output data/toy
    fusion-data tokenizer --input data/image data/vqa --output data/tokenizer.json
    fusion-data verify data/text
    fusion-data stats data/text --json

Every builder shares one pipeline, `run_build`:

    input file --read_records--> Record(index, line, fields)   main process, in file order
               --plan_items----> Item(key, fields, meta, failure) keys, duplicate keys (global)
               --chunks--------> shard i = records [i*S, (i+1)*S)   S = --samples-per-shard
               --write_shard---> DIR/NNNNNN.tar + _stats.json      worker processes, whole shards
               --write_index---> DIR/index.json

Record i always lands in shard i // S whatever fails, so a re-run (resume) skips the shards whose
tar and stats exist (and whose stats `input_sha256`, a digest of the shard's records and the build
settings, still matches) and rebuilds the rest byte-identically. A malformed input file stops the build
with one error naming the file and line; shards already complete stay, and no index is written.
The digest covers the records, not the media files they name: after editing a picture in place,
build into a fresh directory (or pass --overwrite).

An output directory holds one build: one modality from one input file, whose resolved path every
shard's stats record (`modality`, `input`). Before writing anything, a build refuses a directory
holding shards of any other build (another input, `fusion-data toy`, img2dataset, plain `tar`),
naming it; `--overwrite` deletes them (and index.json) first. A re-run of the same input reuses
what it can, rewrites the rest, and removes its own shards beyond the input's last one, so
index.json lists exactly the shards a reader of the directory sees.

Media builders (`images`, `videos`, `vqa`) read the files a record names (paths relative to the
input file) inside the workers, decode every one completely, and count a bad record by reason in
the shard's stats instead of stopping: missing_file, unreadable_file, empty_file, bad_image,
too_many_pixels, unsupported_format, corrupt_video, no_video_stream, zero_frames, empty_caption,
not_text, bad_utf8, duplicate_key; vqa adds empty_question, bad_choices, answer_not_in_choices,
ambiguous_media, bad_turns. A vqa record's media is whichever of the image and video columns it fills, and
its pictures are stored as jpg or png only (SPEC §4). Images go through `fusion.data.images`;
videos are re-encoded by `fusion.data.video.transcode` (libx264, one thread, fixed options:
deterministic, so a resumed build is byte-identical) and their `n_frames` is PyAV's decoded
count of the stored bytes (`fusion.data.video.probe`).

Adding a builder: a sample function `make_sample(key, fields, meta) -> {ext: bytes | str | dict}`
that raises `SampleError(reason)` for a bad record, a `configure(parser)` that calls
`add_build_arguments`, and a `run(args)` that calls `run_build(args, modality, make_sample,
columns)`; register the pair with `@register(name, help, configure)`. `make_sample` is pickled to
worker processes: a module-level function, or a `functools.partial` of one.
"""

from __future__ import annotations

import argparse
import codecs
import concurrent.futures as cf
import csv
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from PIL import Image

from fusion.cli import CliError, default_workers, int_at_least, pipe_safe
from fusion.data.images import (
    DEFAULT_MAX_PIXELS,
    ENCODINGS,
    EXTENSION,
    RESIZE_MODES,
    encode,
    read_image,
    resize,
)
from fusion.data.shards import (
    INDEX_NAME,
    SHARD_KINDS,
    VIDEO_FAILURES,
    ErrorCounter,
    SampleError,
    collect_stats,
    foreign_shards,
    is_shard_complete,
    read_index,
    read_shard_stats,
    sanitize_key,
    shard_name,
    shard_origin,
    shards_in_dir,
    stats_name,
    vqa_type,
    write_index,
)
from fusion.data.tar import ShardWriter, iter_samples
from fusion.data.verify import guess_modality, verify_shard
from fusion.data.video import (
    VideoDecodeError,
    backend_available,
    container_format,
    encoder_available,
    transcode,
)
from fusion.data.video import measure as measure_video
from fusion.data.video import probe as probe_video

PROG = "fusion-data"
INPUT_FORMATS = (".jsonl", ".txt", ".csv", ".parquet")

SampleFn = Callable[[str, dict, dict], dict]


class InputError(CliError):
    """A malformed or unreadable input file, named with the line where it broke."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")


# ---------------------------------------------------------------- command registry

@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `run(args) -> int` as subcommand `name` with its argument setup."""
    def wrap(run: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"fusion-data subcommand {name!r} registered twice")
        COMMANDS[name] = Command(name, help, configure, run)
        return run
    return wrap


class _Parser(argparse.ArgumentParser):
    # One line on a bad flag (argparse prints the whole usage first).
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Build, verify and summarise WebDataset shards "
                     "(one modality per directory; README.md, \"Preparing data\", gives the format).")
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
        print(f"{PROG} {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130


# ---------------------------------------------------------------- reading input records

@dataclass
class Record:
    index: int    # position among the file's records, from 0: decides the default key and shard
    line: int     # 1-based line (parquet: row) where the record starts
    fields: dict  # column -> value; text never fails to decode here (see read_records)


def read_records(path: str | os.PathLike, text_col: str, columns: Sequence = (),
                 one_of: Sequence[str] = (), text_or: str | None = None) -> Iterator[Record]:
    """Records of a .jsonl / .txt / .csv / .parquet file, in order.

    `text_col` and `columns` must exist in every record (a .txt line is `{text_col: line}`), and
    at least one of `one_of` (vqa: the image or the video column). An entry of `columns` may be a
    tuple of alternatives, any one of which will do; `text_or` is an alternative to the text
    column (vqa: a `turns` column instead of question, answer and choices). A JSONL record is checked on
    its own keys; a CSV file on its header row, a parquet file on its schema. A missing column, an
    invalid JSON line, a ragged CSV row or an unreadable file raises InputError naming the file
    and line. Bytes that are not UTF-8 do not: they come through as lone surrogates
    (`surrogateescape`), and the sample function counts them as `bad_utf8`. A UTF-8 byte order
    mark opening the file (Excel's "CSV UTF-8") is skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    required = [(text_col, text_or) if text_or else text_col, *[c for c in columns if c != text_col]]
    readers = {".jsonl": _read_jsonl, ".txt": _read_txt, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise InputError(path, None, f"unknown input format '{suffix or path.name}' "
                         f"(expected {', '.join(INPUT_FORMATS)})")
    if suffix == ".txt" and (len(required) > 1 or one_of or text_or):
        extra = [*map(_column_names, required[1:]), " or ".join(one_of)] if one_of \
            else list(map(_column_names, required[1:]))
        raise InputError(path, None, f"a .txt input has one column per line; "
                         f"column(s) {', '.join(extra)} need .jsonl, .csv or .parquet")
    try:
        yield from readers[suffix](path, required, tuple(one_of))
    except InputError:
        raise
    except OSError as exn:
        raise InputError(path, None, f"cannot read: {exn.strerror or exn}") from exn


def _column_names(col: str | tuple[str, ...]) -> str:
    """'a', or 'a' or 'b' for a tuple of alternatives."""
    return " or ".join(f"'{c}'" for c in (col if isinstance(col, tuple) else (col,)))


def _missing(path, line, fields: Iterable[str], required: Sequence, what: str,
             one_of: Sequence[str] = ()):
    have = list(fields)
    shown = ", ".join(map(str, have[:10])) + (", ..." if len(have) > 10 else "")
    for col in required:
        if not any(c in have for c in (col if isinstance(col, tuple) else (col,))):
            raise InputError(path, line, f"missing column {_column_names(col)} in {what} "
                                         f"(has: {shown or 'none'})")
    if one_of and not any(col in have for col in one_of):
        wanted = " or ".join(f"'{col}'" for col in one_of)
        raise InputError(path, line, f"missing column {wanted} in {what} (has: {shown or 'none'})")


def _read_jsonl(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = raw.decode("utf-8", "surrogateescape").strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError as exn:
                raise InputError(path, line_no, f"invalid JSON: {exn}") from None
            if not isinstance(obj, dict):
                raise InputError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            _missing(path, line_no, obj, required, "record", one_of)
            yield Record(index, line_no, obj)
            index += 1


def _read_txt(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if not text.strip():
                continue
            yield Record(index, line_no, {required[0]: text})
            index += 1


def _read_csv(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # documents are longer than the 128 KiB default
    try:
        # utf-8-sig: a leading byte order mark is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                if header is None:
                    raise InputError(path, 1, "empty file: expected a header row")
                _missing(path, 1, header, required, "header", one_of)
                index, start = 0, reader.line_num + 1
                for row in reader:
                    if not row or all(not c.strip() for c in row):
                        start = reader.line_num + 1
                        continue
                    if len(row) != len(header):
                        raise InputError(path, start, f"{len(row)} fields, header has {len(header)}")
                    yield Record(index, start, dict(zip(header, row)))
                    index, start = index + 1, reader.line_num + 1
            except csv.Error as exn:
                raise InputError(path, reader.line_num, f"bad CSV: {exn}") from None
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(path, None, "reading .parquet needs pyarrow (pip install pyarrow), "
                         "or convert the file to .jsonl or .csv") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exn:  # pyarrow raises its own error types for a bad file
        raise InputError(path, None, f"not a readable parquet file: {exn}") from None
    _missing(path, None, pf.schema_arrow.names, required, "schema", one_of)
    index = 0
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            yield Record(index, index + 1, row)
            index += 1


# ---------------------------------------------------------------- planning and writing shards

@dataclass
class Item:
    key: str
    fields: dict
    meta: dict            # {"source": input file name, "line": n}
    failure: str | None   # decided before any worker sees it (duplicate_key, empty_key)


def plan_items(records: Iterable[Record], source: str, key_col: str | None) -> Iterator[Item]:
    """Give each record its key; the second record with a key already used fails `duplicate_key`.

    Keys: the `key_col` value mapped to [0-9A-Za-z_-] (`sanitize_key`), or the record index as
    %09d. Duplicates are found over the whole file, in file order, so they do not depend on
    workers or on resuming.
    """
    seen: set[str] = set()
    for rec in records:
        key = sanitize_key(rec.fields.get(key_col)) if key_col else f"{rec.index:09d}"
        failure = None
        if not key:
            failure = "empty_key"
        elif key in seen:
            failure = "duplicate_key"
        else:
            seen.add(key)
        yield Item(key, rec.fields, {"source": source, "line": rec.line}, failure)


def chunks(items: Iterable[Item], size: int) -> Iterator[tuple[int, list[Item]]]:
    """(shard index, items): consecutive runs of `size` items."""
    batch: list[Item] = []
    index = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield index, batch
            batch, index = [], index + 1
    if batch:
        yield index, batch


def describe(make_sample: SampleFn) -> str:
    """A stable description of a sample function and its bound settings (for fingerprints)."""
    if isinstance(make_sample, functools.partial):
        args = [repr(a) for a in make_sample.args]
        args += [f"{k}={v!r}" for k, v in sorted(make_sample.keywords.items())]
        return f"{describe(make_sample.func)}({', '.join(args)})"
    return f"{getattr(make_sample, '__module__', '')}.{getattr(make_sample, '__qualname__', repr(make_sample))}"


def fingerprint(items: Sequence[Item], recipe: str) -> str:
    """sha256 of a shard's input items and the recipe that turns them into samples: a resumed
    build reuses a shard only when both are unchanged."""
    h = hashlib.sha256(recipe.encode())
    for item in items:
        h.update(json.dumps([item.key, item.fields, item.meta, item.failure], sort_keys=True,
                            default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_shard(output: str | os.PathLike, index: int, items: Sequence[Item], make_sample: SampleFn,
                input_sha256: str | None = None, provenance: dict | None = None) -> dict:
    """Write shard `index` from its items; a SampleError skips one item, counted by reason.

    The stats file records `input_sha256` (see `fingerprint`) and `provenance` ({modality, input}:
    which build the shard belongs to, see `foreign_shards`)."""
    extra = {"input_sha256": input_sha256} if input_sha256 else {}
    extra.update(provenance or {})
    with ShardWriter(output, index, extra_stats=extra) as writer:
        for item in items:
            if item.failure:
                writer.fail(item.failure)
                continue
            try:
                writer.write(item.key, make_sample(item.key, item.fields, item.meta))
            except SampleError as exn:
                writer.fail(exn.reason)
    return writer.stats


@dataclass
class BuildResult:
    names: list[str]          # shard file names, in order
    stats: list[dict]         # stats of each shard
    written: int              # shards written by this run
    reused: int               # complete shards kept from an earlier run
    records_written: int      # records in the shards written by this run
    seconds: float


def build_shards(items: Iterable[Item], make_sample: SampleFn, output: Path, *,
                 samples_per_shard: int, workers: int, progress: bool = True,
                 desc: str = "", provenance: dict | None = None) -> BuildResult:
    """Write every shard of `items` that is not already complete; whole shards per worker.

    An exception while reading the items (InputError) or writing a shard stops new work, lets the
    shards in flight finish, and is raised: complete shards stay complete.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    stats: dict[int, dict] = {}
    written = reused = records_written = 0
    executor: cf.ProcessPoolExecutor | None = None
    pending: dict[cf.Future, tuple[int, int]] = {}
    bar = tqdm(desc=desc, unit="rec", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def finish(done: Iterable[cf.Future], quiet: bool = False) -> None:
        nonlocal written, records_written
        for fut in done:
            index, n = pending.pop(fut)
            try:
                stats[index] = fut.result()
            except BaseException as exn:
                if quiet:  # already unwinding from another error: that one is reported
                    continue
                raise CliError(f"shard {shard_name(index)} failed: {type(exn).__name__}: {exn}") from exn
            written, records_written = written + 1, records_written + n
            bar.update(n)

    def drain(quiet: bool) -> None:
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            finish(done, quiet)

    recipe = f"{describe(make_sample)} samples_per_shard={samples_per_shard}"
    try:
        for index, batch in chunks(items, samples_per_shard):
            digest = fingerprint(batch, recipe)
            if is_shard_complete(output, index, len(batch), digest):
                stats[index] = read_shard_stats(output / shard_name(index))
                reused += 1
                bar.update(len(batch))
                continue
            if workers == 1:
                stats[index] = write_shard(output, index, batch, make_sample, digest, provenance)
                written, records_written = written + 1, records_written + len(batch)
                bar.update(len(batch))
                continue
            if executor is None:
                executor = cf.ProcessPoolExecutor(max_workers=workers)
            pending[executor.submit(write_shard, output, index, batch, make_sample, digest,
                                    provenance)] = (index, len(batch))
            if len(pending) >= 2 * workers:  # bound the records held in memory
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                finish(done)
        drain(quiet=False)
    except BaseException:
        # Bad input, a failed shard or Ctrl-C: the shards in flight still complete (or their
        # temporary files are dropped), so every shard on disk is whole.
        drain(quiet=True)
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    order = sorted(stats)
    return BuildResult([shard_name(i) for i in order], [stats[i] for i in order], written, reused,
                       records_written, time.perf_counter() - t0)


# ---------------------------------------------------------------- shared builder arguments

def add_build_arguments(p: argparse.ArgumentParser, *, text_col: str = "text",
                        text_help: str = "column holding the text", text_flag: str = "--text-col",
                        samples_per_shard: int = 1000) -> None:
    """The flags every builder takes: input/output, columns, sharding, workers, progress.

    The text column's flag is `text_flag` (`--caption-col`, `--question-col`), always stored as
    `args.text_col`.
    """
    p.add_argument("--input", required=True, metavar="FILE",
                   help=f"input records: {', '.join(INPUT_FORMATS)} (.parquet needs pyarrow)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="dataset directory for the shards (created): one modality from one input "
                        "file; the same command again resumes, another input there is refused "
                        "(see --overwrite)")
    p.add_argument(text_flag, dest="text_col", default=text_col, metavar="COL",
                   help=f"{text_help} (default: {text_col}"
                        + ("; ignored by .txt input)" if text_flag == "--text-col" else ")"))
    p.add_argument("--key-col", default=None, metavar="COL",
                   help="column whose value becomes the sample key, mapped to [0-9A-Za-z_-] "
                        "(default: the record index, %%09d)")
    p.add_argument("--samples-per-shard", type=int_at_least(1), default=samples_per_shard,
                   metavar="N", help="input records per shard; record i goes to shard i // N "
                                     f"(default: {samples_per_shard})")
    p.add_argument("--workers", type=int_at_least(1), default=default_workers(), metavar="N",
                   help="worker processes, each writing whole shards (default: CPUs, at most 8)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the shards and index.json already in --output, whatever built "
                        "them, then build anew (without it, a directory holding shards of another "
                        "input is refused, and one holding shards of this input is resumed)")


def _summary_line(modality: str, source: str, output: Path, result: BuildResult) -> str:
    count = sum(s["count"] for s in result.stats)
    successes = sum(s["successes"] for s in result.stats)
    failures: Counter[str] = Counter()
    for s in result.stats:
        failures.update(s.get("failures", {}))
    failed = sum(failures.values())
    reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(failures.items(), key=lambda x: (-x[1], x[0])))
    rate = result.records_written / result.seconds if result.seconds > 0 else 0.0
    return (f"{modality}: {count:,} records from {source} -> {successes:,} samples in "
            f"{len(result.names)} shards at {output} ({result.written} written, {result.reused} "
            f"reused); {failed:,} failed" + (f" ({reasons})" if failed else "")
            + (f"; {rate:,.0f} samples/s over {result.seconds:.1f} s" if result.written else
               "; nothing left to write")
            + f"; index: {output / 'index.json'}")


def run_build(args: argparse.Namespace, modality: str, make_sample: SampleFn,
              columns: Sequence = (), *, one_of: Sequence[str] = (),
              inspect: Callable[[Record], None] | None = None, text_or: str | None = None) -> int:
    """Read --input, write the shards of `modality` into --output, write index.json, summarise.

    `columns`: extra columns each record must have (the text column always must, or `text_or`);
    `one_of`: columns of which each record must have at least one (see `read_records`). `inspect(record)`
    sees every record in the main process, in file order, and may raise InputError.

    --output holds the shards of one build: this modality from this input file (its resolved
    path, recorded in every shard's stats). Shards of any other build there are refused before
    anything is written, unless --overwrite deletes them first; shards of this build are reused
    when their records and settings are unchanged, rewritten otherwise, and those beyond the
    input's last shard (a longer earlier version of the file) removed, so that index.json lists
    exactly the shards a reader of the directory sees.
    """
    source = Path(args.input)
    output = Path(args.output)
    if not source.is_file():
        raise CliError(f"--input: no such file: '{source}'")
    if source.suffix.lower() not in INPUT_FORMATS:
        raise CliError(f"--input: unknown format '{source.name}' (expected {', '.join(INPUT_FORMATS)})")
    if output.exists() and not output.is_dir():
        raise CliError(f"--output: '{output}' exists and is not a directory")
    overwrite = getattr(args, "overwrite", False)
    try:
        index = read_index(output) if output.is_dir() and not overwrite else None
    except ValueError as exn:
        raise CliError(f"{exn}; or pass --overwrite to replace it") from None
    if index is not None and index.get("modality") != modality:
        raise CliError(f"--output: '{output}' holds {index.get('modality')} shards (index.json); "
                       f"give another directory for {modality}, or --overwrite to replace them")
    key_cols = [args.key_col] if args.key_col else []
    records = read_records(source, args.text_col, [*columns, *key_cols], one_of, text_or)
    # Read the first record before creating or deleting anything, so a bad input leaves the
    # directory as it was (and creates no empty one).
    first = next(records, None)
    if first is None:
        raise InputError(source, None, "no records")
    provenance = {"modality": modality, "input": str(source.resolve())}
    if overwrite:
        removed = remove_shards(output)
        if removed:
            print(f"{PROG} {modality}: --overwrite: removed {removed} shard(s) from {output}",
                  file=sys.stderr)
    else:
        foreign = foreign_shards(output, lambda stats: all(stats.get(k) == v
                                                           for k, v in provenance.items()))
        if foreign:
            names = ", ".join(n for n, _ in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CliError(f"--output: '{output}' already holds {len(foreign)} shard(s) not built "
                           f"from this input ({names}: {shard_origin(foreign[0][1])}); give another "
                           f"--output, or pass --overwrite to delete them and build anew")
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.tmp"):  # left by an interrupted run
        stale.unlink()

    def all_records():
        for rec in itertools.chain([first], records):
            if inspect is not None:
                inspect(rec)
            yield rec

    result = build_shards(plan_items(all_records(), source.name, args.key_col), make_sample, output,
                          samples_per_shard=args.samples_per_shard, workers=args.workers,
                          progress=not args.no_progress, desc=f"{modality} -> {output}",
                          provenance=provenance)
    # Every other shard here is this input's too (see above): left from a longer earlier file.
    surplus = sorted(set(os.path.basename(p) for p in shards_in_dir(str(output))) - set(result.names))
    for name in surplus:
        _remove_shard(output, name)
    if surplus:
        print(f"{PROG} {modality}: removed {len(surplus)} shard(s) left by an earlier, longer build "
              f"of this input ({', '.join(surplus[:3])}{', ...' if len(surplus) > 3 else ''})",
              file=sys.stderr)
    write_index(output, modality, names=result.names,
                counts={n: s["successes"] for n, s in zip(result.names, result.stats)})
    print(_summary_line(modality, source.name, output, result))
    return 0


# ---------------------------------------------------------------- --overwrite

def _remove_shard(directory: Path, name: str) -> None:
    """Delete a shard's stats file, then the tar: never a stats file that vouches for no tar."""
    (directory / stats_name(name)).unlink(missing_ok=True)
    (directory / name).unlink(missing_ok=True)


def remove_shards(directory: Path) -> int:
    """`--overwrite`: delete every `*.tar` in `directory` with its stats, stats files of our
    NNNNNN naming left without a tar, temporary files of an interrupted write, and index.json;
    other files stay. Returns the number of tars deleted."""
    if not directory.is_dir():
        return 0
    names = [os.path.basename(p) for p in shards_in_dir(directory)]
    (directory / INDEX_NAME).unlink(missing_ok=True)   # first: it must not list deleted shards
    for name in names:
        _remove_shard(directory, name)
    for path in directory.iterdir():
        if path.name.endswith(".tmp") or re.fullmatch(r"\d{6}_stats\.json", path.name):
            path.unlink()
    return len(names)


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


def _configure_text(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, text_help="column holding the document")
    p.add_argument("--min-chars", type=int_at_least(0), default=1, metavar="N",
                   help="documents with fewer characters (stripped) fail as too_short (default: 1)")


@register("text", "build text shards (KEY.txt + KEY.json) from .jsonl/.txt/.csv/.parquet",
          _configure_text)
def run_text(args: argparse.Namespace) -> int:
    make = functools.partial(make_text_sample, text_col=args.text_col, min_chars=args.min_chars)
    return run_build(args, "text", make)


# ---------------------------------------------------------------- media: shared by images, videos, vqa

@dataclass(frozen=True)
class ImageOptions:
    """How `images` and `vqa` store a picture (repr is part of the resume fingerprint)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = 0                 # 0 = keep the size
    resize_mode: str = "keep_ratio"   # images.RESIZE_MODES
    format: str = "keep"              # keep | jpg | png | webp
    quality: int = 90


@dataclass(frozen=True)
class VideoOptions:
    """How `videos` and `vqa` store a clip (repr is part of the resume fingerprint)."""

    reencode: bool = True
    fps: float = 0.0                  # 0 = the source's average rate
    max_side: int = 0                 # 0 = keep the size (made even and decord-safe)
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


def store_image(data: bytes, opts: ImageOptions, formats: Sequence[str] = ENCODINGS
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
        stored = transcode(data, fps=opts.fps, max_side=opts.max_side, crf=opts.crf,
                           keyframe_interval=opts.keyframe_interval, preset=opts.preset)
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
        raise SampleError("unsupported_format", f"a {name} container: --copy stores mp4 files "
                                                f"only (use --reencode)")
    return _video_info(measure_video(data))


def _video_info(meta) -> dict:
    """A `VideoMeta` as the sample's json fields, in their stored order."""
    return {"fps": meta.fps, "n_frames": meta.n_frames, "duration": meta.duration,
            "width": meta.width, "height": meta.height}


def make_image_sample(key: str, fields: dict, meta: dict, *, caption_col: str, image_col: str,
                      base: str, image: ImageOptions) -> dict:
    """An image-caption record -> {jpg|png|webp, txt: caption, json: {width, height, source}}."""
    caption = media_text(fields, caption_col, "empty_caption")
    ext, data, size = store_image(read_media(fields.get(image_col), base), image)
    return {ext: data, "txt": caption, "json": {**size, "source": fields[image_col]}}


def make_video_sample(key: str, fields: dict, meta: dict, *, caption_col: str, video_col: str,
                      base: str, video: VideoOptions) -> dict:
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


VQA_IMAGE_FORMATS = ("jpg", "png")   # SPEC §4: a vqa sample's picture is .jpg or .png


def _filled(fields: dict, col: str | None) -> bool:
    """The record names a file in `col`: a non-blank string."""
    return col is not None and isinstance(fields.get(col), str) and fields[col].strip() != ""


def vqa_turn(fields: dict, question_col: str, answer_col: str, choices_col: str,
             type_col: str | None) -> dict:
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
    if not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(t, dict) for t in value):
        raise SampleError("bad_turns", "expected a non-empty list of {question, answer, choices[, type]}")
    return list(value)


def make_vqa_sample(key: str, fields: dict, meta: dict, *, question_col: str, answer_col: str,
                    choices_col: str, type_col: str | None, image_col: str | None,
                    video_col: str | None, base: str, image: ImageOptions,
                    video: VideoOptions, turns_col: str | None = None) -> dict:
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
    if _filled(fields, image_col) and _filled(fields, video_col):
        raise SampleError("ambiguous_media", f"both '{image_col}' and '{video_col}' are set")
    if _filled(fields, video_col) or image_col is None:
        data, measured = store_video(read_media(fields.get(video_col), base), video)
        return {"mp4": data, "json": {**info, "source": fields[video_col], **measured}}
    ext, data, measured = store_image(read_media(fields.get(image_col), base), image,
                                      VQA_IMAGE_FORMATS)
    return {ext: data, "json": {**info, "source": fields[image_col], **measured}}


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


def _add_media_path_arguments(p: argparse.ArgumentParser, image: bool, video: bool,
                              either: bool = False) -> None:
    note = "; each record's media is whichever of --image-col / --video-col it fills" if either else ""
    if image:
        p.add_argument("--image-col", default="image", metavar="COL",
                       help="column with the image file path, relative to the input file's "
                            f"directory (default: image{note})")
    if video:
        p.add_argument("--video-col", default="video", metavar="COL",
                       help="column with the video file path, relative to the input file's "
                            f"directory (default: video{note})")


EXTENSION_NAMES = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _add_image_arguments(p: argparse.ArgumentParser, formats: Sequence[str] = ENCODINGS) -> None:
    kept = "/".join(EXTENSION_NAMES[f] for f in formats)
    converted = "GIF, BMP -> png" if "webp" in formats else "WEBP, GIF, BMP -> png, lossless"
    g = p.add_argument_group("images")
    g.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="images whose header says more pixels fail as too_many_pixels before "
                        f"decoding (default: {DEFAULT_MAX_PIXELS:,}; Pillow's own bomb limit of "
                        f"{Image.MAX_IMAGE_PIXELS:,} also applies and is never raised)")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio",
                   help="keep_ratio: longer side <= --max-side, never enlarged; center_crop / pad: "
                        "exactly --max-side squared (cropped / padded with white); none: as is "
                        "(default: keep_ratio)")
    g.add_argument("--format", choices=("keep", *formats), default="keep",
                   help=f"stored image format, one of {', '.join(formats)}; keep stores the "
                        f"original bytes of an unchanged {kept} and re-encodes the rest in their "
                        f"format ({converted}) (default: keep)")
    g.add_argument("--quality", type=_quality, default=90, metavar="Q",
                   help=f"{'/'.join(EXTENSION_NAMES[f] for f in formats if f != 'png')} quality "
                        f"1-100 when encoding (default: 90)")


def _add_video_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("videos")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--reencode", dest="reencode", action="store_true", default=True,
                      help="re-encode to H.264 mp4 (libx264, yuv420p, no audio, deterministic) "
                           "(default)")
    mode.add_argument("--copy", dest="reencode", action="store_false",
                      help="store the input mp4 bytes unchanged (after a full decode check); "
                           "--fps, --max-side, --crf... are ignored for videos")
    g.add_argument("--fps", type=_fps, default=0.0, metavar="F",
                   help="frame rate of re-encoded videos, frames dropped or repeated "
                        "(default: 0 = the source's average rate)")
    g.add_argument("--keyframe-interval", type=int_at_least(1), default=8, metavar="N",
                   help="a keyframe every N frames: a short GOP makes seeking cheap (default: 8)")
    g.add_argument("--crf", type=int_at_least(0), default=23, metavar="N",
                   help="x264 constant rate factor, 0 (lossless) .. 51 (default: 23)")
    g.add_argument("--preset", default="medium",
                   choices=("ultrafast", "superfast", "veryfast", "faster", "fast", "medium",
                            "slow", "slower", "veryslow"),
                   help="x264 speed/size preset (default: medium)")


def _add_max_side(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-side", type=int_at_least(0), default=0, metavar="N",
                   help=f"{what} (default: 0 = keep the size)")


def _image_options(args) -> ImageOptions:
    return ImageOptions(max_pixels=args.max_pixels, max_side=args.max_side,
                        resize_mode=args.resize_mode, format=args.format, quality=args.quality)


def _video_options(args, check_encoder: bool = True) -> VideoOptions:
    if args.crf > 51:
        raise CliError(f"--crf: must be <= 51, got {args.crf}")
    if check_encoder and args.reencode and not encoder_available("libx264"):
        raise CliError("--reencode needs PyAV built with libx264 (pip install av); "
                       "or store the files as they are with --copy")
    return VideoOptions(reencode=args.reencode, fps=args.fps, max_side=args.max_side,
                        keyframe_interval=args.keyframe_interval, crf=args.crf, preset=args.preset)


def _require_pyav(command: str) -> None:
    if not backend_available("pyav"):
        raise CliError(f"{command} needs PyAV to read and write videos: pip install av "
                       f"(or install the project with the 'pyav' extra)")


def _input_base(args) -> str:
    return str(Path(args.input).resolve().parent)


def _configure_images(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, text_col="caption", text_flag="--caption-col",
                        text_help="column holding the caption")
    _add_media_path_arguments(p, image=True, video=False)
    _add_max_side(p, "resize so that the image fits --resize-mode at this size")
    _add_image_arguments(p)


@register("images", "build image-caption shards (KEY.jpg|png|webp + KEY.txt + KEY.json) from "
          ".jsonl/.csv/.parquet listing local image files", _configure_images)
def run_images(args: argparse.Namespace) -> int:
    make = functools.partial(make_image_sample, caption_col=args.text_col, image_col=args.image_col,
                             base=_input_base(args), image=_image_options(args))
    return run_build(args, "image", make, [args.image_col])


def _configure_videos(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, text_col="caption", text_flag="--caption-col",
                        text_help="column holding the caption", samples_per_shard=100)
    _add_media_path_arguments(p, image=False, video=True)
    _add_max_side(p, "re-encoded videos: the longer side at most N pixels, never enlarged; "
                     "sizes are made even, and widths decord 0.6.0 misreads avoided")
    _add_video_arguments(p)


@register("videos", "build video-caption shards (KEY.mp4 + KEY.txt + KEY.json) from "
          ".jsonl/.csv/.parquet listing local video files", _configure_videos)
def run_videos(args: argparse.Namespace) -> int:
    _require_pyav("fusion-data videos")
    make = functools.partial(make_video_sample, caption_col=args.text_col, video_col=args.video_col,
                             base=_input_base(args), video=_video_options(args))
    return run_build(args, "video", make, [args.video_col])


def _configure_vqa(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, text_col="question", text_flag="--question-col",
                        text_help="column holding the question")
    p.add_argument("--answer-col", default="answer", metavar="COL",
                   help="column holding the answer, one of the choices (default: answer)")
    p.add_argument("--choices-col", default="choices", metavar="COL",
                   help="column holding the choices: a JSON list or 'a|b|c' (default: choices)")
    p.add_argument("--type-col", default="type", metavar="COL",
                   help="column holding the question type, used to group accuracy; a record "
                        "without it (or with it empty) has type 'default' (default: type)")
    p.add_argument("--turns-col", default="turns", metavar="COL",
                   help="column holding several questions about the record's media, a list of "
                        "{question, answer, choices[, type]} (JSON in a CSV cell): a "
                        "conversation trained as one sample, the loss on every answer; a record "
                        "that fills it needs no question, answer or choices (default: turns)")
    _add_media_path_arguments(p, image=True, video=True, either=True)
    _add_max_side(p, "images: as for `fusion-data images`; videos: as for `fusion-data videos`")
    _add_image_arguments(p, VQA_IMAGE_FORMATS)
    _add_video_arguments(p)


@register("vqa", "build VQA shards (KEY.jpg|png or KEY.mp4 + KEY.json {question, answer, "
          "choices, type}) from .jsonl/.csv/.parquet", _configure_vqa)
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
        except SampleError:               # counted when the record is built
            turns = None
        if turns is not None:             # a conversation: typed when every turn is
            untyped += not all(isinstance(t, dict) and str(t.get("type") or "").strip()
                               for t in turns)
        else:
            value = rec.fields.get(args.type_col)
            untyped += value is None or not str(value).strip()
        if not video_checked and _filled(rec.fields, args.video_col):
            # Only an input with videos needs PyAV: checked at its first video, named by line.
            try:
                _require_pyav("fusion-data vqa with videos")
                _video_options(args)
            except CliError as exn:
                raise InputError(source, rec.line, f"a video question, but {exn}") from None
            video_checked = True

    make = functools.partial(
        make_vqa_sample, question_col=args.text_col, answer_col=args.answer_col,
        choices_col=args.choices_col, type_col=args.type_col, image_col=args.image_col,
        video_col=args.video_col, base=_input_base(args), image=_image_options(args),
        video=_video_options(args, check_encoder=False), turns_col=args.turns_col)
    status = run_build(args, "vqa", make, [(args.answer_col, args.turns_col),
                                           (args.choices_col, args.turns_col)],
                       one_of=[args.image_col, args.video_col], inspect=inspect,
                       text_or=args.turns_col)
    if untyped:
        print(f"{PROG} vqa: note: {untyped:,} of {total:,} records in {source.name} have no "
              f"'{args.type_col}' column or leave it empty: their type is 'default'",
              file=sys.stderr)
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


@register("toy", "generate the offline toy corpora (text, image-caption, video-caption) and "
          "toy VQA train/test sets, already sharded", _configure_toy)
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


@register("tokenizer", "train a Hugging Face tokenizer.json (byte-level BPE or word-level) with "
          "fusion's special tokens on the text of shard directories", _configure_tokenizer)
def run_tokenizer_command(args: argparse.Namespace) -> int:
    from fusion.data.tokenizer_train import run_tokenizer

    return run_tokenizer(args)


# ---------------------------------------------------------------- verify

def _verify_modality(directory: Path, paths: list[str], given: str | None) -> str:
    if given:
        return given
    try:
        index = read_index(directory)
    except ValueError:
        index = None  # rewritten below
    if index and index.get("modality") in SHARD_KINDS:
        return index["modality"]
    for path in paths:
        for sample in iter_samples([path], ErrorCounter()):
            guess = guess_modality(sample)
            if guess:
                return guess
    raise CliError(f"cannot tell the modality of '{directory}' (no index.json, no readable "
                   f"sample); pass --modality")


def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="dataset directory of *.tar shards")
    p.add_argument("--modality", choices=SHARD_KINDS, default=None,
                   help="modality to check against (default: from index.json, else guessed "
                        "from the members of the first sample)")
    p.add_argument("--workers", type=int_at_least(1), default=default_workers(), metavar="N",
                   help="processes reading shards in parallel (default: CPUs, at most 8)")
    p.add_argument("--max-problems", type=int_at_least(0), default=20, metavar="N",
                   help="problems listed one per line before the summary (default: 20)")
    p.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="images with more pixels fail as too_many_pixels, as in the builders "
                        f"(default: {DEFAULT_MAX_PIXELS:,})")


@register("verify", "read every shard, check keys and members (decoding every image and video), "
          "(re)write index.json", _configure_verify)
def run_verify(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise CliError(f"DIR: no such directory: '{directory}'")
    paths = shards_in_dir(str(directory))
    if not paths:
        raise CliError(f"DIR: no .tar shards in '{directory}'")
    modality = _verify_modality(directory, paths, args.modality)
    if args.workers > 1 and len(paths) > 1:
        import webdataset  # noqa: F401  (seconds, with torch: once here, not in every worker)

        with cf.ProcessPoolExecutor(max_workers=min(args.workers, len(paths))) as ex:
            reports = list(ex.map(verify_shard, paths, [modality] * len(paths),
                                  [args.max_pixels] * len(paths)))
    else:
        reports = [verify_shard(p, modality, args.max_pixels) for p in paths]

    lines: list[str] = []
    reasons: Counter[str] = Counter()
    first_seen: dict[str, str] = {}
    bad_shards = 0
    for rep in reports:
        for reason, n in rep.unreadable.items():
            reasons[reason] += n
            lines.append(f"{directory / rep.name}: unreadable after {rep.n_samples} samples: "
                         f"{rep.message or reason}")
        for key in rep.keys:
            if key in first_seen:
                rep.problems.append((key, f"duplicate_key (also in {first_seen[key]})"))
            else:
                first_seen[key] = rep.name
        for key, reason in rep.problems:
            reasons[reason.split(" ")[0].rstrip(":")] += 1
            lines.append(f"{directory / rep.name}: " + (f"key {key}: " if key else "") + reason)
        bad_shards += bool(rep.unreadable or rep.problems)
    for line in lines[: args.max_problems]:
        print(line)
    if len(lines) > args.max_problems:
        print(f"... and {len(lines) - args.max_problems} more")

    index = write_index(directory, modality, names=[r.name for r in reports],
                        counts={r.name: r.n_samples for r in reports})
    size = sum(s["bytes"] for s in index["shards"])
    head = (f"verify {directory}: {modality}, {len(reports)} shards, {index['n_samples']:,} samples, "
            f"{size / 1e6:,.1f} MB; wrote {directory / 'index.json'}")
    if not reasons:
        print(f"{head}; OK")
        return 0
    detail = ", ".join(f"{r}: {n:,}" for r, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0])))
    print(f"{head}; FAILED: {sum(reasons.values()):,} problems in {bad_shards} shards ({detail})")
    return 1


# ---------------------------------------------------------------- stats

def _configure_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="dataset directory of *.tar shards and *_stats.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


@register("stats", "summarise counts, failures by reason, bytes and shards from *_stats.json",
          _configure_stats)
def run_stats(args: argparse.Namespace) -> int:
    try:
        summary = collect_stats(args.dir)
    except (FileNotFoundError, ValueError) as exn:
        raise CliError(f"DIR: {exn}") from None
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    failed = sum(summary["failures"].values())
    reasons = ", ".join(f"{r}: {n:,}" for r, n in
                        sorted(summary["failures"].items(), key=lambda x: (-x[1], x[0])))
    text = (f"{summary['dir']}: {summary['modality'] or 'unknown modality (no index.json)'}, "
            f"{summary['shards']} shards, {summary['bytes'] / 1e6:,.1f} MB; "
            f"{summary['count']:,} records -> {summary['successes']:,} samples; {failed:,} failed"
            + (f" ({reasons})" if failed else ""))
    if summary["index_n_samples"] is not None:
        text += f"; index.json: {summary['index_n_samples']:,} samples"
    if summary["shards_without_stats"]:
        n = len(summary["shards_without_stats"])
        text += (f"; {n} shard(s) without stats (incomplete or written by another tool): "
                 + ", ".join(summary["shards_without_stats"][:3]) + (", ..." if n > 3 else ""))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
