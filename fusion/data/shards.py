"""WebDataset shards: keys, writing one shard, finding and reading shards, index and stats.

The on-disk contract (SPEC §4), one modality per dataset directory:

    DIR/000000.tar, 000001.tar, ...   samples; member `KEY.EXT`, keys match [0-9A-Za-z_-]+
    DIR/000000_stats.json, ...        per shard, written last:
                                      {count, successes, failures: {reason: n}, bytes, seconds}
    DIR/index.json                    {modality, n_samples, shards: [{name, n_samples, bytes, sha256}]}

Writing (`ShardWriter`) is atomic and deterministic: the tar goes to `NNNNNN.tar.tmp` and is renamed
when complete, its stats file follows; members carry mtime 0, uid/gid 0, empty owner names and mode
0o644, and a sample's members are written in sorted extension order, so the same samples always
give byte-identical tars (the same bytes tarfile writes in PAX format). A shard is complete when
its tar AND its stats file exist.

Reading (`iter_samples`) streams members as bytes and never extracts to disk. Samples are grouped
the way webdataset groups them: a member name splits at the first dot of its base name into key and
extension, so `a.b.jpg` is key `a` with field `b.jpg` (webdataset #237); extensions are lower-cased;
members whose base name has no dot and `__meta__` members are skipped. Shards written by other tools
in the same layout (img2dataset, plain `tarfile`, GNU tar, compressed `.tar.gz`) read as they are.
A sample with a symlink, hardlink, device or fifo entry, or a member named outside the archive
(`../x`, `/x`), is dropped and counted as `unsafe_member` (nothing is followed or written); a key
that comes back later in the same shard is dropped and counted as `duplicate_key`.

Errors never stop iteration when an `ErrorCounter` is given: an unreadable shard (missing, not a
tar, truncated) is counted under the exception's class name (`ReadError`, `FileNotFoundError`) and
reading goes on with the next shard; the samples completed before the error are kept, the one in
progress is dropped. A tar that stops without its end-of-archive zero blocks counts as truncated:
an interrupted copy usually stops at a block boundary, which tarfile alone reads as a shorter
archive.

webdataset (and through it torch) is imported only when a shard is read, so writing shards and the
`fusion-data text` command stay light.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import braceexpand

from fusion.files import write_atomic

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]+")
EXT_PATTERN = re.compile(r"[0-9a-z_]+(\.[0-9a-z_]+)*")
MODALITIES = ("text", "image", "video", "vqa")
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

    def update(self, other: "ErrorCounter | Mapping[str, int]") -> None:
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
    dotted = any(isinstance(name, str) and not name.startswith("__") and "." in name
                 and name.rsplit(".", 1)[1] in exts for name in sample)
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


# ---------------------------------------------------------------- writing one shard

def _encode_member(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exn:
            raise SampleError("bad_utf8", f"{key}.{ext}: not encodable as UTF-8") from exn
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exn:
            raise SampleError("bad_utf8", f"{key}.{ext}: not encodable as UTF-8") from exn
    raise TypeError(f"{key}.{ext}: member values are bytes, str, dict or list, not {type(value).__name__}")


def _member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file with our fixed attributes.

    Written by hand (tarfile spends ~40 us per header, and its output may change between Python
    versions): name, mode 0o644, uid/gid 0, size, mtime 0, type '0', magic 'ustar\\0' '00', no
    owner names. A name over 100 bytes or a size past 8 GiB falls back to tarfile's PAX header.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(raw) + sum(size_field)
    return b"".join([raw.ljust(100, b"\0"), _HEADER_IDS, size_field, _HEADER_MTIME,
                     b"%06o\0 " % checksum, _HEADER_REST])


_HEADER_IDS = b"0000644\0" b"0000000\0" b"0000000\0"    # mode, uid, gid
_HEADER_MTIME = b"00000000000\0"                         # mtime 0
_HEADER_REST = (b"0"                                      # type: regular file
                + b"\0" * 100                            # linkname
                + b"ustar\x0000"                         # magic, version
                + b"\0" * 64                             # uname, gname
                + b"\0" * 16                             # devmajor, devminor: empty
                + b"\0" * 155                            # prefix
                ).ljust(512 - 156, b"\0")
# the checksum counts its own 8 bytes as spaces; name and size are added per header
_HEADER_SUM = sum(_HEADER_IDS) + sum(_HEADER_MTIME) + 8 * 32 + sum(_HEADER_REST)


class ShardWriter:
    """Writes one shard `DIR/NNNNNN.tar` atomically, then its stats file.

        with ShardWriter(out_dir, 3) as w:       # -> out_dir/000003.tar, 000003_stats.json
            w.write("doc1", {"txt": "hello", "json": {"line": 1}})
            w.fail("empty_text")

    `extra_stats` are added to the stats file (builders record an `input_sha256` of the records
    behind the shard, so that a resumed build reuses only shards made from the same input).
    Opening removes this shard's stale stats and temporary files, so a shard is never "complete"
    (tar AND stats present) with content from an older run. On leaving the `with` block normally
    the tar is renamed into place and the stats written; on an exception the temporary tar is
    removed and nothing else is touched.
    """

    def __init__(self, directory: str | os.PathLike, index: int, extra_stats: Mapping | None = None):
        self.extra_stats = dict(extra_stats or {})
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / shard_name(index)
        self.stats_path = self.directory / stats_name(self.path.name)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        for stale in (self.stats_path, self.stats_path.with_name(self.stats_path.name + ".tmp")):
            stale.unlink(missing_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._offset = 0
        self._keys: set[str] = set()
        self._t0 = time.perf_counter()
        self.successes = 0
        self.failures: Counter[str] = Counter()
        self.stats: dict | None = None

    def write(self, key: str, members: Mapping[str, Any]) -> None:
        """Add one sample: `members` maps extension (lower-case, no leading dot) -> bytes/str/dict.

        Raises SampleError('bad_key' | 'duplicate_key' | 'bad_utf8') before anything is written,
        so the caller may count it with `fail` and go on.
        """
        check_key(key)
        if key in self._keys:
            raise SampleError("duplicate_key", f"key {key!r} already in {self.path.name}")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        encoded = []
        for ext in sorted(members):
            if EXT_PATTERN.fullmatch(ext) is None:
                raise ValueError(f"sample {key!r}: bad extension {ext!r} (lower-case, no leading dot)")
            encoded.append((f"{key}.{ext}", _encode_member(key, ext, members[ext])))
        for name, data in encoded:
            block = _member_header(name, len(data)) + data + b"\0" * (-len(data) % 512)
            self._file.write(block)
            self._offset += len(block)
        self._keys.add(key)
        self.successes += 1

    def fail(self, reason: str, n: int = 1) -> None:
        """Count `n` input records of this shard that produced no sample, by reason."""
        self.failures[reason] += n

    def close(self) -> dict:
        """Finish the tar, rename it into place, write the stats file last; return the stats."""
        if self.stats is not None:
            return self.stats
        # End of archive: two zero blocks, then zeros up to a whole 10 KiB record, as tar does.
        end = 1024 + (-(self._offset + 1024) % tarfile.RECORDSIZE)
        self._file.write(b"\0" * end)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        self.stats = {
            "count": self.successes + sum(self.failures.values()),
            "successes": self.successes,
            "failures": dict(sorted(self.failures.items())),
            "bytes": self.path.stat().st_size,
            "seconds": round(time.perf_counter() - self._t0, 3),
            **self.extra_stats,
        }
        write_atomic(self.stats_path, (json.dumps(self.stats, indent=1) + "\n").encode())
        return self.stats

    def abort(self) -> None:
        """Drop the temporary tar; the shard stays incomplete."""
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def is_shard_complete(directory: str | os.PathLike, index: int, count: int | None = None,
                      input_sha256: str | None = None) -> bool:
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
    return [os.path.join(directory, n) for n in sorted(names, key=_natural)
            if os.path.isfile(os.path.join(directory, n))]


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
        raise FileNotFoundError(f"shards not found for spec '{spec}': "
                                + ", ".join(f"'{m}'" for m in missing[:3]) + more)
    if not urls:
        raise ValueError(f"no shards in spec '{spec}'")
    return urls


# ---------------------------------------------------------------- reading

def _report(counter: ErrorCounter | None, exn: Exception, url: str) -> None:
    if counter is None:
        raise exn
    counter(exn, url)


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's `__key__`-style metadata members


def _member_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read as sample data (None: a regular file with a safe name).
    Members are only ever read as bytes, so none of these could write or follow anything here;
    they are refused because no shard writer produces them and a sample holding one is suspect."""
    if not info.isreg():
        kind = ("symlink" if info.issym() else "hardlink" if info.islnk() else
                "device" if info.ischr() or info.isblk() else "fifo" if info.isfifo() else "special")
        return f"{kind} entry"
    name = info.name
    if name.startswith("/") or ".." in name.split("/"):
        return "path outside the archive"
    return None


