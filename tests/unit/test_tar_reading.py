"""Shard reading: the plain-header fast path gives what tarfile gives, for every kind of tar."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from fusion.data.shards import ErrorCounter
from fusion.data.tar import ShardWriter, iter_samples


def members_by_tarfile(path) -> list[tuple[str, str, bytes]]:
    """(key, ext, bytes) of every regular member, read by tarfile alone."""
    out = []
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            if info.isreg():
                base = info.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                out.append(
                    (info.name[: len(info.name) - len(base)] + key, ext.lower(), tar.extractfile(info).read())
                )
    return out


def members_by_us(path, counter=None) -> list[tuple[str, str, bytes]]:
    out = []
    for sample in iter_samples(str(path), counter):
        for ext, data in sample.items():
            if not ext.startswith("__"):
                out.append((sample["__key__"], ext, data))
    return sorted(out)


def write_tar(path, members, fmt=tarfile.PAX_FORMAT, mode="w"):
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


SAMPLES = [(f"s{i}.{ext}", (ext * (i * 300 + 1)).encode()) for i in range(4) for ext in ("json", "txt")]
LONG = "d/" + "k" * 120  # over 100 bytes: a PAX (or GNU long-name) header


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_every_tar_format_reads_as_tarfile_reads_it(tmp_path, fmt):
    members = (
        SAMPLES[:4]
        + ([(LONG + ".txt", b"long")] if fmt != tarfile.USTAR_FORMAT else [])
        + [("dir/x.txt", b"in a directory"), ("caf\u00e9.txt", b"accent")]
        + SAMPLES[4:]
    )
    path = tmp_path / "a.tar"
    write_tar(path, members, fmt)
    assert members_by_us(path) == sorted(members_by_tarfile(path))


def test_our_shards_and_compressed_shards_read_the_same(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        for i in range(5):
            w.write(f"k{i}", {"txt": "x" * (100 * i + 1), "json": {"i": i}, "png": b"\x89PNG" * i or b"0"})
    plain = tmp_path / "000000.tar"
    gz = tmp_path / "copy.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    want = sorted(members_by_tarfile(plain))
    assert len(want) == 15
    assert members_by_us(plain) == want
    assert members_by_us(gz) == want


def test_a_link_after_plain_members_is_still_refused(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in SAMPLES[:2]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("evil.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for name, data in SAMPLES[2:4]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counter = ErrorCounter()
    keys = [s["__key__"] for s in iter_samples(str(path), counter)]
    assert keys == ["s0", "s1"]
    assert counter.counts == {"unsafe_member": 1}


def test_hostile_entries_are_refused_without_leaving_the_fast_path(tmp_path, monkeypatch):
    """Links, devices, directories and unsafe names between samples are counted, and the samples
    after them are read by the plain-header path (tarfile is never opened: it parses headers at
    the cost of decoding a small picture, so one hostile entry would slow the rest of a shard)."""
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:

        def add(name, data=None, kind=tarfile.REGTYPE, **attrs):
            info = tarfile.TarInfo(name)
            info.type = kind
            for k, v in attrs.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add(*SAMPLES[0]), add(*SAMPLES[1])
        add("evil.txt", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("hard.txt", kind=tarfile.LNKTYPE, linkname="s0.txt")
        add("dev.txt", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("subdir", kind=tarfile.DIRTYPE)
        add("../up.txt", b"outside")
        add("/abs.txt", b"absolute")
        for name, data in SAMPLES[2:]:
            add(name, data)
    want = [m for m in members_by_tarfile(path) if m[0] not in ("..", "/abs", "../up")]
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("left the fast path"))
    counter = ErrorCounter()
    got = members_by_us(path, counter)
    assert got == sorted(m for m in want if m[0].startswith("s")) and len(got) == len(SAMPLES)
    assert counter.counts == {"unsafe_member": 5}


def test_a_damaged_header_in_the_middle_is_counted(tmp_path):
    # tarfile alone ends a stream quietly at a bad header after the first; the rest of the shard
    # would be lost without a word. It is counted, and the samples before it are kept.
    path = tmp_path / "a.tar"
    write_tar(path, SAMPLES)
    data = bytearray(path.read_bytes())
    third_sample = 8 * 512  # s0 and s1: a header and one data block for each of 2 members
    data[third_sample + 10] ^= 0xFF  # s2.json's name: its checksum no longer matches
    path.write_bytes(bytes(data))
    counter = ErrorCounter()
    keys = [s["__key__"] for s in iter_samples(str(path), counter)]
    assert keys == ["s0"]  # s1 was in progress when the error came: not trusted
    assert counter.counts == {"ReadError": 1}


class Trickle:
    """A stream that returns at most 100 bytes per read, as a pipe or socket may."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, n: int = -1) -> bytes:
        n = 100 if n < 0 else min(n, 100)
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_short_reads_are_not_taken_for_the_end(tmp_path):
    from fusion.data.tar import _tar_members

    path = tmp_path / "a.tar"
    write_tar(path, SAMPLES)
    got = [m for m in _tar_members(Trickle(path.read_bytes()))]
    assert [(name, data) for name, data in got] == [(n, d) for n, d in SAMPLES]
