"""A dataset directory of WebDataset shards: names and keys, finding shards, stats files,
index.json, whose shards a directory holds, and how failures are named and counted.

The on-disk contract (docs/shards.md), one kind of sample per dataset directory:

    DIR/000000.tar, 000001.tar, ...   samples; member `KEY.EXT`, keys match [0-9A-Za-z_-]+
    DIR/000000_stats.json, ...        per shard, written last:
                                      {count, successes, failures: {reason: n}, bytes, seconds}
    DIR/index.json                    {modality, n_samples, shards: [{name, n_samples, bytes, sha256}]}

A shard is complete when its tar AND its stats file exist. The tar files themselves are written
and read by `fusion.data.tar`; the checks `fusion-data verify` runs on each sample are in
`fusion.data.verify`. This module opens no tar, so everything that writes or reads shards can
build on it.

The kinds of shard (`SHARD_KINDS`: text, image, video, vqa) are what a directory's index.json
calls its `modality`. They are not the model's modalities (`fusion.schema.MODALITIES`: text,
image, video): vqa shards are read as image or video data (`data.image`, `data.video`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import braceexpand

from fusion.files import sha256_file, write_atomic

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]+")
SHARD_KINDS = ("text", "image", "video", "vqa")  # what a dataset directory holds (index.json `modality`)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4",)
INDEX_NAME = "index.json"
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: not a drive letter


# ---------------------------------------------------------------- errors and counting


class SampleError(ValueError):
    """A sample (or input record) that cannot be used; `reason` is the short counted name."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class ErrorCounter:
    """Counts failures by reason; a webdataset handler that never stops and never sleeps.

    `counter(exn)` counts `exn.reason` for a `SampleError`, else `type(exn).__name__`;
    `counter("reason")` counts a reason string. Both return True ("continue"), so the object can be
    passed as `handler=` to webdataset stages (unlike `warn_and_continue`, which sleeps 0.5 s).
    `counts` maps reason -> n; `examples` keeps the first few messages of each reason.
    """

    def __init__(self, max_examples: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_examples = max_examples

    def __call__(self, exn: BaseException | str, where: str = "") -> bool:
        if isinstance(exn, str):
            reason, message = exn, ""
        else:
            reason = exn.reason if isinstance(exn, SampleError) else type(exn).__name__
            message = str(exn)
        self.add(reason, 1, f"{where}: {message}" if where else message)
        return True

    def add(self, reason: str, n: int = 1, message: str = "") -> None:
        """Count `n` failures of `reason`, remembering `message` among the first examples."""
        if n <= 0:
            return
        self.counts[reason] += n
        if message:
            kept = self.examples.setdefault(reason, [])
            if len(kept) < self.max_examples:
                kept.append(message)
        log.debug("%s: %s", reason, message)

    def update(self, other: ErrorCounter | Mapping[str, int]) -> None:
        """Add another counter's counts (e.g. one per worker)."""
        counts = other.counts if isinstance(other, ErrorCounter) else other
        for reason, n in counts.items():
            self.counts[reason] += n
        if isinstance(other, ErrorCounter):
            for reason, messages in other.examples.items():
                kept = self.examples.setdefault(reason, [])
                kept.extend(messages[: max(0, self.max_examples - len(kept))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """'reason: n, reason: n' (most frequent first), or 'none'."""
        if not self.counts:
            return "none"
        return ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items(), key=lambda x: (-x[1], x[0])))

    def __repr__(self) -> str:
        return f"ErrorCounter({dict(self.counts)})"


# What the shard builder and verify call a video that fails, by `fusion.data.video` reason.
VIDEO_FAILURES = {
    "empty": "empty_file",
    "unreadable": "corrupt_video",
    "corrupt": "corrupt_video",
    "no_video_stream": "no_video_stream",
    "zero_frames": "zero_frames",
    "timeout": "decode_timeout",
}


# ---------------------------------------------------------------- keys and names


def is_valid_key(key: str) -> bool:
    """True if `key` may name a sample: [0-9A-Za-z_-]+ (no dots, no slashes)."""
    return isinstance(key, str) and KEY_PATTERN.fullmatch(key) is not None


def check_key(key: str) -> str:
    """Return `key`, or raise SampleError('bad_key') naming it."""
    if not is_valid_key(key):
        raise SampleError("bad_key", f"key {key!r} does not match [0-9A-Za-z_-]+")
    return key


def sanitize_key(value: Any) -> str:
    """Map any value to the key alphabet: each character outside [0-9A-Za-z_-] becomes '_'.

    Distinct values can collide ('a.b' and 'a_b'); writers count the second as a duplicate key.
    Returns '' for an empty value.
    """
    return re.sub(r"[^0-9A-Za-z_-]", "_", "" if value is None else str(value))


def shard_name(index: int) -> str:
    """Shard file name of shard `index`: 000042.tar."""
    return f"{index:06d}.tar"


def stats_name(shard: str) -> str:
    """Stats file name of a shard: 000042.tar -> 000042_stats.json."""
    return f"{Path(shard).name[: -len('.tar')]}_stats.json"


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """'dir/key.ext.more' -> ('dir/key', 'ext.more') as webdataset splits it; (None, None) if no dot."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def missing(sample: Mapping[str, Any], ext: str | Iterable[str], reason: str) -> str:
    """The reason a sample lacks its `ext` member: `reason`, or `dotted_key` when a member such as
    `a.b.ext` carries it (a dotted key, which webdataset splits as key `a`, member `b.ext`)."""
    exts = (ext,) if isinstance(ext, str) else tuple(ext)
    dotted = any(
        isinstance(name, str) and not name.startswith("__") and "." in name and name.rsplit(".", 1)[1] in exts
        for name in sample
    )
    return "dotted_key" if dotted else reason


DEFAULT_VQA_TYPE = "default"  # the question type of a VQA sample that names none


def vqa_type(value: Any) -> str:
    """A VQA sample's question type: `value` stripped, or DEFAULT_VQA_TYPE when blank or None
    (what the vqa builder stores and evaluation scores by)."""
    text = str(value).strip() if value is not None else ""
    return text or DEFAULT_VQA_TYPE


def _natural(name: str) -> list:
    # 000999.tar < 001000.tar < 1000000.tar: compare digit runs as numbers.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- stats files


def is_shard_complete(
    directory: str | os.PathLike, index: int, count: int | None = None, input_sha256: str | None = None
) -> bool:
    """True if shard `index` has its tar and a readable stats file whose `bytes` match the tar
    (and whose `count` and `input_sha256` equal the ones given): a resumed build may skip it."""
    path = Path(directory) / shard_name(index)
    stats = read_shard_stats(path)
    if stats is None or not path.is_file():
        return False
    if stats.get("bytes") != path.stat().st_size:
        return False
    if input_sha256 is not None and stats.get("input_sha256") != input_sha256:
        return False
    return count is None or stats.get("count") == count


def read_shard_stats(shard: str | os.PathLike) -> dict | None:
    """The stats dict written beside a local shard, or None if absent or unreadable."""
    path = Path(shard)
    try:
        stats = json.loads((path.parent / stats_name(path.name)).read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


# ---------------------------------------------------------------- finding shards


def _split_spec(spec: str) -> list[str]:
    # Commas separate items except inside braces ({a,b} is a brace pattern); whitespace separates
    # items too, except in a `pipe:` command, which keeps its spaces.
    items, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        out.extend([item] if item.startswith("pipe:") else item.split())
    return out


def shards_in_dir(directory: str | os.PathLike) -> list[str]:
    """Paths of the `*.tar` files in a local directory, natural-sorted (`.tar.tmp` excluded)."""
    directory = str(directory)
    names = [n for n in os.listdir(directory) if n.endswith(".tar") and not n.startswith(".")]
    return [
        os.path.join(directory, n)
        for n in sorted(names, key=_natural)
        if os.path.isfile(os.path.join(directory, n))
    ]


def list_shards(spec: str | Iterable[str]) -> list[str]:
    """Shard URLs from a spec; raises a clear error naming the spec when there are none.

    `spec` is one of, or a comma- or whitespace-separated list of (or a Python list of):
    - a local directory: its `*.tar` files, natural-sorted (`.tar.tmp` and other files ignored);
    - a brace pattern (`/x/{000000..000009}.tar`, `/x/{a,b}.tar`), expanded with braceexpand;
    - a glob (`/x/*.tar`) when no file has that literal name;
    - a local file path;
    - a URL webdataset opens (`pipe:...`, `https://...`, `s3://...`, `file:...`), passed through
      unchanged (after brace expansion, as webdataset does) and not checked here.
    A path with spaces is taken whole when it exists. Local paths that do not exist raise
    FileNotFoundError naming them; a directory without shards raises ValueError.
    """
    if not isinstance(spec, str):
        out: list[str] = []
        for item in spec:
            out.extend(list_shards(item))
        if not out:
            raise ValueError("no shards: the shard list is empty")
        return out
    items = [spec.strip()] if os.path.exists(spec.strip()) else _split_spec(spec)
    urls: list[str] = []
    missing: list[str] = []
    for item in items:
        for path in braceexpand.braceexpand(item):
            if _URL_SCHEME.match(path):
                urls.append(path)
            elif os.path.isdir(path):
                found = shards_in_dir(path)
                if not found:
                    raise ValueError(f"no .tar shards in directory '{path}' (from spec '{spec}')")
                urls.extend(found)
            elif os.path.exists(path):
                urls.append(path)
            elif glob.has_magic(path):
                found = [p for p in sorted(glob.glob(path), key=_natural) if not p.endswith(".tmp")]
                if not found:
                    missing.append(path)
                urls.extend(found)
            else:
                missing.append(path)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"shards not found for spec '{spec}': " + ", ".join(f"'{m}'" for m in missing[:3]) + more
        )
    if not urls:
        raise ValueError(f"no shards in spec '{spec}'")
    return urls


# ---------------------------------------------------------------- index and stats


def write_index(
    directory: str | os.PathLike,
    modality: str,
    *,
    names: Iterable[str] | None = None,
    counts: Mapping[str, int] | None = None,
) -> dict:
    """Write DIR/index.json atomically and return it.

    `names`: shard file names to list (default: every `*.tar` in DIR, natural order). `counts`:
    name -> number of samples; shards missing from it take `successes` from their stats file (a
    shard with neither raises ValueError: `fusion-data verify` reads and counts every shard).
    `bytes` and `sha256` come from the files.
    """
    if modality not in SHARD_KINDS:
        raise ValueError(f"unknown modality {modality!r} (one of {', '.join(SHARD_KINDS)})")
    directory = Path(directory)
    names = [os.path.basename(p) for p in shards_in_dir(str(directory))] if names is None else list(names)
    counts = dict(counts or {})
    shards = []
    for name in names:
        path = directory / name
        n = counts.get(name)
        if n is None:
            stats = read_shard_stats(path)
            if not stats or "successes" not in stats:
                raise ValueError(
                    f"{path}: no count given and no stats file to take it from "
                    f"(fusion-data verify counts every shard and writes the index)"
                )
            n = stats["successes"]
        shards.append(
            {"name": name, "n_samples": int(n), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    index = {"modality": modality, "n_samples": sum(s["n_samples"] for s in shards), "shards": shards}
    write_atomic(directory / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return index


def read_index(directory: str | os.PathLike) -> dict | None:
    """DIR/index.json, or None if absent; ValueError naming the file if it is not a valid index."""
    path = Path(directory) / INDEX_NAME
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise ValueError(f"{path}: unreadable index: {exn}") from exn
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path}: not an index (expected an object with 'shards')")
    return index


def collect_stats(directory: str | os.PathLike) -> dict:
    """Totals over a dataset directory's shards and their `*_stats.json` files.

    Returns {dir, modality (from index.json or None), shards, shards_without_stats: [names],
    count, successes, failures: {reason: n}, bytes, seconds, index_n_samples (or None)}.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: '{directory}'")
    paths = shards_in_dir(str(directory))
    failures: Counter[str] = Counter()
    total = {"count": 0, "successes": 0, "seconds": 0.0}
    without = []
    for path in paths:
        stats = read_shard_stats(path)
        if stats is None:
            without.append(os.path.basename(path))
            continue
        if "seconds" not in stats and "duration" in stats:  # img2dataset's name for it
            stats = {**stats, "seconds": stats["duration"]}
        for k in total:
            v = stats.get(k, 0)
            total[k] += v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0
        found = stats.get("failures")
        if not isinstance(found, dict):  # img2dataset counts failures as failed_to_download, ...
            found = {k: v for k, v in stats.items() if k.startswith("failed_to_")}
        failures.update(
            {str(k): v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
        )
    index = read_index(directory)
    return {
        "dir": str(directory),
        "modality": index.get("modality") if index else None,
        "shards": len(paths),
        "shards_without_stats": without,
        "count": total["count"],
        "successes": total["successes"],
        "failures": dict(sorted(failures.items())),
        "bytes": sum(os.path.getsize(p) for p in paths),
        "seconds": round(total["seconds"], 3),
        "index_n_samples": index.get("n_samples") if index else None,
    }


# ---------------------------------------------------------------- whose shards are in a directory

_BUILT_SHARD = re.compile(r"\d{6}\.tar")  # the names ShardWriter gives


def foreign_shards(directory: Path, is_ours: Callable[[dict], bool]) -> list[tuple[str, dict | None]]:
    """(name, stats or None) of the `*.tar` shards in `directory` that `is_ours(stats)` does not
    claim, in natural order.

    A shard without a stats file is ours when it has a NNNNNN.tar name and the directory holds
    a shard that is ours: ShardWriter deletes a shard's stats before rewriting it, so an
    interrupted rewrite leaves exactly that. Otherwise it is foreign (img2dataset, `tarfile`).
    """
    if not directory.is_dir():
        return []
    shards = [(os.path.basename(p), read_shard_stats(p)) for p in shards_in_dir(directory)]
    any_ours = any(stats is not None and is_ours(stats) for _, stats in shards)
    return [
        (name, stats)
        for name, stats in shards
        if (stats is None and not (any_ours and _BUILT_SHARD.fullmatch(name)))
        or (stats is not None and not is_ours(stats))
    ]


def shard_origin(stats: dict | None) -> str:
    """Who wrote a shard, in words, from its stats file (for error messages)."""
    if stats is None:
        return "no stats file: written by another tool or interrupted"
    if stats.get("input"):
        return f"{stats.get('modality', 'shards')} built from {stats['input']}"
    if stats.get("source") == "toy":
        return "written by fusion-data toy"
    if "input_sha256" in stats:
        return "built by an older fusion-data that did not record its input"
    return "written by another tool"
