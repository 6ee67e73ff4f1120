"""Shard library: keys, deterministic atomic writing, discovery, tolerant reading, index, checks."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from fusion.data.shards import (
    ErrorCounter,
    SampleError,
    collect_stats,
    is_shard_complete,
    is_valid_key,
    list_shards,
    read_index,
    sanitize_key,
    shard_name,
    split_member_name,
    write_index,
)
from fusion.data.tar import ShardWriter, decode_text, iter_samples, iter_texts
from fusion.data.verify import check_sample, guess_modality


def write_text_shard(directory, index, docs, failures=()):
    with ShardWriter(directory, index) as w:
        for key, text in docs:
            w.write(key, {"txt": text, "json": {"key": key}})
        for reason in failures:
            w.fail(reason)
    return w.stats


def jpeg_bytes(size=(16, 12), color=(200, 30, 30)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def add_member(tar, name, data, **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- keys


def test_key_rules():
    assert is_valid_key("abc_DEF-019")
    for bad in ["", "a.b", "a/b", "a b", "é", None]:
        assert not is_valid_key(bad)
    assert sanitize_key("doc.1/2 x") == "doc_1_2_x"
    assert sanitize_key(12) == "12"
    assert sanitize_key(None) == ""
    assert split_member_name("a.b.jpg") == ("a", "b.jpg")
    assert split_member_name("dir/k.txt") == ("dir/k", "txt")
    assert split_member_name("README") == (None, None)


def test_writer_rejects_bad_and_duplicate_keys(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        w.write("ok", {"txt": "x"})
        with pytest.raises(SampleError) as e:
            w.write("a.b", {"txt": "x"})
        assert e.value.reason == "bad_key"
        with pytest.raises(SampleError) as e:
            w.write("ok", {"txt": "y"})
        assert e.value.reason == "duplicate_key"
        with pytest.raises(SampleError) as e:
            w.write("surr", {"txt": "bad \udcff"})
        assert e.value.reason == "bad_utf8"
    assert [s["__key__"] for s in iter_samples(str(tmp_path / "000000.tar"))] == ["ok"]


# ---------------------------------------------------------------- writing


def test_round_trip_and_stats(tmp_path):
    docs = [(f"doc{i}", f"text number {i} ü") for i in range(5)]
    stats = write_text_shard(tmp_path, 3, docs, failures=["empty_text", "empty_text", "too_short"])
    assert sorted(os.listdir(tmp_path)) == ["000003.tar", "000003_stats.json"]
    on_disk = json.loads((tmp_path / "000003_stats.json").read_text())
    assert on_disk == stats
    assert stats["count"] == 8 and stats["successes"] == 5
    assert stats["failures"] == {"empty_text": 2, "too_short": 1}
    assert stats["bytes"] == (tmp_path / "000003.tar").stat().st_size
    assert is_shard_complete(tmp_path, 3, count=8) and not is_shard_complete(tmp_path, 3, count=9)

    counter = ErrorCounter()
    samples = list(iter_samples(str(tmp_path / "000003.tar"), counter))
    assert counter.total == 0
    assert [s["__key__"] for s in samples] == [k for k, _ in docs]
    assert [decode_text(s["txt"]) for s in samples] == [t for _, t in docs]
    assert json.loads(samples[0]["json"]) == {"key": "doc0"}
    assert samples[0]["__url__"] == str(tmp_path / "000003.tar")


def test_tars_are_deterministic(tmp_path):
    docs = [(f"k{i}", "x" * (100 * i)) for i in range(4)]
    write_text_shard(tmp_path / "a", 0, docs)
    time.sleep(1.1)  # a different wall clock must not change a byte
    write_text_shard(tmp_path / "b", 0, docs)
    a = (tmp_path / "a" / "000000.tar").read_bytes()
    assert a == (tmp_path / "b" / "000000.tar").read_bytes()
    with tarfile.open(tmp_path / "a" / "000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:4] == ["k0.json", "k0.txt", "k1.json", "k1.txt"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_writer_bytes_equal_tarfile_pax_output(tmp_path):
    # The hand-written headers are what tarfile writes for the same members (a 150-character
    # key takes tarfile's own PAX path).
    samples = [(f"k{i}", {"txt": "x" * (37 * i), "json": b"{}"}) for i in range(20)]
    samples.append(("L" * 150, {"txt": "long name"}))
    with ShardWriter(tmp_path, 0) as w:
        for key, members in samples:
            w.write(key, members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext].encode() if isinstance(members[ext], str) else members[ext]
                add_member(tar, f"{key}.{ext}", data, mtime=0, mode=0o644, uname="", gname="")
    assert (tmp_path / "000000.tar").read_bytes() == buf.getvalue()


def test_aborted_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 0) as w:
            w.write("a", {"txt": "x"})
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_shards_read_with_plain_webdataset_and_tarfile(tmp_path):
    import webdataset as wds

    write_text_shard(tmp_path, 0, [("a", "alpha"), ("b", "beta")])
    write_text_shard(tmp_path, 1, [("c", "gamma")])
    urls = list_shards(str(tmp_path))
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x, workersplitter=lambda x: x)
    got = [(s["__key__"], s["txt"].decode()) for s in ds]
    assert got == [("a", "alpha"), ("b", "beta"), ("c", "gamma")]
    with tarfile.open(urls[0]) as tar:
        assert tar.getnames() == ["a.json", "a.txt", "b.json", "b.txt"]
        assert tar.extractfile("b.txt").read() == b"beta"


def test_shards_list_with_gnu_tar(tmp_path):
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar on PATH")
    write_text_shard(tmp_path, 0, [("a", "alpha"), ("b", "beta")])
    run = subprocess.run([tar, "tf", str(tmp_path / "000000.tar")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["a.json", "a.txt", "b.json", "b.txt"]


def test_img2dataset_layout_written_by_plain_tarfile(tmp_path):
    # img2dataset: 9-digit keys, jpg/txt/json, real mtimes and owners, default tarfile settings;
    # plus a dotted name, a file without extension and a __meta__ member.
    jpg = jpeg_bytes()
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            key = f"{i:09d}"
            add_member(tar, f"{key}.jpg", jpg, mtime=time.time(), uname="someone")
            add_member(tar, f"{key}.txt", f"caption {i}".encode())
            add_member(tar, f"{key}.json", json.dumps({"width": 16, "height": 12, "key": key}).encode())
        add_member(tar, "x.seg.PNG", b"mask")
        add_member(tar, "README", b"ignored")
        add_member(tar, "__meta__", b"ignored")
    counter = ErrorCounter()
    samples = list(iter_samples(str(path), counter))
    assert counter.total == 0
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "x"]
    assert samples[1]["jpg"] == jpg and samples[1]["txt"] == b"caption 1"
    # webdataset's rule: the key ends at the first dot, extensions are lower-cased.
    assert samples[3]["seg.png"] == b"mask"
    # ... so a lone dotted name is diagnosed as one, not as a sample that merely lacks its image
    assert check_sample(samples[3], "image")[:2] == ["dotted_key", "missing_txt"]
    assert check_sample(samples[0], "image") == []
    assert guess_modality(samples[0]) == "image"


# ---------------------------------------------------------------- tolerant reading


def test_truncated_and_garbage_shards_are_counted_and_skipped(tmp_path):
    write_text_shard(tmp_path, 0, [("a", "alpha"), ("b", "beta")])
    write_text_shard(tmp_path, 1, [(f"t{i}", "y" * 3000) for i in range(6)])
    write_text_shard(tmp_path, 3, [("z", "zeta")])
    full = (tmp_path / "000001.tar").read_bytes()
    (tmp_path / "000001.tar").write_bytes(full[: len(full) // 2])
    (tmp_path / "000002.tar").write_bytes(os.urandom(3000))
    (tmp_path / "000004.tar").write_bytes(b"")

    counter = ErrorCounter()
    t0 = time.perf_counter()
    keys = [s["__key__"] for s in iter_samples(list_shards(str(tmp_path)), counter)]
    assert time.perf_counter() - t0 < 5  # no 0.5 s sleep per error
    # Samples completed before the truncation are kept, the one cut in half is dropped.
    assert keys[:2] == ["a", "b"] and keys[-1] == "z"
    partial = keys[2:-1]
    assert 0 < len(partial) < 6 and partial == [f"t{i}" for i in range(len(partial))]
    assert counter.counts == {"ReadError": 3}
    assert any("000002.tar" in m for m in counter.examples["ReadError"])

    with pytest.raises(tarfile.ReadError):  # without a counter the first error is raised
        list(iter_samples(str(tmp_path / "000002.tar")))


def test_tar_cut_at_a_block_boundary_is_an_error(tmp_path):
    # tarfile reads a tar cut between two members as a shorter archive; the missing end-of-archive
    # blocks give it away. The samples before the cut are kept, the last one is not trusted.
    write_text_shard(tmp_path, 0, [(f"k{i}", "x" * 600) for i in range(4)])
    data = (tmp_path / "000000.tar").read_bytes()
    sample_bytes = 5 * 512  # json: header + 1 block; txt: header + 2 blocks
    (tmp_path / "000000.tar").write_bytes(data[: 2 * sample_bytes + 1024])  # k2.json only
    counter = ErrorCounter()
    keys = [s["__key__"] for s in iter_samples(str(tmp_path / "000000.tar"), counter)]
    assert keys == ["k0", "k1"]
    assert counter.counts == {"ReadError": 1}
    assert "end-of-archive" in counter.examples["ReadError"][0]


def test_missing_shard_and_duplicate_member(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.txt", b"1")
        add_member(tar, "a.txt", b"2")
        add_member(tar, "b.txt", b"3")
    counter = ErrorCounter()
    keys = [s["__key__"] for s in iter_samples([str(tmp_path / "nope.tar"), str(path)], counter)]
    assert keys == ["b"]
    assert counter.counts == {"FileNotFoundError": 1, "duplicate_member": 1}


def test_error_counter_as_webdataset_handler(tmp_path):
    import webdataset as wds

    write_text_shard(tmp_path, 0, [("a", "alpha")])
    (tmp_path / "000001.tar").write_bytes(b"not a tar at all" * 100)
    write_text_shard(tmp_path, 2, [("c", "gamma")])
    counter = ErrorCounter()
    ds = wds.WebDataset(
        list_shards(str(tmp_path)),
        handler=counter,
        shardshuffle=False,
        nodesplitter=lambda x: x,
        workersplitter=lambda x: x,
    )
    assert [s["__key__"] for s in ds] == ["a", "c"]
    assert counter.total >= 1
    counter("decode_failed")
    assert counter.counts["decode_failed"] == 1
    assert counter(SampleError("bad_utf8")) is True and counter.counts["bad_utf8"] == 1


def test_text_decoding_counts_bad_utf8(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        w.write("good", {"txt": "héllo"})
        w.write("bad", {"txt": b"\xff\xfe bad"})
        w.write("notxt", {"json": b"{}"})
    counter = ErrorCounter()
    assert list(iter_texts(str(tmp_path), counter)) == [("good", "héllo")]
    assert counter.counts == {"bad_utf8": 1, "missing_txt": 1}
    with pytest.raises(SampleError) as e:
        decode_text(b"\xc3")
    assert e.value.reason == "bad_utf8"


# ---------------------------------------------------------------- discovery


def test_list_shards(tmp_path):
    for i in (0, 1, 2, 10):
        write_text_shard(tmp_path, i, [(f"k{i}", "x")])
    (tmp_path / "000003.tar.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    d = str(tmp_path)
    names = [os.path.basename(p) for p in list_shards(d)]
    assert names == ["000000.tar", "000001.tar", "000002.tar", "000010.tar"]
    assert list_shards(f"{d}/{{000000..000002}}.tar") == [f"{d}/00000{i}.tar" for i in range(3)]
    assert list_shards(f"{d}/{{000000,000010}}.tar") == [f"{d}/000000.tar", f"{d}/000010.tar"]
    assert list_shards(f"{d}/000001.tar, {d}/000000.tar") == [f"{d}/000001.tar", f"{d}/000000.tar"]
    assert list_shards(f"{d}/000001.tar {d}/000002.tar") == [f"{d}/000001.tar", f"{d}/000002.tar"]
    assert len(list_shards(f"{d}/*.tar")) == 4
    assert list_shards("pipe:cat /x/a.tar") == ["pipe:cat /x/a.tar"]
    assert list_shards("https://h/s/{0..1}.tar") == ["https://h/s/0.tar", "https://h/s/1.tar"]
    assert list_shards("s3://bucket/a.tar") == ["s3://bucket/a.tar"]

    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        list_shards(str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="000099"):
        list_shards(f"{d}/{{000000..000001}}.tar,{d}/000099.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(ValueError):
        list_shards("  ,  ")


def test_read_samples_through_pipe_url(tmp_path):
    write_text_shard(tmp_path, 0, [("a", "alpha")])
    counter = ErrorCounter()
    url = f"pipe:cat {tmp_path / '000000.tar'}"
    assert [s["__key__"] for s in iter_samples(list_shards(url), counter)] == ["a"]
    assert counter.total == 0


# ---------------------------------------------------------------- index, stats, checks


def test_write_index_and_collect_stats(tmp_path):
    write_text_shard(tmp_path, 0, [("a", "x"), ("b", "y")], failures=["empty_text"])
    write_text_shard(tmp_path, 1, [("c", "z")], failures=["bad_utf8", "empty_text"])
    index = write_index(tmp_path, "text")
    assert read_index(tmp_path) == index
    assert index["modality"] == "text" and index["n_samples"] == 3
    for entry in index["shards"]:
        data = (tmp_path / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    assert [e["n_samples"] for e in index["shards"]] == [2, 1]
    s = collect_stats(tmp_path)
    assert (s["shards"], s["count"], s["successes"]) == (2, 6, 3)
    assert s["failures"] == {"bad_utf8": 1, "empty_text": 2}
    assert s["modality"] == "text" and s["index_n_samples"] == 3
    with pytest.raises(ValueError):
        write_index(tmp_path, "audio")


def test_write_index_needs_a_count_or_a_stats_file(tmp_path):
    write_text_shard(tmp_path, 0, [("a", "x")])
    with tarfile.open(tmp_path / "other.tar", "w") as tar:  # another tool's shard: no stats file
        info = tarfile.TarInfo("b.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"y"))
    with pytest.raises(ValueError, match="other.tar: no count given"):
        write_index(tmp_path, "text")
    assert not (tmp_path / "index.json").exists()
    index = write_index(tmp_path, "text", counts={"other.tar": 1})
    assert [(e["name"], e["n_samples"]) for e in index["shards"]] == [("000000.tar", 1), ("other.tar", 1)]


def test_collect_stats_reads_img2dataset_counts(tmp_path):
    write_text_shard(tmp_path, 0, [("a", "x")])
    (tmp_path / "000000_stats.json").write_text(
        json.dumps(
            {
                "count": 5,
                "successes": 3,
                "failed_to_download": 1,
                "failed_to_resize": 1,
                "duration": 2.5,
                "status_dict": {"success": 3},
                "start_time": "yesterday",
            }
        )
    )
    s = collect_stats(tmp_path)
    assert (s["count"], s["successes"], s["seconds"]) == (5, 3, 2.5)
    assert s["failures"] == {"failed_to_download": 1, "failed_to_resize": 1}


def test_check_sample_by_modality():
    pytest.importorskip("av")
    try:
        from .videos import encode_video
    except ImportError:  # run as a plain file
        from videos import encode_video

    jpg = jpeg_bytes()
    meta = json.dumps({"width": 16, "height": 12, "source": "x"}).encode()
    image = {"__key__": "k", "jpg": jpg, "txt": b"a cat", "json": meta}
    assert check_sample(image, "image") == []
    assert check_sample({**image, "jpg": jpg[: len(jpg) // 2]}, "image") == ["bad_image"]
    assert check_sample({"__key__": "k", "txt": b"a cat", "json": meta}, "image") == ["missing_image"]
    assert check_sample({**image, "__key__": "a.b"}, "image") == ["bad_key"]
    assert check_sample({"__key__": "t", "txt": b"\xff"}, "text") == ["bad_utf8"]
    assert check_sample({"__key__": "t", "txt": b"ok", "json": b"{"}, "text") == ["bad_json"]
    clip = encode_video(n_frames=4, height=32, width=40)
    video = {"__key__": "v", "mp4": clip, "txt": b"c", "json": b'{"n_frames": 4}'}
    assert check_sample(video, "video") == []
    assert check_sample({**video, "mp4": b""}, "video") == ["empty_file"]
    assert check_sample({**video, "mp4": b"\x00\x01"}, "video") == ["corrupt_video"]
    assert check_sample({**video, "json": b'{"n_frames": 5}'}, "video") == ["n_frames_mismatch"]
    qa = json.dumps({"question": "q?", "answer": "a", "choices": ["a", "b"], "type": "color"}).encode()
    vqa = {"__key__": "q", "png": jpg, "json": qa}  # wrong extension for the bytes still decodes
    assert check_sample(vqa, "vqa") == []
    assert guess_modality(vqa) == "vqa"
    assert check_sample({**vqa, "json": b'{"question": "q?"}'}, "vqa") == ["bad_vqa_json"]
    wrong = json.dumps({"question": "q?", "answer": "c", "choices": ["a", "b"]}).encode()
    assert check_sample({**vqa, "json": wrong}, "vqa") == ["answer_not_in_choices"]
    assert check_sample({**image, "json": b'{"width": 15, "height": 12}'}, "image") == ["size_mismatch"]
    assert shard_name(7) == "000007.tar"
