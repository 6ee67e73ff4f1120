"""`fusion-data`: build WebDataset shards, verify them, summarise them.

    fusion-data text --input docs.jsonl --output data/text --samples-per-shard 1000 --workers 4
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

Adding a builder (`images`, `videos`, `vqa`, `toy` come this way): a sample function
`make_sample(key, fields, meta) -> {ext: bytes | str | dict}` that raises `SampleError(reason)` for
a bad record, a `configure(parser)` that calls `add_build_arguments`, and a `run(args)` that calls
`run_build(args, modality, make_sample, columns)`; register the pair with `@register(name, help,
configure)`. `make_sample` is pickled to worker processes: a module-level function, or a
`functools.partial` of one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import functools
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from fusion.data.shards import (
    MODALITIES,
    ErrorCounter,
    SampleError,
    ShardWriter,
    check_sample,
    collect_stats,
    guess_modality,
    is_shard_complete,
    iter_samples,
    read_index,
    read_shard_stats,
    sanitize_key,
    shards_in_dir,
    shard_name,
    write_index,
)

PROG = "fusion-data"
INPUT_FORMATS = (".jsonl", ".txt", ".csv", ".parquet")

SampleFn = Callable[[str, dict, dict], dict]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


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


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Build, verify and summarise WebDataset shards "
                     "(one modality per directory; see SPEC §4 for the format).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
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


def read_records(path: str | os.PathLike, text_col: str, columns: Sequence[str] = ()
                 ) -> Iterator[Record]:
    """Records of a .jsonl / .txt / .csv / .parquet file, in order.

    `text_col` and `columns` must exist in every record (a .txt line is `{text_col: line}`);
    a missing column, an invalid JSON line, a ragged CSV row or an unreadable file raises
    InputError naming the file and line. Bytes that are not UTF-8 do not: they come through as
    lone surrogates (`surrogateescape`), and the sample function counts them as `bad_utf8`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    required = [text_col, *[c for c in columns if c != text_col]]
    readers = {".jsonl": _read_jsonl, ".txt": _read_txt, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise InputError(path, None, f"unknown input format '{suffix or path.name}' "
                         f"(expected {', '.join(INPUT_FORMATS)})")
    if suffix == ".txt" and len(required) > 1:
        raise InputError(path, None, f"a .txt input has one column per line; "
                         f"column(s) {', '.join(required[1:])} need .jsonl, .csv or .parquet")
    try:
        yield from readers[suffix](path, required)
    except InputError:
        raise
    except OSError as exn:
        raise InputError(path, None, f"cannot read: {exn.strerror or exn}") from exn


def _missing(path, line, fields: Iterable[str], required: Sequence[str], what: str):
    have = list(fields)
    for col in required:
        if col not in have:
            shown = ", ".join(map(str, have[:10])) + (", ..." if len(have) > 10 else "")
            raise InputError(path, line, f"missing column '{col}' in {what} (has: {shown or 'none'})")


def _read_jsonl(path: Path, required: Sequence[str]) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            text = raw.decode("utf-8", "surrogateescape").strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError as exn:
                raise InputError(path, line_no, f"invalid JSON: {exn}") from None
            if not isinstance(obj, dict):
                raise InputError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            _missing(path, line_no, obj, required, "record")
            yield Record(index, line_no, obj)
            index += 1


def _read_txt(path: Path, required: Sequence[str]) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            text = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if not text.strip():
                continue
            yield Record(index, line_no, {required[0]: text})
            index += 1


def _read_csv(path: Path, required: Sequence[str]) -> Iterator[Record]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # documents are longer than the 128 KiB default
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                if header is None:
                    raise InputError(path, 1, "empty file: expected a header row")
                _missing(path, 1, header, required, "header")
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


def _read_parquet(path: Path, required: Sequence[str]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(path, None, "reading .parquet needs pyarrow (pip install pyarrow), "
                         "or convert the file to .jsonl or .csv") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exn:  # pyarrow raises its own error types for a bad file
        raise InputError(path, None, f"not a readable parquet file: {exn}") from None
    _missing(path, None, pf.schema_arrow.names, required, "schema")
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
                input_sha256: str | None = None) -> dict:
    """Write shard `index` from its items; a SampleError skips one item, counted by reason."""
    extra = {"input_sha256": input_sha256} if input_sha256 else None
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
                 desc: str = "") -> BuildResult:
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
                stats[index] = write_shard(output, index, batch, make_sample, digest)
                written, records_written = written + 1, records_written + len(batch)
                bar.update(len(batch))
                continue
            if executor is None:
                executor = cf.ProcessPoolExecutor(max_workers=workers)
            pending[executor.submit(write_shard, output, index, batch, make_sample, digest)] = \
                (index, len(batch))
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
                        text_help: str = "column holding the text") -> None:
    """The flags every builder takes: input/output, columns, sharding, workers, progress."""
    p.add_argument("--input", required=True, metavar="FILE",
                   help=f"input records: {', '.join(INPUT_FORMATS)} (.parquet needs pyarrow)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="dataset directory for the shards (created; one modality per directory)")
    p.add_argument("--text-col", default=text_col, metavar="COL",
                   help=f"{text_help} (default: {text_col}; ignored by .txt input)")
    p.add_argument("--key-col", default=None, metavar="COL",
                   help="column whose value becomes the sample key, mapped to [0-9A-Za-z_-] "
                        "(default: the record index, %%09d)")
    p.add_argument("--samples-per-shard", type=_int_at_least(1), default=1000, metavar="N",
                   help="input records per shard; record i goes to shard i // N (default: 1000)")
    p.add_argument("--workers", type=_int_at_least(1), default=_default_workers(), metavar="N",
                   help="worker processes, each writing whole shards (default: CPUs, at most 8)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr")


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
              columns: Sequence[str] = ()) -> int:
    """Read --input, write the shards of `modality` into --output, write index.json, summarise.

    `columns`: extra columns each record must have (the text column always must).
    """
    source = Path(args.input)
    output = Path(args.output)
    if not source.is_file():
        raise CliError(f"--input: no such file: '{source}'")
    if source.suffix.lower() not in INPUT_FORMATS:
        raise CliError(f"--input: unknown format '{source.name}' (expected {', '.join(INPUT_FORMATS)})")
    if output.exists() and not output.is_dir():
        raise CliError(f"--output: '{output}' exists and is not a directory")
    try:
        index = read_index(output) if output.is_dir() else None
    except ValueError as exn:
        raise CliError(str(exn)) from None
    if index is not None and index.get("modality") != modality:
        raise CliError(f"--output: '{output}' holds {index.get('modality')} shards (index.json); "
                       f"give another directory for {modality}")
    key_cols = [args.key_col] if args.key_col else []
    records = read_records(source, args.text_col, [*columns, *key_cols])
    # Read the first record before creating anything, so a bad input leaves no empty directory.
    first = next(records, None)
    if first is None:
        raise InputError(source, None, "no records")
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.tmp"):  # left by an interrupted run
        stale.unlink()

    def all_records():
        yield first
        yield from records

    result = build_shards(plan_items(all_records(), source.name, args.key_col), make_sample, output,
                          samples_per_shard=args.samples_per_shard, workers=args.workers,
                          progress=not args.no_progress, desc=f"{modality} -> {output}")
    extra = sorted(set(os.path.basename(p) for p in shards_in_dir(str(output))) - set(result.names))
    if extra:
        print(f"{PROG}: warning: {output} also holds {len(extra)} shard(s) this input did not "
              f"produce ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); readers of the "
              f"directory will see them: remove them", file=sys.stderr)
    write_index(output, modality, names=result.names,
                counts={n: s["successes"] for n, s in zip(result.names, result.stats)})
    print(_summary_line(modality, source.name, output, result))
    return 0


