"""`fusion-data images / videos / vqa` and `fusion.data.images`, on tiny files made in tmp_path."""

import io
import json
import random
import struct
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.data.build.cli import COMMANDS, main
from fusion.data.images import open_image, read_image, resize, to_tensor
from fusion.data.shards import SampleError, list_shards, read_index
from fusion.data.tar import ShardWriter
from fusion.data.video import DECORD_BAD_WIDTHS, encoded_size

try:
    from . import videos
except ImportError:  # run as a plain file
    import videos

av = pytest.importorskip("av")


# ---------------------------------------------------------------- fixtures


def image_bytes(fmt="JPEG", size=(32, 32), mode="RGB", seed=0, **save):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_bomb(width=20000, height=20000):
    """A 100-byte PNG whose header claims width x height pixels; its pixel data is garbage, so a
    decoder that got past the header would fail with bad_image, not too_many_pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
FITS = b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 50


def zero_frame_avi():
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # a header with a video stream, then no frames
    return buf.getvalue()


def write_jsonl(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")
    return path


def tars(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.tar"))}


def failures(directory):
    total = {}
    for p in Path(directory).glob("*_stats.json"):
        for reason, n in json.loads(p.read_text())["failures"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def members_by_key(directory):
    """{key: {ext: bytes}} read with plain tarfile."""
    out = {}
    for path in sorted(Path(directory).glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def webdataset_samples(directory):
    import webdataset as wds

    return {s["__key__"]: s for s in wds.WebDataset(list_shards(str(directory)), shardshuffle=False)}


def build(command, src, out, *extra):
    return main([command, "--input", str(src), "--output", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    files = {
        "good.jpg": image_bytes("JPEG", seed=1),
        "alpha.png": image_bytes("PNG", mode="RGBA", seed=2),
        "anim.gif": image_bytes("GIF", mode="P", seed=3),
        "plain.bmp": image_bytes("BMP", seed=4),
        "cmyk.jpg": image_bytes("JPEG", mode="CMYK", seed=5),
        "wide.webp": image_bytes("WEBP", size=(64, 32), seed=6),
        "truncated.jpg": image_bytes("JPEG", seed=7)[:300],
        "bomb.png": png_bomb(),
        "paper.jpg": PDF,
        "sky.jpg": FITS,
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (d / "sub").mkdir(exist_ok=True)
        (d / "sub" / name).write_bytes(data)
    return d


# ---------------------------------------------------------------- images.py


def test_read_image_reasons_and_colour_conversion():
    limit = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    with pytest.raises(SampleError) as e:
        open_image(png_bomb(20000, 20000), 50_000_000)  # over Pillow's hard limit too
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(SampleError) as e:
        open_image(png_bomb(2000, 2000), 1_000_000)  # under Pillow's, over ours
    assert e.value.reason == "too_many_pixels" and "2000x2000" in str(e.value)
    assert time.perf_counter() - t0 < 0.5  # nothing was decoded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning never escapes
        with pytest.raises(SampleError) as e:
            open_image(png_bomb(10000, 10000), 200_000_000)
    assert e.value.reason == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == limit

    jpg = image_bytes("JPEG")
    for data, reason in [
        (b"", "empty_file"),
        (jpg[: len(jpg) // 2], "bad_image"),
        (b"\xff\xd8\xff" + b"garbage" * 20, "bad_image"),
        (b"hello" * 30, "bad_image"),
        (PDF, "unsupported_format"),
        (FITS, "unsupported_format"),
        (image_bytes("TIFF"), "unsupported_format"),
        (image_bytes("ICO"), "unsupported_format"),
    ]:
        with pytest.raises(SampleError) as e:
            open_image(data, 10**6)
        assert e.value.reason == reason, (data[:10], str(e.value))

    # alpha composited on white; palette transparency too; 16-bit grey scaled, not clipped
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    got = np.asarray(open_image(buf.getvalue()))
    assert got[0, 0].tolist() == [255, 0, 0] and got[1, 1].tolist() == [255, 255, 255]
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.putpixel((0, 0), 1)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    got = np.asarray(open_image(buf.getvalue()))
    assert got[0, 0].tolist() == [10, 200, 10] and got[2, 2].tolist() == [255, 255, 255]
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(buf, "PNG")
    img = open_image(buf.getvalue())
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [128, 128, 128]
    for data in (
        image_bytes("JPEG", mode="CMYK"),
        image_bytes("GIF", mode="P"),
        image_bytes("BMP"),
        image_bytes("PNG", mode="L"),
        image_bytes("WEBP"),
    ):
        img = open_image(data)
        assert img.mode == "RGB" and img.size == (32, 32)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = read_image(image_bytes("JPEG", size=(32, 16), exif=exif))
    assert d.rotated and d.image.size == (16, 32) and d.format == "JPEG"


def test_resize_encode_and_to_tensor():
    img = open_image(image_bytes("PNG", size=(64, 32)))
    assert resize(img, 16, "keep_ratio").size == (16, 8)
    assert resize(img, 128, "keep_ratio") is img  # never enlarged
    assert resize(img, 16, "center_crop").size == (16, 16)
    assert resize(img, 16, "pad").size == (16, 16)
    assert np.asarray(resize(img, 16, "pad"))[0, 0].tolist() == [255, 255, 255]
    assert resize(img, 16, "none") is img and resize(img, 0, "pad") is img

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = to_tensor(img, 16, mean, std, train=False)
    assert a.shape == (3, 16, 16) and str(a.dtype) == "torch.float32"
    assert (to_tensor(img, 16, mean, std) == a).all()
    white = Image.new("RGB", (40, 20), (255, 255, 255))
    assert to_tensor(white, 8, mean, std).eq(2.0).all()  # (1 - 0.5) / 0.25
    t1 = to_tensor(img, 16, mean, std, train=True, rng=random.Random(3))
    t2 = to_tensor(img, 16, mean, std, train=True, rng=random.Random(3))
    assert t1.shape == (3, 16, 16) and (t1 == t2).all()


# ---------------------------------------------------------------- images


def test_images_bad_inputs_counted_good_ones_readable(image_dir, tmp_path, capsys):
    good = ["good.jpg", "alpha.png", "anim.gif", "plain.bmp", "cmyk.jpg", "wide.webp"]
    records = [
        {"id": f"g{i}", "image": f"sub/{name}", "caption": f"picture {i}"} for i, name in enumerate(good)
    ]
    bad = {
        "truncated.jpg": "bad_image",
        "bomb.png": "too_many_pixels",
        "paper.jpg": "unsupported_format",
        "sky.jpg": "unsupported_format",
        "empty.jpg": "empty_file",
        "missing.jpg": "missing_file",
    }
    records += [{"id": f"b{i}", "image": f"sub/{name}", "caption": "x"} for i, name in enumerate(bad)]
    records += [
        {"id": "c1", "image": "sub/good.jpg", "caption": "  "},
        {"id": "c2", "image": "sub/good.jpg", "caption": None},
        b'{"id": "c3", "image": "sub/good.jpg", "caption": "caf\xe9"}\n',  # Latin-1, not UTF-8
        {"id": "g0", "image": "sub/good.jpg", "caption": "again"},
    ]
    src = write_jsonl(image_dir / "pairs.jsonl", records)
    out = tmp_path / "out"
    assert build("images", src, out, "--key-col", "id", "--samples-per-shard", "5", "--workers", "2") == 0
    summary = capsys.readouterr().out
    assert "16 records" in summary and "6 samples in 4 shards" in summary and "samples/s" in summary
    assert failures(out) == {
        "bad_image": 1,
        "too_many_pixels": 1,
        "unsupported_format": 2,
        "empty_file": 1,
        "missing_file": 1,
        "empty_caption": 2,
        "bad_utf8": 1,
        "duplicate_key": 1,
    }

    got = members_by_key(out)
    assert sorted(got) == [f"g{i}" for i in range(6)]
    # --format keep: unchanged JPEG/PNG/WEBP stored as they are; GIF and BMP become PNG
    assert {k: sorted(v) for k, v in got.items()} == {
        "g0": ["jpg", "json", "txt"],
        "g1": ["json", "png", "txt"],
        "g2": ["json", "png", "txt"],
        "g3": ["json", "png", "txt"],
        "g4": ["jpg", "json", "txt"],
        "g5": ["json", "txt", "webp"],
    }
    assert got["g0"]["jpg"] == (image_dir / "sub/good.jpg").read_bytes()
    assert json.loads(got["g5"]["json"]) == {"width": 64, "height": 32, "source": "sub/wide.webp"}
    assert got["g1"]["txt"] == b"picture 1"

    wds_samples = webdataset_samples(out)
    assert sorted(wds_samples) == sorted(got)
    for s in wds_samples.values():
        ext = next(e for e in ("jpg", "png", "webp") if e in s)
        img = Image.open(io.BytesIO(s[ext]))
        meta = json.loads(s["json"])
        assert img.size == (meta["width"], meta["height"])
    assert read_index(out)["n_samples"] == 6 and read_index(out)["modality"] == "image"
    assert main(["verify", str(out)]) == 0


def test_images_resize_and_reencode(image_dir, tmp_path):
    src = write_jsonl(
        image_dir / "two.jsonl",
        [
            {"image": "sub/wide.webp", "caption": "a"},
            {"image": str(image_dir / "sub/good.jpg"), "caption": "b"},
        ],
    )
    out = tmp_path / "crop"
    assert (
        build(
            "images",
            src,
            out,
            "--max-side",
            "16",
            "--resize-mode",
            "center_crop",
            "--format",
            "png",
            "--workers",
            "1",
        )
        == 0
    )
    got = members_by_key(out)
    for s in got.values():
        assert Image.open(io.BytesIO(s["png"])).size == (16, 16)
        assert json.loads(s["json"])["width"] == 16
    assert json.loads(got["000000001"]["json"])["source"] == str(image_dir / "sub/good.jpg")
    out = tmp_path / "ratio"
    assert build("images", src, out, "--max-side", "16", "--format", "jpg", "--quality", "50") == 0
    sizes = {k: Image.open(io.BytesIO(s["jpg"])).size for k, s in members_by_key(out).items()}
    assert sizes == {"000000000": (16, 8), "000000001": (16, 16)}


def test_images_resume_is_byte_identical(image_dir, tmp_path):
    records = [
        {"image": f"sub/{n}", "caption": f"c{i}"}
        for i, n in enumerate(["good.jpg", "alpha.png", "wide.webp", "bomb.png", "cmyk.jpg"] * 2)
    ]
    src = write_jsonl(image_dir / "resume.jsonl", records)
    flags = ["--samples-per-shard", "3", "--max-side", "24", "--format", "webp", "--workers", "2"]
    ref = tmp_path / "ref"
    assert build("images", src, ref, *flags) == 0
    out = tmp_path / "out"
    assert build("images", src, out, *flags) == 0
    (out / "000001_stats.json").unlink()  # interrupted before its stats
    (out / "000002.tar").rename(out / "000002.tar.tmp")  # interrupted while writing
    (out / "000002_stats.json").unlink()
    assert build("images", src, out, *flags) == 0
    assert tars(out) == tars(ref) and len(tars(ref)) == 4
    assert not list(out.glob("*.tmp"))


def test_malformed_input_names_file_and_line_and_keeps_shards(image_dir, tmp_path, capsys):
    lines = [json.dumps({"image": "sub/good.jpg", "caption": f"c{i}"}).encode() + b"\n" for i in range(4)]
    src = write_jsonl(image_dir / "broken.jsonl", lines + [b'{"image": "sub/good.jpg", "capt\n'])
    out = tmp_path / "out"
    assert build("images", src, out, "--samples-per-shard", "2", "--workers", "1") == 1
    err = capsys.readouterr().err
    assert "broken.jsonl:5" in err and "invalid JSON" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "000000.tar",
        "000000_stats.json",
        "000001.tar",
        "000001_stats.json",
    ]
    assert len(members_by_key(out)) == 4

    src = write_jsonl(image_dir / "nocap.jsonl", [{"image": "sub/good.jpg", "text": "t"}])
    assert build("images", src, tmp_path / "o2") == 1
    assert "nocap.jsonl:1: missing column 'caption'" in capsys.readouterr().err
    csv_src = image_dir / "pairs.csv"
    csv_src.write_text("path,caption\nsub/good.jpg,a dog\n")
    assert build("images", csv_src, tmp_path / "o3") == 1
    assert "pairs.csv:1: missing column 'image' in header" in capsys.readouterr().err
    assert build("images", csv_src, tmp_path / "o3", "--image-col", "path") == 0


# ---------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    clip = videos.encode_video(n_frames=10, height=32, width=40, fps=10)
    fast = videos.encode_video(n_frames=10, height=32, width=40, fps=10, faststart=True)
    with av.open(io.BytesIO(fast)) as c:
        offsets = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
    files = {
        "clip.mp4": clip,
        "narrow.mp4": videos.encode_video(n_frames=10, height=32, width=24, fps=10),
        "empty.mp4": b"",
        "cut_index.mp4": clip[: len(clip) // 2],  # the index (moov, written last) is lost
        "cut_media.mp4": fast[: len(fast) * 3 // 4],  # index first, media cut mid-packet
        "cut_packet.mp4": fast[: offsets[6]],  # cut exactly between packets: decodes 6 frames
        "audio.mp4": videos.encode_audio_only(),
        "zero.avi": zero_frame_avi(),
        "still.mp4": image_bytes("PNG"),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def test_videos_reencode_counts_bad_inputs_and_decodes(video_dir, tmp_path, capsys):
    from fusion.data.video import decode, probe

    records = [{"video": "clip.mp4", "caption": "a clip"}, {"video": "narrow.mp4", "caption": "narrow"}]
    bad = {
        "empty.mp4": "empty_file",
        "cut_index.mp4": "corrupt_video",
        "cut_media.mp4": "corrupt_video",
        "cut_packet.mp4": "corrupt_video",
        "audio.mp4": "no_video_stream",
        "zero.avi": "zero_frames",
        "still.mp4": "unsupported_format",
        "gone.mp4": "missing_file",
    }
    records += [{"video": name, "caption": "bad"} for name in bad]
    records += [{"video": "clip.mp4", "caption": ""}, b'{"video": "clip.mp4", "caption": "\xff\xfe"}\n']
    src = write_jsonl(video_dir / "clips.jsonl", records)
    out = tmp_path / "out"
    assert build("videos", src, out, "--samples-per-shard", "4", "--workers", "2") == 0
    assert "12 records" in capsys.readouterr().out
    assert failures(out) == {
        "empty_file": 1,
        "corrupt_video": 3,
        "no_video_stream": 1,
        "zero_frames": 1,
        "unsupported_format": 1,
        "missing_file": 1,
        "empty_caption": 1,
        "bad_utf8": 1,
    }
    samples = webdataset_samples(out)
    assert sorted(samples) == ["000000000", "000000001"]
    meta = json.loads(samples["000000000"]["json"])
    assert meta == {
        "fps": 10.0,
        "n_frames": 10,
        "duration": 1.0,
        "width": 40,
        "height": 32,
        "source": "clip.mp4",
    }
    data = samples["000000000"]["mp4"]
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.format.name == "yuv420p"
        assert len(c.streams.audio) == 0
        keyframes = [p.is_keyframe for p in c.demux(stream) if p.size]
    assert keyframes == [True] + [False] * 7 + [True, False]  # --keyframe-interval 8
    for backend in ("decord", "pyav"):
        frames = decode(data, list(range(10)), backend=backend)
        assert frames.shape == (10, 32, 40, 3)
        assert videos.frame_ids(frames) == list(range(10))  # the right frames, in order
    # a 24-pixel-wide source (decord 0.6.0 misreads width 24) is stored 22 wide
    narrow = samples["000000001"]
    assert json.loads(narrow["json"])["width"] == 22
    pytest.importorskip("decord")
    assert decode(narrow["mp4"], [0, 9], backend="decord").shape == (2, 32, 22, 3)
    assert probe(narrow["mp4"], backend="pyav").n_frames == 10
    assert main(["verify", str(out)]) == 0


def test_video_fps_max_side_and_decord_safe_widths(video_dir, tmp_path):
    from fusion.data.video import decode

    src = write_jsonl(video_dir / "one.jsonl", [{"video": "clip.mp4", "caption": "c"}])
    out = tmp_path / "out"
    assert build("videos", src, out, "--fps", "5", "--max-side", "20", "--crf", "18") == 0
    s = next(iter(webdataset_samples(out).values()))
    meta = json.loads(s["json"])
    assert (meta["fps"], meta["n_frames"], meta["width"], meta["height"]) == (5.0, 5, 20, 16)
    assert videos.frame_ids(decode(s["mp4"], list(range(5)), backend="pyav")) == [0, 2, 4, 6, 8]

    assert encoded_size(1920, 1080, 0) == (1920, 1080) and encoded_size(33, 17, 0) == (32, 16)
    assert encoded_size(1920, 1080, 256) == (256, 144)
    for width in (8, 16, 24, 48, 72, 1000):
        w, h = encoded_size(width, 32, 0)
        assert w not in DECORD_BAD_WIDTHS and w % 2 == 0 and w >= 10


def test_video_copy_keeps_bytes_and_resume_is_byte_identical(video_dir, tmp_path):
    src = write_jsonl(
        video_dir / "copy.jsonl",
        [{"video": "clip.mp4", "caption": "c"}, {"video": "zero.avi", "caption": "z"}],
    )
    out = tmp_path / "copy"
    assert build("videos", src, out, "--copy") == 0
    s = members_by_key(out)["000000000"]
    assert s["mp4"] == (video_dir / "clip.mp4").read_bytes()
    assert json.loads(s["json"])["n_frames"] == 10
    assert failures(out) == {"unsupported_format": 1}  # --copy stores mp4 only
    assert main(["verify", str(out)]) == 0  # n_frames as PyAV decodes

    records = [{"video": n, "caption": f"c{i}"} for i, n in enumerate(["clip.mp4", "narrow.mp4"] * 3)]
    src = write_jsonl(video_dir / "resume.jsonl", records)
    flags = ["--samples-per-shard", "2", "--workers", "2", "--max-side", "32", "--fps", "8"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert build("videos", src, ref, *flags) == 0
    assert build("videos", src, out, *flags) == 0
    (out / "000000_stats.json").unlink()
    (out / "000002.tar").rename(out / "000002.tar.tmp")
    assert build("videos", src, out, *flags) == 0
    assert tars(out) == tars(ref) and len(tars(ref)) == 3  # libx264 on one thread


# ---------------------------------------------------------------- vqa


def test_vqa_images_and_videos_with_choice_validation(image_dir, video_dir, tmp_path):
    (video_dir / "pic.jpg").write_bytes((image_dir / "sub/good.jpg").read_bytes())
    csv_src = video_dir / "qa.csv"
    csv_src.write_text(
        "image,video,question,answer,choices,type\n"
        "pic.jpg,,What color?,red,red|green|blue,color\n"
        ',clip.mp4,What moves?,the ball,"[""the ball"", ""the cube""]",motion\n'
        "pic.jpg,,How many?,4,1|2|3,count\n"
        "pic.jpg,,Which?,a,a,count\n"
        "pic.jpg,,Which?,a,a|a,count\n"
        ",,Where?,up,up|down,place\n"
        "pic.jpg,clip.mp4,Both?,x,x|y,place\n"
        "pic.jpg,, ,x,x|y,place\n"
        "sub/missing.jpg,,Where?,up,up|down,place\n"
    )
    out = tmp_path / "vqa"
    assert build("vqa", csv_src, out, "--workers", "1") == 0
    assert failures(out) == {
        "answer_not_in_choices": 1,
        "bad_choices": 2,
        "missing_file": 2,
        "ambiguous_media": 1,
        "empty_question": 1,
    }
    got = members_by_key(out)
    assert sorted(got) == ["000000000", "000000001"]
    assert sorted(got["000000000"]) == ["jpg", "json"] and sorted(got["000000001"]) == ["json", "mp4"]
    q0 = json.loads(got["000000000"]["json"])
    assert q0 == {
        "question": "What color?",
        "answer": "red",
        "choices": ["red", "green", "blue"],
        "type": "color",
        "source": "pic.jpg",
        "width": 32,
        "height": 32,
    }
    q1 = json.loads(got["000000001"]["json"])
    assert q1["choices"] == ["the ball", "the cube"] and q1["n_frames"] == 10 and q1["type"] == "motion"
    assert read_index(out)["modality"] == "vqa"
    assert main(["verify", str(out)]) == 0

    src = write_jsonl(
        video_dir / "qa.jsonl", [{"image": "pic.jpg", "question": "Q?", "answer": 2, "choices": [1, 2, 3]}]
    )
    out = tmp_path / "vqa2"
    assert build("vqa", src, out) == 0  # no type column: 'default'
    meta = json.loads(next(iter(members_by_key(out).values()))["json"])
    assert (meta["answer"], meta["choices"], meta["type"]) == ("2", ["1", "2", "3"], "default")


def test_vqa_jsonl_decides_media_and_type_per_record(image_dir, video_dir, tmp_path, capsys):
    (video_dir / "pic.jpg").write_bytes((image_dir / "sub/good.jpg").read_bytes())
    qa = {"question": "Q?", "answer": "a", "choices": ["a", "b"]}
    src = write_jsonl(
        video_dir / "mixed.jsonl",
        [
            {"image": "pic.jpg", **qa},  # no type, no video column
            {"video": "clip.mp4", **qa, "type": "motion"},  # no image column
            {"image": "pic.jpg", **qa, "type": "color"},
            {"video": "clip.mp4", "image": None, **qa},  # both columns, one filled
            {"image": "pic.jpg", "video": "clip.mp4", **qa},  # both filled: ambiguous_media
        ],
    )
    out = tmp_path / "mixed"
    assert build("vqa", src, out, "--workers", "1") == 0
    assert "3 of 5 records in mixed.jsonl have no 'type' column" in capsys.readouterr().err
    assert failures(out) == {"ambiguous_media": 1}
    got = members_by_key(out)
    kinds = {k: next(e for e in v if e != "json") for k, v in got.items()}
    types = {k: json.loads(v["json"])["type"] for k, v in got.items()}
    assert kinds == {"000000000": "jpg", "000000001": "mp4", "000000002": "jpg", "000000003": "mp4"}
    assert types == {
        "000000000": "default",
        "000000001": "motion",
        "000000002": "color",
        "000000003": "default",
    }
    assert main(["verify", str(out)]) == 0

    # A record naming no media column at all is a malformed input, named by file and line.
    src = write_jsonl(video_dir / "nomedia.jsonl", [{"image": "pic.jpg", **qa}, {"picture": "pic.jpg", **qa}])
    assert build("vqa", src, tmp_path / "bad") == 1
    err = capsys.readouterr().err
    assert "nomedia.jsonl:2: missing column 'image' or 'video'" in err and len(err.splitlines()) == 1
    csv_src = video_dir / "nomedia.csv"
    csv_src.write_text("picture,question,answer,choices\npic.jpg,Q?,a,a|b\n")
    assert build("vqa", csv_src, tmp_path / "bad") == 1
    assert "nomedia.csv:1: missing column 'image' or 'video' in header" in capsys.readouterr().err


def test_vqa_conversations_in_a_turns_column(image_dir, tmp_path, capsys):
    """A record may hold several questions about its picture (`turns`, LLaVA-style): each is
    checked like a one-question record, all are stored in order, the first also at the top level
    (what `verify` and fusion-eval read); a record mixing both forms uses its turns."""
    from fusion.data.samples import vqa_turns

    turns = [
        {"question": "What color?", "answer": "red", "choices": ["red", "blue"], "type": "color"},
        {"question": "How many?", "answer": 2, "choices": [1, 2, 3], "type": "count"},
    ]
    qa = {"question": "Q?", "answer": "a", "choices": ["a", "b"], "type": "t"}
    src = write_jsonl(
        image_dir / "conv.jsonl",
        [
            {"image": "sub/good.jpg", "turns": turns},
            {"image": "sub/good.jpg", **qa},  # one question: as before
            {"image": "sub/good.jpg", **qa, "turns": turns[1:]},  # turns win
            {"image": "sub/good.jpg", "turns": [{**turns[0], "answer": "green"}]},
            {"image": "sub/good.jpg", "turns": [turns[0], {"question": "Q?", "answer": "a"}]},
            {"image": "sub/good.jpg", "turns": []},
            {"image": "sub/good.jpg", "turns": "not json"},
        ],
    )
    out = tmp_path / "conv"
    assert build("vqa", src, out, "--workers", "1") == 0
    assert failures(out) == {"answer_not_in_choices": 1, "bad_choices": 1, "bad_turns": 2}
    got = {k: json.loads(v["json"]) for k, v in members_by_key(out).items()}
    assert sorted(got) == ["000000000", "000000001", "000000002"]
    first = got["000000000"]
    assert first["turns"] == [
        {**turns[0]},
        {"question": "How many?", "answer": "2", "choices": ["1", "2", "3"], "type": "count"},
    ]
    assert {k: first[k] for k in ("question", "answer", "choices", "type")} == first["turns"][0]
    assert "turns" not in got["000000001"] and got["000000002"]["question"] == "How many?"
    assert vqa_turns(first) == [("What color?", "red"), ("How many?", "2")]
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()

    csv_src = image_dir / "conv.csv"  # a CSV cell holds the JSON list
    csv_src.write_text('image,turns\nsub/good.jpg,"' + json.dumps(turns).replace('"', '""') + '"\n')
    assert build("vqa", csv_src, tmp_path / "csv", "--workers", "1") == 0
    assert len(json.loads(next(iter(members_by_key(tmp_path / "csv").values()))["json"])["turns"]) == 2
    assert "have no 'type'" not in capsys.readouterr().err
    bad = write_jsonl(image_dir / "noq.jsonl", [{"image": "sub/good.jpg", "answer": "a", "choices": "a|b"}])
    assert build("vqa", bad, tmp_path / "bad") == 1
    assert "noq.jsonl:1: missing column 'question' or 'turns' in record" in capsys.readouterr().err


def test_vqa_needs_pyav_only_for_its_first_video(image_dir, tmp_path, capsys, monkeypatch):
    import fusion.data.build.cli as build_cli

    monkeypatch.setattr(build_cli, "backend_available", lambda backend: False)
    qa = {"question": "Q?", "answer": "a", "choices": ["a", "b"]}
    src = write_jsonl(image_dir / "novideo.jsonl", [{"image": "sub/good.jpg", **qa}])
    assert build("vqa", src, tmp_path / "images", "--workers", "1") == 0
    src = write_jsonl(
        image_dir / "withvideo.jsonl", [{"image": "sub/good.jpg", **qa}, {"video": "clip.mp4", **qa}]
    )
    assert build("vqa", src, tmp_path / "mixed", "--workers", "1") == 1
    err = capsys.readouterr().err
    assert "withvideo.jsonl:2: a video question, but fusion-data vqa with videos needs PyAV" in err


def test_vqa_stores_jpg_or_png_only(image_dir, tmp_path):
    records = [
        {"image": f"sub/{n}", "question": "Q?", "answer": "a", "choices": "a|b", "type": "t"}
        for n in ("wide.webp", "good.jpg", "alpha.png", "anim.gif")
    ]
    src = write_jsonl(image_dir / "formats.jsonl", records)
    out = tmp_path / "keep"
    assert build("vqa", src, out, "--workers", "1") == 0
    got = members_by_key(out)
    assert {k: sorted(v) for k, v in got.items()} == {
        "000000000": ["json", "png"],
        "000000001": ["jpg", "json"],
        "000000002": ["json", "png"],
        "000000003": ["json", "png"],
    }
    webp = Image.open(image_dir / "sub/wide.webp").convert("RGB")
    stored = Image.open(io.BytesIO(got["000000000"]["png"]))
    assert stored.size == (64, 32) and np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(webp))
    assert got["000000001"]["jpg"] == (image_dir / "sub/good.jpg").read_bytes()
    assert main(["verify", str(out)]) == 0
    assert build("vqa", src, tmp_path / "webp", "--format", "webp") == 2  # not a vqa format
    out = tmp_path / "resized"
    assert build("vqa", src, out, "--max-side", "16", "--workers", "1") == 0
    assert [next(e for e in v if e != "json") for v in members_by_key(out).values()] == [
        "png",
        "jpg",
        "png",
        "png",
    ]


def test_vqa_bom_csv(image_dir, tmp_path):
    src = image_dir / "excel.csv"
    src.write_bytes("\ufeffimage,question,answer,choices,type\nsub/good.jpg,Q?,a,a|b,t\n".encode())
    assert build("vqa", src, tmp_path / "out") == 0
    assert len(members_by_key(tmp_path / "out")) == 1


def test_verify_detects_wrong_metadata(tmp_path, capsys):
    jpg = image_bytes("JPEG")
    clip = videos.encode_video(n_frames=6, height=32, width=40, fps=10)
    with ShardWriter(tmp_path / "img", 0) as w:
        w.write("a", {"jpg": jpg, "txt": "c", "json": {"width": 32, "height": 32, "source": "x"}})
        w.write("b", {"jpg": jpg, "txt": "c", "json": {"width": 31, "height": 32, "source": "x"}})
        w.write("c", {"jpg": png_bomb(), "txt": "c", "json": {}})
    assert main(["verify", str(tmp_path / "img"), "--modality", "image"]) == 1
    out = capsys.readouterr().out
    assert "key b: size_mismatch" in out and "key c: too_many_pixels" in out
    with ShardWriter(tmp_path / "vid", 0) as w:
        w.write("a", {"mp4": clip, "txt": "c", "json": {"n_frames": 6}})
        w.write("b", {"mp4": clip, "txt": "c", "json": {"n_frames": 7}})
        w.write("c", {"mp4": clip[:500], "txt": "c", "json": {}})
    assert main(["verify", str(tmp_path / "vid"), "--modality", "video"]) == 1
    out = capsys.readouterr().out
    assert "key b: n_frames_mismatch" in out and "key c: corrupt_video" in out and "key a" not in out
    with ShardWriter(tmp_path / "qa", 0) as w:
        w.write("a", {"jpg": jpg, "json": {"question": "q", "answer": "z", "choices": ["x", "y"]}})
    assert main(["verify", str(tmp_path / "qa"), "--modality", "vqa"]) == 1
    assert "answer_not_in_choices" in capsys.readouterr().out


def test_every_media_command_is_registered_with_help(capsys):
    assert {"images", "videos", "vqa", "toy"} <= set(COMMANDS)
    assert main(["--help"]) == 0
    for name in ("images", "videos", "vqa"):
        assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--image-col",
        "--video-col",
        "--caption-col",
        "--max-pixels",
        "--max-side",
        "--resize-mode",
        "--format",
        "--quality",
        "--reencode",
        "--copy",
        "--fps",
        "--keyframe-interval",
        "--crf",
        "--question-col",
        "--answer-col",
        "--choices-col",
        "--type-col",
    ):
        assert flag in text
    assert main(["images", "--input", "x.jsonl", "--output", "o", "--bogus"]) == 2


def test_toy_command_fails_alone_when_its_module_does_not_import(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "fusion.data.toy", None)  # import raises ImportError
    assert main(["--help"]) == 0
    assert main(["toy", "--help"]) == 0
    assert main(["toy", "--output", "somewhere", "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "fusion-data toy: error: fusion.data.toy cannot be imported" in err
    assert main(["images", "--input", "x.jsonl", "--output", "o", "--bogus"]) == 2


def test_verify_max_pixels_flag(tmp_path, capsys):
    with ShardWriter(tmp_path / "img", 0) as w:
        w.write("a", {"png": image_bytes("PNG", size=(64, 32)), "txt": "c", "json": {}})
    assert main(["verify", str(tmp_path / "img")]) == 0
    assert main(["verify", str(tmp_path / "img"), "--max-pixels", "1000"]) == 1
    assert "key a: too_many_pixels" in capsys.readouterr().out
