"""Writing a build's shards: records -> keys -> shards written by worker processes, resume,
whose output directory it is (and --overwrite), index.json, the summary line.

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
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fusion.cli import CliError
from fusion.data.build.readers import INPUT_FORMATS, InputError, Record, read_records
from fusion.data.shards import (
    INDEX_NAME,
    SampleError,
    foreign_shards,
    is_shard_complete,
    read_index,
    read_shard_stats,
    sanitize_key,
    shard_name,
    shard_origin,
    shards_in_dir,
    stats_name,
    write_index,
)
from fusion.data.tar import ShardWriter

PROG = "fusion-data"  # the command in the notes a build prints

# A sample maker (`fusion.data.build.makers`): (key, fields, meta) -> {ext: bytes | str | dict};
# it runs in worker processes, so it is a module-level function or a functools.partial of one.
SampleFn = Callable[[str, dict, dict], dict]


# ---------------------------------------------------------------- planning and writing shards


@dataclass
class Item:
    key: str
    fields: dict
    meta: dict  # {"source": input file name, "line": n}
    failure: str | None  # decided before any worker sees it (duplicate_key, empty_key)


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
    return (
        f"{getattr(make_sample, '__module__', '')}.{getattr(make_sample, '__qualname__', repr(make_sample))}"
    )


def fingerprint(items: Sequence[Item], recipe: str) -> str:
    """sha256 of a shard's input items and the recipe that turns them into samples: a resumed
    build reuses a shard only when both are unchanged."""
    h = hashlib.sha256(recipe.encode())
    for item in items:
        h.update(
            json.dumps([item.key, item.fields, item.meta, item.failure], sort_keys=True, default=str).encode()
        )
        h.update(b"\n")
    return h.hexdigest()


def write_shard(
    output: str | os.PathLike,
    index: int,
    items: Sequence[Item],
    make_sample: SampleFn,
    input_sha256: str | None = None,
    provenance: dict | None = None,
) -> dict:
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
    names: list[str]  # shard file names, in order
    stats: list[dict]  # stats of each shard
    written: int  # shards written by this run
    reused: int  # complete shards kept from an earlier run
    records_written: int  # records in the shards written by this run
    seconds: float


class _ShardWriters:
    """Writes the shards handed to `write`: in this process with one worker, else in a process pool
    (started at the first shard) with at most 2 x workers shards in flight, to bound the records
    held in memory. Each finished shard's stats go into `stats` (by shard index) and its records
    onto the progress bar; a shard that fails raises CliError naming it."""

    def __init__(
        self, output: Path, make_sample: SampleFn, provenance: dict | None, workers: int, stats: dict, bar
    ):
        self.output, self.make_sample, self.provenance = output, make_sample, provenance
        self.workers, self.stats, self.bar = workers, stats, bar
        self.written = self.records_written = 0
        self.executor: cf.ProcessPoolExecutor | None = None
        self.pending: dict[cf.Future, tuple[int, int]] = {}

    def write(self, index: int, batch: list[Item], digest: str) -> None:
        args = (self.output, index, batch, self.make_sample, digest, self.provenance)
        if self.workers == 1:
            self.stats[index] = write_shard(*args)
            self.written, self.records_written = self.written + 1, self.records_written + len(batch)
            self.bar.update(len(batch))
            return
        if self.executor is None:
            self.executor = cf.ProcessPoolExecutor(max_workers=self.workers)
        self.pending[self.executor.submit(write_shard, *args)] = (index, len(batch))
        if len(self.pending) >= 2 * self.workers:  # bound the records held in memory
            done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            self._finish(done)

    def _finish(self, done: Iterable[cf.Future], quiet: bool = False) -> None:
        for fut in done:
            index, n = self.pending.pop(fut)
            try:
                self.stats[index] = fut.result()
            except BaseException as exn:
                if quiet:  # already unwinding from another error: that one is reported
                    continue
                raise CliError(f"shard {shard_name(index)} failed: {type(exn).__name__}: {exn}") from exn
            self.written, self.records_written = self.written + 1, self.records_written + n
            self.bar.update(n)

    def drain(self, quiet: bool) -> None:
        """Wait for every shard in flight; `quiet`: while unwinding, their errors are dropped."""
        while self.pending:
            done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            self._finish(done, quiet)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def build_shards(
    items: Iterable[Item],
    make_sample: SampleFn,
    output: Path,
    *,
    samples_per_shard: int,
    workers: int,
    progress: bool = True,
    desc: str = "",
    provenance: dict | None = None,
) -> BuildResult:
    """Write every shard of `items` that is not already complete; whole shards per worker.

    An exception while reading the items (InputError) or writing a shard stops new work, lets the
    shards in flight finish, and is raised: complete shards stay complete.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    stats: dict[int, dict] = {}
    reused = 0
    bar = tqdm(desc=desc, unit="rec", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    writers = _ShardWriters(output, make_sample, provenance, workers, stats, bar)
    recipe = f"{describe(make_sample)} samples_per_shard={samples_per_shard}"
    try:
        for index, batch in chunks(items, samples_per_shard):
            digest = fingerprint(batch, recipe)
            if is_shard_complete(output, index, len(batch), digest):
                stats[index] = read_shard_stats(output / shard_name(index))
                reused += 1
                bar.update(len(batch))
                continue
            writers.write(index, batch, digest)
        writers.drain(quiet=False)
    except BaseException:
        # Bad input, a failed shard or Ctrl-C: the shards in flight still complete (or their
        # temporary files are dropped), so every shard on disk is whole.
        writers.drain(quiet=True)
        raise
    finally:
        writers.shutdown()
        bar.close()
    order = sorted(stats)
    return BuildResult(
        [shard_name(i) for i in order],
        [stats[i] for i in order],
        writers.written,
        reused,
        writers.records_written,
        time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- one build, from the command line


def _summary_line(modality: str, source: str, output: Path, result: BuildResult) -> str:
    count = sum(s["count"] for s in result.stats)
    successes = sum(s["successes"] for s in result.stats)
    failures: Counter[str] = Counter()
    for s in result.stats:
        failures.update(s.get("failures", {}))
    failed = sum(failures.values())
    reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(failures.items(), key=lambda x: (-x[1], x[0])))
    rate = result.records_written / result.seconds if result.seconds > 0 else 0.0
    return (
        f"{modality}: {count:,} records from {source} -> {successes:,} samples in "
        f"{len(result.names)} shards at {output} ({result.written} written, {result.reused} "
        f"reused); {failed:,} failed"
        + (f" ({reasons})" if failed else "")
        + (
            f"; {rate:,.0f} samples/s over {result.seconds:.1f} s"
            if result.written
            else "; nothing left to write"
        )
        + f"; index: {output / 'index.json'}"
    )


def _check_paths(source: Path, output: Path, modality: str, overwrite: bool) -> None:
    """Refuse, before reading anything, an --input that is not a file of a known format and an
    --output that is not a directory or whose index.json is unreadable or of another modality
    (unless --overwrite)."""
    if not source.is_file():
        raise CliError(f"--input: no such file: '{source}'")
    if source.suffix.lower() not in INPUT_FORMATS:
        raise CliError(f"--input: unknown format '{source.name}' (expected {', '.join(INPUT_FORMATS)})")
    if output.exists() and not output.is_dir():
        raise CliError(f"--output: '{output}' exists and is not a directory")
    try:
        index = read_index(output) if output.is_dir() and not overwrite else None
    except ValueError as exn:
        raise CliError(f"{exn}; or pass --overwrite to replace it") from None
    if index is not None and index.get("modality") != modality:
        raise CliError(
            f"--output: '{output}' holds {index.get('modality')} shards (index.json); "
            f"give another directory for {modality}, or --overwrite to replace them"
        )


def _claim_output(output: Path, modality: str, provenance: dict, overwrite: bool) -> None:
    """Make --output this build's: with --overwrite, delete the shards there first; without it,
    refuse shards of any other build. Then create the directory and drop temporary files an
    interrupted run left."""
    if overwrite:
        removed = remove_shards(output)
        if removed:
            print(
                f"{PROG} {modality}: --overwrite: removed {removed} shard(s) from {output}", file=sys.stderr
            )
    else:
        foreign = foreign_shards(output, lambda stats: all(stats.get(k) == v for k, v in provenance.items()))
        if foreign:
            names = ", ".join(n for n, _ in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CliError(
                f"--output: '{output}' already holds {len(foreign)} shard(s) not built "
                f"from this input ({names}: {shard_origin(foreign[0][1])}); give another "
                f"--output, or pass --overwrite to delete them and build anew"
            )
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.tmp"):  # left by an interrupted run
        stale.unlink()


def run_build(
    args: argparse.Namespace,
    modality: str,
    make_sample: SampleFn,
    columns: Sequence = (),
    *,
    one_of: Sequence[str] = (),
    inspect: Callable[[Record], None] | None = None,
    text_or: str | None = None,
) -> int:
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
    source, output = Path(args.input), Path(args.output)
    overwrite = getattr(args, "overwrite", False)
    _check_paths(source, output, modality, overwrite)
    key_cols = [args.key_col] if args.key_col else []
    records = read_records(source, args.text_col, [*columns, *key_cols], one_of, text_or)
    # Read the first record before creating or deleting anything, so a bad input leaves the
    # directory as it was (and creates no empty one).
    first = next(records, None)
    if first is None:
        raise InputError(source, None, "no records")
    provenance = {"modality": modality, "input": str(source.resolve())}
    _claim_output(output, modality, provenance, overwrite)

    def all_records():
        for rec in itertools.chain([first], records):
            if inspect is not None:
                inspect(rec)
            yield rec

    result = build_shards(
        plan_items(all_records(), source.name, args.key_col),
        make_sample,
        output,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        progress=not args.no_progress,
        desc=f"{modality} -> {output}",
        provenance=provenance,
    )
    _remove_surplus(output, modality, result.names)
    write_index(
        output,
        modality,
        names=result.names,
        counts={n: s["successes"] for n, s in zip(result.names, result.stats)},
    )
    print(_summary_line(modality, source.name, output, result))
    return 0


# ---------------------------------------------------------------- removing shards (--overwrite, a longer earlier build)


def _remove_shard(directory: Path, name: str) -> None:
    """Delete a shard's stats file, then the tar: never a stats file that vouches for no tar."""
    (directory / stats_name(name)).unlink(missing_ok=True)
    (directory / name).unlink(missing_ok=True)


def _remove_surplus(output: Path, modality: str, names: list[str]) -> None:
    """Delete the shards in `output` beyond this build's `names`. Every other shard here is this
    input's too (`_claim_output` refused the rest): left from a longer earlier file."""
    surplus = sorted(set(os.path.basename(p) for p in shards_in_dir(str(output))) - set(names))
    for name in surplus:
        _remove_shard(output, name)
    if surplus:
        print(
            f"{PROG} {modality}: removed {len(surplus)} shard(s) left by an earlier, longer build "
            f"of this input ({', '.join(surplus[:3])}{', ...' if len(surplus) > 3 else ''})",
            file=sys.stderr,
        )


def remove_shards(directory: Path) -> int:
    """`--overwrite`: delete every `*.tar` in `directory` with its stats, stats files of our
    NNNNNN naming left without a tar, temporary files of an interrupted write, and index.json;
    other files stay. Returns the number of tars deleted."""
    if not directory.is_dir():
        return 0
    names = [os.path.basename(p) for p in shards_in_dir(directory)]
    (directory / INDEX_NAME).unlink(missing_ok=True)  # first: it must not list deleted shards
    for name in names:
        _remove_shard(directory, name)
    for path in directory.iterdir():
        if path.name.endswith(".tmp") or re.fullmatch(r"\d{6}_stats\.json", path.name):
            path.unlink()
    return len(names)
