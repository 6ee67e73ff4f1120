"""`fusion-data text / verify / stats`, run through `main([...])` and once as the console script."""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fusion.data.build.cli import COMMANDS, build_parser, main
from fusion.data.shards import ErrorCounter, list_shards, read_index
from fusion.data.tar import ShardWriter, iter_samples

SCRIPT = Path(sys.executable).parent / "fusion-data"


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def docs(n, start=0):
    return [{"text": f"document number {i} " * 3, "lang": "en"} for i in range(start, start + n)]


def tars(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.tar"))}


def samples_by_key(directory):
    counter = ErrorCounter()
    out = {s["__key__"]: s for s in iter_samples(list_shards(str(directory)), counter)}
    assert counter.total == 0
    return out


def build(src, out, *extra):
    return main(["text", "--input", str(src), "--output", str(out), "--no-progress", *extra])


# ---------------------------------------------------------------- building


def test_jsonl_round_trip_keys_json_and_index(tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", docs(25))
    out = tmp_path / "out"
    assert build(src, out, "--samples-per-shard", "10", "--workers", "1") == 0
    summary = capsys.readouterr().out
    assert "25 records" in summary and "25 samples in 3 shards" in summary and "samples/s" in summary

    assert sorted(os.listdir(out)) == [
        "000000.tar",
        "000000_stats.json",
        "000001.tar",
        "000001_stats.json",
        "000002.tar",
        "000002_stats.json",
        "index.json",
    ]
    got = samples_by_key(out)
    assert list(got) == [f"{i:09d}" for i in range(25)]
    s = got["000000007"]
    assert s["txt"].decode() == docs(25)[7]["text"]
    assert json.loads(s["json"]) == {"lang": "en", "source": "docs.jsonl", "line": 8}
    assert s["__url__"].endswith("000000.tar")

    index = read_index(out)
    assert index["modality"] == "text" and index["n_samples"] == 25
    assert [e["n_samples"] for e in index["shards"]] == [10, 10, 5]
    for e in index["shards"]:
        assert e["sha256"] == hashlib.sha256((out / e["name"]).read_bytes()).hexdigest()


def test_bad_records_counted_by_reason_and_shard_position_fixed(tmp_path, capsys):
    lines = [
        json.dumps({"id": "a", "text": "good one"}),  # 0 -> shard 0
        json.dumps({"id": "b", "text": "   "}),  # 1 empty_text
        json.dumps({"id": "a", "text": "again"}),  # 2 duplicate_key
        json.dumps({"id": "c", "text": "ab"}),  # 3 too_short (min 3)
        "",  # blank line: not a record
        '{"id": "d", "text": "bad \xff\xfe bytes"}',  # 4 bad_utf8 (raw bytes, not UTF-8)
        json.dumps({"id": "e", "text": None}),  # 5 empty_text -> shard 1
        json.dumps({"id": "f.1", "text": "fine text"}),  # 6 key f_1
        json.dumps({"id": "", "text": "no key"}),  # 7 empty_key
        json.dumps({"id": "g", "text": 42}),  # 8 not_text
        json.dumps({"id": "h", "text": "last doc"}),  # 9 -> shard 2
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(
        b"\n".join(line.encode("latin-1") if "\xff" in line else line.encode() for line in lines) + b"\n"
    )
    out = tmp_path / "out"
    assert (
        build(src, out, "--key-col", "id", "--min-chars", "3", "--samples-per-shard", "4", "--workers", "2")
        == 0
    )
    summary = capsys.readouterr().out
    assert "7 failed" in summary and "empty_text: 2" in summary

    stats = [json.loads((out / f"00000{i}_stats.json").read_text()) for i in range(3)]
    assert stats[0] == {
        **stats[0],
        "count": 4,
        "successes": 1,
        "failures": {"duplicate_key": 1, "empty_text": 1, "too_short": 1},
    }
    assert stats[1]["count"] == 4 and stats[1]["successes"] == 1
    assert stats[1]["failures"] == {"bad_utf8": 1, "empty_key": 1, "empty_text": 1}
    assert stats[2]["failures"] == {"not_text": 1} and stats[2]["successes"] == 1
    got = samples_by_key(out)
    assert list(got) == ["a", "f_1", "h"]
    assert json.loads(got["f_1"]["json"])["id"] == "f.1"
    assert json.loads(got["h"]["json"])["line"] == 11  # file line, blank line included

    assert main(["stats", str(out), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)
    assert total["failures"] == {
        "bad_utf8": 1,
        "duplicate_key": 1,
        "empty_key": 1,
        "empty_text": 2,
        "not_text": 1,
        "too_short": 1,
    }
    assert (total["count"], total["successes"], total["shards"]) == (10, 3, 3)
    assert main(["stats", str(out)]) == 0
    assert "10 records -> 3 samples; 7 failed" in capsys.readouterr().out


def test_txt_and_csv_inputs(tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_bytes(b"first line\n\n   \nsecond line\nbad \xff line\n")
    assert build(txt, tmp_path / "t", "--workers", "1") == 0
    got = samples_by_key(tmp_path / "t")
    assert [s["txt"] for s in got.values()] == [b"first line", b"second line"]
    assert json.loads(got["000000001"]["json"]) == {"source": "lines.txt", "line": 4}
    assert json.loads((tmp_path / "t" / "000000_stats.json").read_text())["failures"] == {"bad_utf8": 1}

    path = tmp_path / "table.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "body"])
        w.writerow(["x", "a multi\nline document"])
        w.writerow(["y", ""])
        w.writerow(["z", "long " * 40000])  # beyond csv's default 128 KiB field limit
    assert build(path, tmp_path / "c", "--text-col", "body", "--key-col", "name") == 0
    got = samples_by_key(tmp_path / "c")
    assert list(got) == ["x", "z"]
    assert got["x"]["txt"] == b"a multi\nline document"
    assert json.loads(got["x"]["json"]) == {"name": "x", "source": "table.csv", "line": 2}
    assert json.loads(got["z"]["json"])["line"] == 5


def test_workers_do_not_change_the_bytes(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", docs(50))
    assert build(src, tmp_path / "one", "--samples-per-shard", "7", "--workers", "1") == 0
    assert build(src, tmp_path / "two", "--samples-per-shard", "7", "--workers", "3") == 0
    assert tars(tmp_path / "one") == tars(tmp_path / "two")
    assert len(tars(tmp_path / "one")) == 8


# ---------------------------------------------------------------- resume


def test_resume_after_interruption_is_byte_identical(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", docs(35))
    out = tmp_path / "out"
    assert build(src, out, "--samples-per-shard", "10", "--workers", "1") == 0
    reference = tars(out)
    index = (out / "index.json").read_bytes()
    capsys.readouterr()

    # Interrupted while writing the last shard: its stats missing, a temporary tar left behind.
    (out / "000003_stats.json").unlink()
    (out / "000003.tar.tmp").write_bytes(b"half a tar")
    (out / "index.json").unlink()
    assert build(src, out, "--samples-per-shard", "10", "--workers", "2") == 0
    assert "1 written, 3 reused" in capsys.readouterr().out
    assert tars(out) == reference
    assert (out / "index.json").read_bytes() == index
    assert not list(out.glob("*.tmp"))

    # A complete shard deleted, another one's stats gone: both rebuilt, the rest kept.
    (out / "000001.tar").unlink()
    (out / "000002_stats.json").unlink()
    assert build(src, out, "--samples-per-shard", "10", "--workers", "1") == 0
    assert "2 written, 2 reused" in capsys.readouterr().out
    assert tars(out) == reference

    # Other settings or another input reuse nothing: the last shard had the same record count
    # (5) under --samples-per-shard 5 and 10, and --min-chars changes no record.
    assert build(src, out, "--samples-per-shard", "5", "--workers", "1") == 0
    assert "7 written, 0 reused" in capsys.readouterr().out
    assert read_index(out)["n_samples"] == 35
    assert build(src, out, "--samples-per-shard", "5", "--min-chars", "2") == 0
    assert "7 written, 0 reused" in capsys.readouterr().out
    write_jsonl(src, docs(34) + [{"text": "changed last record"}])
    assert build(src, out, "--samples-per-shard", "5", "--min-chars", "2") == 0
    assert "1 written, 6 reused" in capsys.readouterr().out
    assert samples_by_key(out)["000000034"]["txt"] == b"changed last record"


# ---------------------------------------------------------------- bad input


def test_malformed_jsonl_names_file_and_line_and_keeps_complete_shards(tmp_path, capsys):
    src = tmp_path / "broken.jsonl"
    lines = [json.dumps(d) for d in docs(23)]
    lines.insert(22, '{"text": "unterminated')  # line 23, in shard 2 (records 20..)
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert build(src, out, "--samples-per-shard", "10", "--workers", "2") == 1
    err = capsys.readouterr().err
    assert f"{src}:23: invalid JSON" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert (out / "000001_stats.json").exists() and not (out / "index.json").exists()
    assert len(samples_by_key(out)) == 20

    # Fixed input: the two complete shards are reused.
    del lines[22]
    src.write_text("\n".join(lines) + "\n")
    assert build(src, out, "--samples-per-shard", "10") == 0
    assert "1 written, 2 reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"text": "a"}\n{"body": "b"}\n', [], "bad.jsonl:2: missing column 'text' in record"),
        ('{"text": "a"}\n[1, 2]\n', [], "bad.jsonl:2: expected a JSON object"),
        ('{"text": "a", "id": 1}\n{"text": "b"}\n', ["--key-col", "id"], "bad.jsonl:2: missing column 'id'"),
    ],
)
def test_bad_records_in_jsonl(tmp_path, capsys, content, args, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    assert build(src, tmp_path / "out", *args) == 1
    assert message in capsys.readouterr().err


def test_bad_files_and_flags(tmp_path, capsys):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("title,body\nx,y\n")
    assert build(csv_path, tmp_path / "o") == 1
    assert "t.csv:1: missing column 'text' in header" in capsys.readouterr().err
    ragged = tmp_path / "r.csv"
    ragged.write_text("text,a\nx,1\ny\n")
    assert build(ragged, tmp_path / "o") == 1
    assert "r.csv:3: 1 fields, header has 2" in capsys.readouterr().err

    assert build(tmp_path / "missing.jsonl", tmp_path / "o") == 1
    assert "--input: no such file" in capsys.readouterr().err
    other = tmp_path / "data.xml"
    other.write_text("<a/>")
    assert build(other, tmp_path / "o") == 1
    assert "unknown format" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert build(empty, tmp_path / "e") == 1
    assert "empty.jsonl: no records" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()

    src = write_jsonl(tmp_path / "d.jsonl", docs(3))
    assert build(src, tmp_path / "o", "--workers", "zero") == 2
    err = capsys.readouterr().err
    assert "argument --workers" in err and len(err.strip().splitlines()) == 1
    assert build(src, tmp_path / "o", "--samples-per-shard", "0") == 2
    assert "--samples-per-shard" in capsys.readouterr().err
    assert main(["text", "--output", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_parquet_needs_pyarrow(tmp_path, capsys):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        src = tmp_path / "d.parquet"
        src.write_bytes(b"PAR1")
        assert build(src, tmp_path / "o") == 1
        assert "needs pyarrow" in capsys.readouterr().err
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a doc", "another"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert build(tmp_path / "d.parquet", tmp_path / "o") == 0
    assert len(samples_by_key(tmp_path / "o")) == 2


def test_shards_left_from_a_longer_build_of_the_same_input_are_removed(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    out = tmp_path / "out"
    assert build(write_jsonl(src, docs(30)), out, "--samples-per-shard", "10") == 0
    assert build(write_jsonl(src, docs(12)), out, "--samples-per-shard", "10") == 0
    assert (
        "removed 1 shard(s) left by an earlier, longer build of this input (000002.tar)"
        in capsys.readouterr().err
    )
    assert [e["name"] for e in read_index(out)["shards"]] == ["000000.tar", "000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == [
        "000000.tar",
        "000000_stats.json",
        "000001.tar",
        "000001_stats.json",
        "index.json",
    ]
    assert len(samples_by_key(out)) == 12  # what training reads == index.json


def test_another_input_into_an_output_with_shards_is_refused(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", docs(25))
    b = write_jsonl(tmp_path / "b.jsonl", docs(8, start=100))
    out = tmp_path / "out"
    assert build(a, out, "--samples-per-shard", "10") == 0  # 3 shards
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    assert build(b, out, "--samples-per-shard", "10") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--output: '{out}' already holds 3 shard(s) not built from this input" in err
    assert str(a.resolve()) in err and "another --output" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # --overwrite: the old shards go (the stale 000001 and 000002 too); index and directory agree.
    assert build(b, out, "--samples-per-shard", "10", "--overwrite") == 0
    assert "--overwrite: removed 3 shard(s)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000000_stats.json", "index.json"]
    assert [e["name"] for e in read_index(out)["shards"]] == ["000000.tar"]
    assert list(samples_by_key(out)) == [f"{i:09d}" for i in range(8)]
    assert samples_by_key(out)["000000000"]["txt"].decode() == docs(1, start=100)[0]["text"]

    # The same input again resumes: everything reused.
    assert build(b, out, "--samples-per-shard", "10") == 0
    assert "0 written, 1 reused" in capsys.readouterr().out


def test_shards_of_another_tool_are_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    with ShardWriter(out, 0) as w:  # a plain shard: no record of the input behind it
        w.write("mine", {"txt": "keep me"})
    with tarfile.open(out / "000001.tar", "w"):  # a plain tarfile, no stats at all
        pass
    src = write_jsonl(tmp_path / "d.jsonl", docs(3))
    assert build(src, out) == 1
    err = capsys.readouterr().err
    assert "already holds 2 shard(s) not built from this input" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000000_stats.json", "000001.tar"]
    assert build(src, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000000_stats.json", "index.json"]
    assert len(samples_by_key(out)) == 3


def test_output_holding_another_modality_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"modality": "image", "n_samples": 0, "shards": []}))
    src = write_jsonl(tmp_path / "d.jsonl", docs(2))
    assert build(src, out) == 1
    err = capsys.readouterr().err
    assert "holds image shards" in err and "--overwrite" in err
    assert build(src, out, "--overwrite") == 0
    assert read_index(out)["modality"] == "text"


@pytest.mark.parametrize(
    "name, content",
    [
        ("bom.jsonl", '\ufeff{"text": "first doc"}\n{"text": "second doc"}\n'),
        ("bom.csv", "\ufefftext,lang\nfirst doc,en\nsecond doc,en\n"),
        ("bom.txt", "\ufefffirst doc\nsecond doc\n"),
    ],
)
def test_utf8_bom_at_the_start_is_skipped(tmp_path, name, content):
    src = tmp_path / name
    src.write_bytes(content.encode("utf-8"))  # Excel's "CSV UTF-8" starts so
    assert build(src, tmp_path / "out", "--workers", "1") == 0
    got = samples_by_key(tmp_path / "out")
    assert [s["txt"] for s in got.values()] == [b"first doc", b"second doc"]


def test_every_flag_has_help():
    parser = build_parser()
    assert {"text", "verify", "stats"} <= set(COMMANDS)
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
    assert main(["text", "--help"]) == 0


# ---------------------------------------------------------------- verify


def test_verify_ok_then_detects_corruption(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", docs(30))
    out = tmp_path / "out"
    assert build(src, out, "--samples-per-shard", "10") == 0
    index_before = read_index(out)
    (out / "index.json").unlink()
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "2"]) == 0
    assert "text, 3 shards, 30 samples" in capsys.readouterr().out
    assert read_index(out) == index_before

    data = (out / "000001.tar").read_bytes()
    (out / "000001.tar").write_bytes(data[: len(data) // 2])
    assert main(["verify", str(out), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert f"{out / '000001.tar'}: unreadable" in report and "FAILED" in report
    entry = read_index(out)["shards"][1]
    assert entry["sha256"] == hashlib.sha256((out / "000001.tar").read_bytes()).hexdigest()
    assert entry["n_samples"] < 10


def test_verify_names_bad_samples_and_duplicate_keys(tmp_path, capsys):
    d = tmp_path / "hand"
    with ShardWriter(d, 0) as w:
        w.write("a", {"txt": "fine"})
        w.write("b", {"txt": b"\xff not utf8"})
    with ShardWriter(d, 1) as w:
        w.write("a", {"txt": "same key again"})
        w.write("c", {"txt": "ok", "json": b"{broken"})
    # A hand-made shard with a dotted name (key 'd', field 'x.txt'): named as a dotted key.
    with tarfile.open(d / "000002.tar", "w") as tar:
        info = tarfile.TarInfo("d.x.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert main(["verify", str(d), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert "000000.tar: key b: bad_utf8" in report
    assert "000001.tar: key a: duplicate_key (also in 000000.tar)" in report
    assert "000001.tar: key c: bad_json" in report
    assert "000002.tar: key d: dotted_key" in report
    assert read_index(d)["modality"] == "text"  # guessed from the members


def test_verify_image_modality_from_flag(tmp_path, capsys):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with ShardWriter(tmp_path, 0) as w:
        w.write("ok", {"png": buf.getvalue(), "txt": "c", "json": {"width": 8, "height": 8}})
        w.write("cut", {"png": buf.getvalue()[:40], "txt": "c", "json": {}})
    assert main(["verify", str(tmp_path), "--modality", "image"]) == 1
    assert "key cut: bad_image" in capsys.readouterr().out
    assert read_index(tmp_path)["modality"] == "image"


# ---------------------------------------------------------------- the installed console script


def test_console_script(tmp_path):
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e the project"
    src = write_jsonl(tmp_path / "d.jsonl", docs(12))
    out = tmp_path / "out"
    run = subprocess.run(
        [
            str(SCRIPT),
            "text",
            "--input",
            str(src),
            "--output",
            str(out),
            "--samples-per-shard",
            "5",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "12 samples in 3 shards" in run.stdout
    assert "rec" in run.stderr  # the progress bar
    run = subprocess.run([str(SCRIPT), "stats", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "12 records -> 12 samples" in run.stdout
    run = subprocess.run(
        [str(SCRIPT), "text", "--input", str(tmp_path / "nope.jsonl"), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and "nope.jsonl" in run.stderr
    shutil.rmtree(out)
