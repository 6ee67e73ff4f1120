"""The read-only commands: `fusion-data verify` (read every shard, check every sample, rewrite
index.json) and `fusion-data stats` (totals from the stats files). The checks themselves are
`fusion.data.verify`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
from collections import Counter
from pathlib import Path

from fusion.cli import CliError, default_workers, int_at_least
from fusion.data.images import DEFAULT_MAX_PIXELS
from fusion.data.shards import (
    SHARD_KINDS,
    ErrorCounter,
    collect_stats,
    read_index,
    shards_in_dir,
    write_index,
)
from fusion.data.tar import iter_samples
from fusion.data.verify import guess_modality, verify_shard

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
    raise CliError(
        f"cannot tell the modality of '{directory}' (no index.json, no readable sample); pass --modality"
    )


def configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="dataset directory of *.tar shards")
    p.add_argument(
        "--modality",
        choices=SHARD_KINDS,
        default=None,
        help="modality to check against (default: from index.json, else guessed "
        "from the members of the first sample)",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(1),
        default=default_workers(),
        metavar="N",
        help="processes reading shards in parallel (default: CPUs, at most 8)",
    )
    p.add_argument(
        "--max-problems",
        type=int_at_least(0),
        default=20,
        metavar="N",
        help="problems listed one per line before the summary (default: 20)",
    )
    p.add_argument(
        "--max-pixels",
        type=int_at_least(1),
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="images with more pixels fail as too_many_pixels, as in the builders "
        f"(default: {DEFAULT_MAX_PIXELS:,})",
    )


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
            reports = list(
                ex.map(verify_shard, paths, [modality] * len(paths), [args.max_pixels] * len(paths))
            )
    else:
        reports = [verify_shard(p, modality, args.max_pixels) for p in paths]

    lines: list[str] = []
    reasons: Counter[str] = Counter()
    first_seen: dict[str, str] = {}
    bad_shards = 0
    for rep in reports:
        for reason, n in rep.unreadable.items():
            reasons[reason] += n
            lines.append(
                f"{directory / rep.name}: unreadable after {rep.n_samples} samples: {rep.message or reason}"
            )
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

    index = write_index(
        directory, modality, names=[r.name for r in reports], counts={r.name: r.n_samples for r in reports}
    )
    size = sum(s["bytes"] for s in index["shards"])
    head = (
        f"verify {directory}: {modality}, {len(reports)} shards, {index['n_samples']:,} samples, "
        f"{size / 1e6:,.1f} MB; wrote {directory / 'index.json'}"
    )
    if not reasons:
        print(f"{head}; OK")
        return 0
    detail = ", ".join(f"{r}: {n:,}" for r, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0])))
    print(f"{head}; FAILED: {sum(reasons.values()):,} problems in {bad_shards} shards ({detail})")
    return 1


# ---------------------------------------------------------------- stats


def configure_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="dataset directory of *.tar shards and *_stats.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run_stats(args: argparse.Namespace) -> int:
    try:
        summary = collect_stats(args.dir)
    except (FileNotFoundError, ValueError) as exn:
        raise CliError(f"DIR: {exn}") from None
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    failed = sum(summary["failures"].values())
    reasons = ", ".join(
        f"{r}: {n:,}" for r, n in sorted(summary["failures"].items(), key=lambda x: (-x[1], x[0]))
    )
    text = (
        f"{summary['dir']}: {summary['modality'] or 'unknown modality (no index.json)'}, "
        f"{summary['shards']} shards, {summary['bytes'] / 1e6:,.1f} MB; "
        f"{summary['count']:,} records -> {summary['successes']:,} samples; {failed:,} failed"
        + (f" ({reasons})" if failed else "")
    )
    if summary["index_n_samples"] is not None:
        text += f"; index.json: {summary['index_n_samples']:,} samples"
    if summary["shards_without_stats"]:
        n = len(summary["shards_without_stats"])
        text += (
            f"; {n} shard(s) without stats (incomplete or written by another tool): "
            + ", ".join(summary["shards_without_stats"][:3])
            + (", ..." if n > 3 else "")
        )
    print(text)
    return 0