_SPECIAL_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
                  tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)


def _other_member(header: bytes) -> tarfile.TarInfo | None:
    """The TarInfo of a ustar header `_plain_member` declines that still needs no look-ahead: a
    link, device, directory or fifo entry, or a regular file with an unsafe name. Reading these
    here keeps the fast path for the rest of the shard (a hostile member no longer hands every
    later one to tarfile). None for anything else: extensions, prefixes, bad checksums."""
    if header[156:157] not in _SPECIAL_TYPES or header[257:262] != b"ustar" or header[345] != 0:
        return None
    try:
        return tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


def _plain_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a ustar header for a regular file with a safe, short name and a valid
    checksum, as writers of shards produce; None for anything else, which tarfile then reads."""
    if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar" or header[345] != 0:
        return None  # another type, a v7 or unknown header, or a name continued in the prefix
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256 size
            return None
        size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        return None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if not name or name.endswith("/") or name.startswith("/") or ".." in name.split("/"):
        return None
    return name, size


class _Replay:
    """A stream that first gives back bytes already read from `raw`, then the rest of `raw`."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(n)
        if n < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + (self.raw.read(n - len(data)) if len(data) < n else b"")


def _read_full(stream, n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (a pipe may return less than asked)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts, have = [data], len(data)
    while have < n:
        more = stream.read(n - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def _tar_members(stream) -> Iterator[tarfile.TarInfo | tuple[str, bytes]]:
    """The members of a tar stream in order: (name, bytes) for a regular file, the TarInfo itself
    for anything else (directories are left out). Nothing is extracted.

    Plain regular-file headers of an uncompressed tar are read here (tarfile's header parsing
    costs about as much as decoding a small picture); from the first header of any other kind
    (compressed stream, PAX or GNU extensions, links, a bad checksum, a short read at the start)
    on, tarfile reads the rest of the stream, so every unusual case behaves as tarfile makes it.
    """
    header = _read_full(stream, tarfile.BLOCKSIZE)
    first = True
    while not header.startswith(_TailReader._COMPRESSED):
        if len(header) < tarfile.BLOCKSIZE and not first:
            return  # cut short: `_TailReader.check_end` reports it
        if header.count(0) == tarfile.BLOCKSIZE:
            return  # end-of-archive blocks
        if len(header) < tarfile.BLOCKSIZE:
            break
        plain = _plain_member(header)
        if plain is None:
            other = _other_member(header)
            if other is None:
                break
            if not other.isdir():
                yield other  # refused by the caller (`_member_problem`), never read
            if other.isreg():  # tarfile skips data blocks only for regular files
                _read_full(stream, other.size + (-other.size % tarfile.BLOCKSIZE))
            header, first = _read_full(stream, tarfile.BLOCKSIZE), False
            continue
        name, size = plain
        data = _read_full(stream, size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        yield name, data
        _read_full(stream, -size % tarfile.BLOCKSIZE)
        header, first = _read_full(stream, tarfile.BLOCKSIZE), False
    tar = tarfile.open(fileobj=_Replay(header, stream), mode="r|*")
    for info in tar:
        if info.isdir():
            continue
        if _member_problem(info) is not None:
            yield info
        else:
            yield info.name, tar.extractfile(info).read()
        tar.members = []  # a stream never seeks back: keep no index of what was read


def _iter_shard(url: str, counter: ErrorCounter | None) -> Iterator[dict]:
    from webdataset.gopen import gopen  # imports torch: only when reading

    try:
        stream = _TailReader(gopen(url, "rb"), url)
    except Exception as exn:
        _report(counter, exn, url)
        return
    current: dict | None = None
    bad = False      # the sample in progress is dropped when complete (reason already counted)
    seen: set[str] = set()  # keys of this shard: a key that comes back later is a duplicate
    try:
        for member in _tar_members(stream):
            name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
            if _META_MEMBER.match(name):
                continue
            key, ext = split_member_name(name)
            if key is None:
                if isinstance(member, tarfile.TarInfo):
                    _report(counter, SampleError("unsafe_member", f"{name!r}: {_member_problem(member)}"), url)
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None and not bad:
                    yield current
                current, bad = {"__key__": key, "__url__": url}, False
                if key in seen:
                    _report(counter, SampleError("duplicate_key", f"key {key!r} again"), url)
                    bad = True
                seen.add(key)
            if isinstance(member, tarfile.TarInfo):
                _report(counter, SampleError("unsafe_member", f"{name!r}: {_member_problem(member)}"), url)
                bad = True
                continue
            if ext in current:
                if not bad:
                    _report(counter, SampleError("duplicate_member", f"{name} twice"), url)
                bad = True
                continue
            current[ext] = member[1]
        stream.check_end()
        stream.close()  # a `pipe:` whose command failed says so here
    except Exception as exn:
        _close_quietly(stream)
        _report(counter, exn, url)
        return
    except BaseException:  # GeneratorExit when the reader stops early
        _close_quietly(stream)
        raise
    if current is not None and not bad:
        yield current


class _TailReader:
    """A read-only stream that remembers its first bytes and its last 1 KiB.

    tarfile ends a stream quietly when the data stops at a 512-byte block boundary, which is where
    an interrupted copy usually stops. Every tar writer ends the archive with zero blocks, so an
    uncompressed tar whose last 1 KiB is not all zeros was cut short.
    """

    _COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip bz2 xz zstd

    def __init__(self, raw, url: str):
        self.raw, self.url = raw, url
        self.head = b""
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.tail = (self.tail + data)[-1024:]
        return data

    def check_end(self) -> None:
        while self.read(1 << 16):  # the padding after the end-of-archive blocks
            pass
        if self.head.startswith(self._COMPRESSED):
            return
        if len(self.tail) < 1024 or self.tail.count(0) != len(self.tail):
            raise tarfile.ReadError("truncated tar: no end-of-archive blocks")

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return self.url


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # the shard is already being abandoned or counted
        pass


def iter_samples(urls: str | Iterable[str], counter: ErrorCounter | None = None) -> Iterator[dict]:
    """Raw samples `{"__key__", "__url__", EXT: bytes, ...}` of one shard or several, in order.

    `urls`: one shard path/URL (a string; a local directory string is expanded with `list_shards`)
    or an iterable of them. With a `counter`, an unreadable shard or member is counted (by exception
    class name, e.g. `ReadError`, `FileNotFoundError`; a sample with a repeated member as
    `duplicate_member`) and iteration goes on; without one the first error is raised.
    """
    if isinstance(urls, str):
        urls = list_shards(urls) if os.path.isdir(urls) else [urls]
    for url in urls:
        yield from _iter_shard(url, counter)


def tar_samples(counter: ErrorCounter):
    """A webdataset pipeline stage: `{"url": ...}` dicts (or URL strings) -> raw samples.

        wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, tar_samples(counter))
    """
    def stage(src: Iterable[dict | str]) -> Iterator[dict]:
        for item in src:
            yield from _iter_shard(item["url"] if isinstance(item, dict) else item, counter)
    return stage


def decode_text(data: bytes) -> str:
    """A `.txt` member as text; SampleError('bad_utf8') if it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise SampleError("bad_utf8", f"not UTF-8 at byte {exn.start}") from exn


def decode_json(data: bytes) -> Any:
    """A `.json` member parsed; SampleError('bad_utf8' | 'bad_json')."""
    try:
        return json.loads(decode_text(data))
    except ValueError as exn:
        if isinstance(exn, SampleError):
            raise
        raise SampleError("bad_json", str(exn)) from exn


def iter_texts(urls: str | Iterable[str], counter: ErrorCounter) -> Iterator[tuple[str, str]]:
    """(key, text) of text samples; samples without `.txt` or with non-UTF-8 text are counted
    (`missing_txt`, `bad_utf8`) and skipped."""
    for sample in iter_samples(urls, counter):
        data = sample.get("txt")
        if data is None:
            counter(missing(sample, "txt", "missing_txt"))
            continue
        try:
            yield sample["__key__"], decode_text(data)
        except SampleError as exn:
            counter(exn, f"{sample['__url__']} {sample['__key__']}")


# ---------------------------------------------------------------- checking samples

# What the shard builder and verify call a video that fails, by `fusion.data.video` reason.
VIDEO_FAILURES = {"empty": "empty_file", "unreadable": "corrupt_video", "corrupt": "corrupt_video",
                  "no_video_stream": "no_video_stream", "zero_frames": "zero_frames",
                  "timeout": "decode_timeout"}


def _check_image(data: bytes, max_pixels: int | None) -> tuple[str | None, tuple[int, int] | None]:
    """(reason or None, (width, height) of the decoded upright image)."""
    from fusion.data.images import DEFAULT_MAX_PIXELS, open_image

    try:
        img = open_image(data, max_pixels or DEFAULT_MAX_PIXELS)
    except SampleError as exn:
        return exn.reason, None
    return None, img.size


def _check_video(data: bytes) -> tuple[str | None, int | None]:
    """(reason or None, decoded frame count): PyAV decodes every frame (decord, which counts from
    the container, only when PyAV is not installed)."""
    import importlib.util

    from fusion.data.video import VideoDecodeError, probe

    backend = "pyav" if importlib.util.find_spec("av") else "auto"
    try:
        meta = probe(data, backend=backend)
    except VideoDecodeError as exn:
        return VIDEO_FAILURES[exn.reason], None
    return None, meta.n_frames


def _check_json_object(sample: dict) -> tuple[str | None, dict | None]:
    if "json" not in sample:
        return "missing_json", None
    try:
        meta = decode_json(sample["json"])
    except SampleError as exn:
        return exn.reason, None
    if not isinstance(meta, dict):
        return "bad_json", None
    return None, meta


def guess_modality(sample: Mapping[str, Any]) -> str | None:
    """The modality a raw sample's members suggest, or None."""
    has_image = any(e in sample for e in IMAGE_EXTS)
    has_video = any(e in sample for e in VIDEO_EXTS)
    if has_image or has_video:
        if "txt" not in sample and "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = None
            if isinstance(meta, dict) and "question" in meta:
                return "vqa"
        return "video" if has_video else "image"
    if "txt" in sample:
        return "text"
    return None


def check_sample(sample: Mapping[str, Any], modality: str, max_pixels: int | None = None) -> list[str]:
    """Reasons a raw sample breaks the shard contract for `modality` ([] when it is fine).

    text: `.txt` UTF-8, `.json` (if any) parses.
    image: an image member that decodes fully (`images.open_image`, at most `max_pixels`, default
    `images.DEFAULT_MAX_PIXELS`: reasons bad_image, too_many_pixels, unsupported_format,
    empty_file), `.txt` UTF-8, `.json` object whose width/height (when present) are the decoded
    size (`size_mismatch`).
    video: `.mp4` that decodes to at least one frame (PyAV decodes all of them: empty_file,
    corrupt_video, no_video_stream, zero_frames), `.txt`, `.json` object whose n_frames (when
    present) is the decoded count (`n_frames_mismatch`).
    vqa: an image or `.mp4` checked the same way, `.json` object with question, answer and a list
    of choices (`bad_vqa_json`) holding the answer (`answer_not_in_choices`).
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
    problems = []
    if not is_valid_key(sample.get("__key__", "")):
        problems.append("bad_key")

    def need_txt():
        if "txt" not in sample:
            problems.append(missing(sample, "txt", "missing_txt"))
            return
        try:
            decode_text(sample["txt"])
        except SampleError as exn:
            problems.append(exn.reason)

    def need_media(allow_image: bool, allow_video: bool) -> dict:
        """Check the media member; return what was measured ({width, height} or {n_frames})."""
        images = [e for e in IMAGE_EXTS if e in sample] if allow_image else []
        videos = [e for e in VIDEO_EXTS if e in sample] if allow_video else []
        if images:
            reason, size = _check_image(sample[images[0]], max_pixels)
            if reason:
                problems.append(reason)
            return {"width": size[0], "height": size[1]} if size else {}
        if videos:
            reason, n_frames = _check_video(sample[videos[0]])
            if reason:
                problems.append(reason)
            return {"n_frames": n_frames} if n_frames is not None else {}
        problems.append(missing(
            sample, (IMAGE_EXTS if allow_image else ()) + (VIDEO_EXTS if allow_video else ()),
            {(True, False): "missing_image", (False, True): "missing_mp4"}
            .get((allow_image, allow_video), "missing_media")))
        return {}

    def compare(meta: dict, measured: dict):
        if any(k in meta and meta[k] != v for k, v in measured.items()):
            problems.append("n_frames_mismatch" if "n_frames" in measured else "size_mismatch")

    if modality == "text":
        need_txt()
        if "json" in sample:
            try:
                decode_json(sample["json"])
            except SampleError as exn:
                problems.append(exn.reason)
    elif modality in ("image", "video"):
        measured = need_media(modality == "image", modality == "video")
        need_txt()
        reason, meta = _check_json_object(sample)
        if reason:
            problems.append(reason)
        else:
            compare(meta, measured)
    else:
        measured = need_media(True, True)
        reason, meta = _check_json_object(sample)
        if reason:
            problems.append(reason)
        elif not all(k in meta for k in ("question", "answer", "choices")) \
                or not isinstance(meta["choices"], list):
            problems.append("bad_vqa_json")
        else:
            if meta["answer"] not in meta["choices"]:
                problems.append("answer_not_in_choices")
            compare(meta, measured)
    return problems


# ---------------------------------------------------------------- index and stats

def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def count_samples(url: str) -> int:
    """Number of samples in a shard (raises if it cannot be read completely)."""
    return sum(1 for _ in iter_samples([url]))


def write_index(directory: str | os.PathLike, modality: str, *, names: Iterable[str] | None = None,
                counts: Mapping[str, int] | None = None) -> dict:
    """Write DIR/index.json atomically and return it.

    `names`: shard file names to list (default: every `*.tar` in DIR, natural order). `counts`:
    name -> number of samples; shards missing from it take `successes` from their stats file, or
    are read and counted. `bytes` and `sha256` come from the files.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
    directory = Path(directory)
    names = [os.path.basename(p) for p in shards_in_dir(str(directory))] if names is None else list(names)
    counts = dict(counts or {})
    shards = []
    for name in names:
        path = directory / name
        n = counts.get(name)
        if n is None:
            stats = read_shard_stats(path)
            n = stats["successes"] if stats and "successes" in stats else count_samples(str(path))
        shards.append({"name": name, "n_samples": int(n), "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
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
        failures.update({str(k): v for k, v in found.items()
                         if isinstance(v, int) and not isinstance(v, bool) and v > 0})
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

_BUILT_SHARD = re.compile(r"\d{6}\.tar")   # the names ShardWriter gives


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
    return [(name, stats) for name, stats in shards
            if (stats is None and not (any_ours and _BUILT_SHARD.fullmatch(name)))
            or (stats is not None and not is_ours(stats))]


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