# ---------------------------------------------------------------- text

def make_text_sample(key: str, fields: dict, meta: dict, *, text_col: str, min_chars: int) -> dict:
    """A text record -> {"txt": text, "json": other columns + source and line}.

    Failures: `empty_text` (missing, null or blank), `not_text` (a number, list...), `bad_utf8`
    (bytes that were not UTF-8 in the input), `too_short` (fewer than `min_chars` characters
    once stripped).
    """
    text = fields.get(text_col)
    if text is None:
        raise SampleError("empty_text")
    if not isinstance(text, str):
        raise SampleError("not_text", f"column '{text_col}' is {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SampleError("bad_utf8", f"column '{text_col}' is not UTF-8") from None
    stripped = text.strip()
    if not stripped:
        raise SampleError("empty_text")
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
    p.add_argument("--min-chars", type=_int_at_least(0), default=1, metavar="N",
                   help="documents with fewer characters (stripped) fail as too_short (default: 1)")


@register("text", "build text shards (KEY.txt + KEY.json) from .jsonl/.txt/.csv/.parquet",
          _configure_text)
def run_text(args: argparse.Namespace) -> int:
    make = functools.partial(make_text_sample, text_col=args.text_col, min_chars=args.min_chars)
    return run_build(args, "text", make)


# ---------------------------------------------------------------- verify

@dataclass
class ShardReport:
    name: str
    n_samples: int
    keys: list[str]
    problems: list[tuple[str, str]]   # (key or '', reason)
    unreadable: dict[str, int]        # reason -> n: the shard could not be read to its end
    message: str                      # first read error, for the report


def verify_shard(path: str, modality: str) -> ShardReport:
    """Read one shard completely and check every sample against `modality`'s contract."""
    counter = ErrorCounter(max_examples=1)
    keys, problems = [], []
    for sample in iter_samples([path], counter):
        key = sample["__key__"]
        keys.append(key)
        for reason in check_sample(sample, modality):
            problems.append((key, reason))
    read_errors = dict(counter.counts)
    stats = read_shard_stats(path)
    if stats is not None:
        if "successes" in stats and stats["successes"] != len(keys):
            problems.append(("", f"stats_mismatch: {stats['successes']} samples in stats, "
                                 f"{len(keys)} in the tar"))
        if "bytes" in stats and stats["bytes"] != os.path.getsize(path):
            problems.append(("", f"stats_mismatch: {stats['bytes']} bytes in stats, "
                                 f"{os.path.getsize(path)} on disk"))
    message = next((m[0] for m in counter.examples.values() if m), "")
    return ShardReport(os.path.basename(path), len(keys), keys, problems, read_errors, message)


def _verify_modality(directory: Path, paths: list[str], given: str | None) -> str:
    if given:
        return given
    try:
        index = read_index(directory)
    except ValueError:
        index = None  # rewritten below
    if index and index.get("modality") in MODALITIES:
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
    p.add_argument("--modality", choices=MODALITIES, default=None,
                   help="modality to check against (default: from index.json, else guessed "
                        "from the members of the first sample)")
    p.add_argument("--workers", type=_int_at_least(1), default=_default_workers(), metavar="N",
                   help="processes reading shards in parallel (default: CPUs, at most 8)")
    p.add_argument("--max-problems", type=_int_at_least(0), default=20, metavar="N",
                   help="problems listed one per line before the summary (default: 20)")


@register("verify", "read every shard, check keys and members, (re)write index.json", _configure_verify)
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
            reports = list(ex.map(verify_shard, paths, [modality] * len(paths)))
    else:
        reports = [verify_shard(p, modality) for p in paths]

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
