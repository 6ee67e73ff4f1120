"""Hostile data: the loader and the shard builder survive bad shards and bad samples,
skip each one and count it by reason; nothing is extracted, followed or written outside."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pytest
from PIL import Image

from fusion.config import load_config
from fusion.data.build import main as fusion_data
from fusion.data.samples import SampleMaker
from fusion.data.shards import ErrorCounter, list_shards
from fusion.data.tar import ShardWriter, iter_samples
from fusion.data.tokenizer import ByteTokenizer
from tests.conftest import encode_mp4, square_frame
from tests.unit.test_build_media import FITS, PDF, failures, members_by_key, png_bomb, write_jsonl

TEN_MB = 10 * 1024 * 1024


def png(color="red", x=4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(square_frame(color, x, 4)).save(buf, format="PNG")
    return buf.getvalue()


def add(tar, name, data=b"", kind=tarfile.REGTYPE, **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def clip(n_frames=8) -> bytes:
    return encode_mp4([square_frame("blue", 2 + 2 * i, 10) for i in range(n_frames)])


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    """One shard of good and hostile samples, one truncated shard, one of garbage bytes."""
    d = tmp_path_factory.mktemp("hostile") / "shards"
    d.mkdir()
    outside = d.parent / "outside"
    video = clip()
    with tarfile.open(d / "000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in [
            ("good0", {"png": png(), "txt": b"a red square"}),
            ("empty", {"jpg": b"", "txt": b"nothing"}),  # 0-byte image
            ("bomb", {"png": png_bomb(20000, 20000), "txt": b"bomb"}),  # pixel bomb
            ("paper", {"jpg": PDF, "txt": b"a pdf"}),  # PDF named .jpg
            ("sky", {"jpg": FITS, "txt": b"a fits file"}),  # FITS named .jpg
            ("long", {"png": png(), "txt": b"a" * TEN_MB}),  # 10 MB caption
            ("dotted.v2", {"png": png(), "txt": b"a dotted key"}),  # key with dots
            ("good1", {"png": png("green"), "txt": b"a green square"}),
            ("good0", {"png": png("blue"), "txt": b"the same key again"}),  # duplicate key
            (
                "lies",
                {
                    "mp4": video,
                    "txt": b"a blue square moves right",  # json over-counts
                    "json": json.dumps(
                        {"fps": 8.0, "n_frames": 40, "duration": 5.0, "width": 32, "height": 32}
                    ).encode(),
                },
            ),
        ]:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
        add(tar, f"../{outside.name}/escape.txt", b"x")  # ../ member
        add(tar, f"{outside}/absolute.txt", b"x")  # absolute path
        add(tar, "link.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd")  # symlink
        add(tar, "link.txt", b"a symlinked picture")
        add(tar, "hard.png", kind=tarfile.LNKTYPE, linkname="good1.png")  # hardlink
        add(tar, "hard.txt", b"a hardlinked picture")
        add(tar, "dev.png", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)  # device
        add(tar, "dev.txt", b"a device")
        add(tar, "good2.png", png("yellow"))
        add(tar, "good2.txt", b"a yellow square")
    with ShardWriter(d, 1) as w:
        for i in range(6):
            w.write(f"cut{i}", {"png": png(), "txt": "x" * 2000})
    data = (d / "000001.tar").read_bytes()
    (d / "000001.tar").write_bytes(data[: len(data) // 2])  # truncated tar
    (d / "000002.tar").write_bytes(b"\x89garbage, not a tar" * 300)  # garbage named .tar
    return d


def test_loader_skips_and_counts_every_hostile_case(hostile_dir, monkeypatch):
    cfg = load_config(
        None,
        [
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "data.n_frames=4",
            "data.video_backend=pyav",
        ],
    )
    counter = ErrorCounter()
    maker = SampleMaker(cfg, ByteTokenizer(), train=True, counter=counter)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail(f"slept {s} s on an error"))
    made, t0 = {}, time.perf_counter()
    for raw in iter_samples(list_shards(str(hostile_dir)), counter):
        sample = maker(raw)
        if sample is not None:
            made.setdefault(raw["__key__"], sample)
    seconds = time.perf_counter() - t0
    # the truncated shard keeps the samples completed before the cut, and only those
    cut = sorted(k for k in made if k.startswith("cut"))
    assert 0 < len(cut) < 6 and cut == [f"cut{i}" for i in range(len(cut))]
    assert sorted(set(made) - set(cut)) == ["good0", "good1", "good2", "lies"]
    assert made["good0"]["images"][0].shape == (3, 32, 32)
    assert made["lies"]["videos"][0].shape == (4, 3, 32, 32)  # indices past the real 8 frames clamped
    counts = dict(counter.counts)
    assert counts == {
        "empty_file": 1,
        "too_many_pixels": 1,
        "unsupported_format": 2,
        "caption_too_long": 1,
        "dotted_key": 1,
        "duplicate_key": 1,
        "unsafe_member": 5,
        "ReadError": 2,
    }, counts
    assert not (hostile_dir.parent / "outside").exists()
    assert seconds < 30, seconds  # generous: a pixel bomb or the 10 MB caption is never decoded whole


def test_verify_survives_the_hostile_shards(hostile_dir, capsys):
    assert fusion_data(["verify", str(hostile_dir), "--modality", "image", "--workers", "1"]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    for reason in (
        "unsafe_member",
        "duplicate_key",
        "ReadError",
        "too_many_pixels",
        "unsupported_format",
        "dotted_key",
    ):
        assert reason in text, (reason, text[-2000:])


def test_builder_skips_and_counts_hostile_records(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "good.png": png(),
        "bomb.png": png_bomb(20000, 20000),
        "paper.jpg": PDF,
        "sky.jpg": FITS,
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    records = [
        {"id": "ok", "image": "good.png", "caption": "a red square"},
        {"id": "a.b", "image": "good.png", "caption": "a key with a dot"},  # stored as a_b
        {"id": "a_b", "image": "good.png", "caption": "the same key now"},  # duplicate_key
        {"id": "ok", "image": "good.png", "caption": "again"},  # duplicate_key
        {"id": "long", "image": "good.png", "caption": "a" * TEN_MB},  # text_too_long
        {"id": "bomb", "image": "bomb.png", "caption": "x"},  # too_many_pixels
        {"id": "pdf", "image": "paper.jpg", "caption": "x"},  # unsupported_format
        {"id": "fits", "image": "sky.jpg", "caption": "x"},  # unsupported_format
        {"id": "zero", "image": "empty.jpg", "caption": "x"},  # empty_file
        {"id": "../../escape", "image": "good.png", "caption": "a key that is a path"},
    ]
    out = tmp_path / "out"
    assert (
        fusion_data(
            [
                "images",
                "--input",
                str(write_jsonl(src / "in.jsonl", records)),
                "--output",
                str(out),
                "--key-col",
                "id",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert failures(out) == {
        "duplicate_key": 2,
        "text_too_long": 1,
        "too_many_pixels": 1,
        "unsupported_format": 2,
        "empty_file": 1,
    }
    assert sorted(members_by_key(out)) == ["______escape", "a_b", "ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing written outside
    assert fusion_data(["verify", str(out)]) == 0
    capsys.readouterr()
