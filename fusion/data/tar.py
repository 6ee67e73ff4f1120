"""Shard tar files: writing one shard (`ShardWriter`) and reading samples back (`iter_samples`),
with its own ustar header parser that refuses unsafe members. Names, keys, stats files and the
failure counter come from `fusion.data.shards` (docs/shards.md gives the format).

Writing (`ShardWriter`) is atomic and deterministic: the tar goes to `NNNNNN.tar.tmp` and is renamed
when complete, its stats file follows; members carry mtime 0, uid/gid 0, empty owner names and mode
0o644, and a sample's members are written in sorted extension order, so the same samples always
give byte-identical tars (the same bytes tarfile writes in PAX format). A shard is complete when
its tar AND its stats file exist.

Reading (`iter_samples`) streams members as bytes and never extracts to disk. Samples are grouped
the way webdataset groups them: a member name splits at the first dot of its base name into key and
extension, so `a.b.jpg` is key `a` with field `b.jpg`
(https://github.com/webdataset/webdataset/issues/237); extensions are lower-cased; members whose
base name has no dot and `__meta__` members are skipped. Shards written by other tools
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

import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fusion.data.shards import (
    ErrorCounter,
    SampleError,
    check_key,
    list_shards,
    missing,
    shard_name,
    split_member_name,
    stats_name,
)
from fusion.files import write_atomic

EXT_PATTERN = re.compile(r"[0-9a-z_]+(\.[0-9a-z_]+)*")


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
    return b"".join(
        [raw.ljust(100, b"\0"), _HEADER_IDS, size_field, _HEADER_MTIME, b"%06o\0 " % checksum, _HEADER_REST]
    )


_HEADER_IDS = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"  # mode, uid, gid (NUL-ended)
_HEADER_MTIME = b"00000000000\0"  # mtime 0
_HEADER_REST = (
    b"0"  # type: regular file
    + b"\0" * 100  # linkname
    + b"ustar\x0000"  # magic, version
    + b"\0" * 64  # uname, gname
    + b"\0" * 16  # devmajor, devminor: empty
    + b"\0" * 155  # prefix
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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
        kind = (
            "symlink"
            if info.issym()
            else "hardlink"
            if info.islnk()
            else "device"
            if info.ischr() or info.isblk()
            else "fifo"
            if info.isfifo()
            else "special"
        )
        return f"{kind} entry"
    name = info.name
    if name.startswith("/") or ".." in name.split("/"):
        return "path outside the archive"
    return None


_SPECIAL_TYPES = (
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)


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
    bad = False  # the sample in progress is dropped when complete (reason already counted)
    seen: set[str] = set()  # keys of this shard: a key that comes back later is a duplicate
    try:
        for member in _tar_members(stream):
            name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
            if _META_MEMBER.match(name):
                continue
            key, ext = split_member_name(name)
            if key is None:
                if isinstance(member, tarfile.TarInfo):
                    _report(
                        counter, SampleError("unsafe_member", f"{name!r}: {_member_problem(member)}"), url
                    )
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


def count_samples(url: str) -> int:
    """Number of samples in a shard (raises if it cannot be read completely)."""
    return sum(1 for _ in iter_samples([url]))
