"""The toy world: layout and counts, determinism, one right answer per question, images and videos
that show their metadata, and held-out colour-shape pairs that never reach training data."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.data import toy
from fusion.data.shards import list_shards, read_index, read_shard_stats
from fusion.data.tar import iter_samples
from fusion.data.verify import check_sample

pytest.importorskip("av")

SIZE = 32
FLAGS = dict(
    n_text=120,
    n_image=30,
    n_video=9,
    n_vqa_train=60,
    n_vqa_test=20,
    n_vqa_compositional=25,
    n_video_vqa_train=8,
    n_video_vqa_test=4,
    samples_per_shard=16,
    vqa_turns=5,
)
SPLIT_COUNTS = {
    "text": "n_text",
    "image": "n_image",
    "video": "n_video",
    "vqa_image_train": "n_vqa_train",
    "vqa_image_test": "n_vqa_test",
    "vqa_image_compositional": "n_vqa_compositional",
    "vqa_video_train": "n_video_vqa_train",
    "vqa_video_test": "n_video_vqa_test",
}
MODALITY = {"text": "text", "image": "image", "video": "video"}
TRAINING = ("text", "image", "video", "vqa_image_train", "vqa_video_train")

# The templates are a contract with VQA sets made elsewhere: spelled out here, not imported.
TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many objects are there?",
    "position": "Is the {color} {shape} on the left or the right?",
    "exists": "Is there a {color} {shape}?",
    "direction": "Which way does the {color} {shape} move?",
}
CHOICES = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange"],
    "shape": ["circle", "square", "triangle"],
    "count": ["1", "2", "3", "4"],
    "position": ["left", "right"],
    "exists": ["yes", "no"],
    "direction": ["left", "right", "up", "down"],
}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "seed0"
    toy.generate_toy(out, seed=0, image_size=SIZE, **FLAGS)
    return out


@pytest.fixture(scope="module")
def samples(toy_dir) -> dict[str, list[dict]]:
    """split -> samples in order, each with its json decoded under 'meta'."""
    out = {}
    for split in SPLIT_COUNTS:
        rows = []
        for s in iter_samples(list_shards(str(toy_dir / split))):
            s["meta"] = json.loads(s["json"]) if "json" in s else None
            rows.append(s)
        out[split] = rows
    return out


def parse_question(question: str) -> tuple[str, dict]:
    """(type, {color, shape}) of a question, by matching the templates."""
    for qtype, template in TEMPLATES.items():
        pattern = (
            re.escape(template)
            .replace(r"\{color\}", r"(?P<color>\w+)")
            .replace(r"\{shape\}", r"(?P<shape>\w+)")
        )
        m = re.fullmatch(pattern, question)
        if m:
            return qtype, m.groupdict()
    raise AssertionError(f"question matches no template: {question!r}")


def nearest_color(pixels: np.ndarray) -> np.ndarray:
    """Index into PALETTE (background first) of the nearest palette colour, per pixel."""
    palette = np.array([toy.BACKGROUND] + list(toy.COLORS.values()), float)  # (7, 3)
    d = ((pixels[..., None, :].astype(float) - palette) ** 2).sum(-1)  # (..., 7)
    return d.argmin(-1)


def color_id(name: str) -> int:
    return 1 + list(toy.COLORS).index(name)


# ---------------------------------------------------------------- layout, counts, CLI


def test_layout_counts_and_index(toy_dir, samples):
    manifest = json.loads((toy_dir / "toy.json").read_text())
    assert manifest["vqa_turns"] == FLAGS["vqa_turns"]
    for split, arg in SPLIT_COUNTS.items():
        n = FLAGS[arg]
        index = read_index(toy_dir / split)
        assert index["modality"] == MODALITY.get(split, "vqa")
        assert index["n_samples"] == n == len(samples[split])
        assert len(index["shards"]) == math.ceil(n / FLAGS["samples_per_shard"])
        assert sum(s["n_samples"] for s in index["shards"]) == n
        for shard in index["shards"]:
            stats = read_shard_stats(toy_dir / split / shard["name"])
            assert stats["successes"] == shard["n_samples"] and stats["failures"] == {}
        assert manifest["splits"][split]["n_samples"] == n
        keys = [s["__key__"] for s in samples[split]]
        assert len(set(keys)) == n
        for s in samples[split]:
            assert check_sample(s, index["modality"]) == [], (split, s["__key__"])
        if index["modality"] == "vqa":
            by_type = Counter(s["meta"]["type"] for s in samples[split])
            assert dict(by_type) == manifest["splits"][split]["by_type"]
            types = ("direction",) if "video" in split else toy.IMAGE_TYPES
            per_type = n // len(types)
            assert set(by_type) == set(types)
            assert all(per_type <= k <= per_type + 1 for k in by_type.values())
    for s in samples["image"]:
        assert "png" in s and s["meta"]["source"] == "toy"
        assert (s["meta"]["width"], s["meta"]["height"]) == (SIZE, SIZE)
    for s in samples["video"]:
        assert {"fps", "n_frames", "duration", "width", "height"} <= set(s["meta"])
        assert 8 <= s["meta"]["n_frames"] <= 16 and s["meta"]["fps"] == toy.FPS
    assert manifest["seed"] == 0 and manifest["image_size"] == SIZE


def test_answers_balanced_within_each_type(samples):
    for split in ("vqa_image_train", "vqa_image_test", "vqa_video_train"):
        answers: dict[str, Counter] = {}
        for s in samples[split]:
            answers.setdefault(s["meta"]["type"], Counter())[s["meta"]["answer"]] += 1
        for qtype, counts in answers.items():
            n = sum(counts.values())
            if n >= len(CHOICES[qtype]):
                assert set(counts) == set(CHOICES[qtype]), (split, qtype, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (split, qtype, counts)


def test_cli_flags_and_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fusion-data toy")
    toy.add_toy_arguments(parser)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    flags = {o for a in parser._actions for o in a.option_strings}
    assert {
        "--output",
        "--seed",
        "--image-size",
        "--n-text",
        "--n-image",
        "--n-video",
        "--n-vqa-train",
        "--n-vqa-test",
        "--n-video-vqa-train",
        "--n-video-vqa-test",
        "--samples-per-shard",
        "--vqa-turns",
        "--extra-colors",
    } <= flags
    args = parser.parse_args(
        [
            "--output",
            str(tmp_path / "t"),
            "--n-text",
            "3",
            "--n-image",
            "2",
            "--n-video",
            "0",
            "--n-vqa-train",
            "5",
            "--n-vqa-test",
            "5",
            "--n-video-vqa-train",
            "1",
            "--n-video-vqa-test",
            "0",
            "--samples-per-shard",
            "2",
            "--workers",
            "2",
        ]
    )
    assert toy.run_toy(args) == 0
    out = capsys.readouterr().out
    assert "vqa_image_train" in out and "color 1" in out and "direction 1" in out
    assert read_index(tmp_path / "t" / "vqa_image_train")["n_samples"] == 5
    assert not (tmp_path / "t" / "video").exists()  # zero samples: no directory
    for bad in (
        ["--image-size", "48"],
        ["--image-size", "33"],
        ["--image-size", "16"],
        ["--n-text", "-1"],
        ["--vqa-turns", "0"],
        ["--vqa-turns", "6"],
        ["--extra-colors", "red"],
        ["--extra-colors", "white,white"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["--output", "x", *bad])
    with pytest.raises(ValueError, match="decord"):
        toy.check_image_size(72)


def test_rerun_with_fewer_samples_drops_surplus_shards(tmp_path):
    small = dict(
        n_text=10, n_image=0, n_video=0, n_vqa_train=0, n_vqa_test=0, n_video_vqa_train=0, n_video_vqa_test=0
    )
    toy.generate_toy(tmp_path, **{**small, "n_text": 10}, samples_per_shard=3)
    assert len(list((tmp_path / "text").glob("*.tar"))) == 4
    toy.generate_toy(tmp_path, **{**small, "n_text": 4}, samples_per_shard=3)
    assert sorted(p.name for p in (tmp_path / "text").glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert read_index(tmp_path / "text")["n_samples"] == 4


def test_shards_the_toy_generator_did_not_write_are_refused(tmp_path, capsys):
    from fusion.data.build import main as fusion_data
    from fusion.data.tar import ShardWriter

    small = dict(
        n_text=4,
        n_image=0,
        n_video=0,
        n_vqa_train=0,
        n_vqa_test=0,
        n_video_vqa_train=0,
        n_video_vqa_test=0,
        samples_per_shard=2,
    )
    with ShardWriter(tmp_path / "image", 0) as w:  # the user's own image shards
        w.write("mine", {"txt": "keep me"})
    mine = (tmp_path / "image" / "000000.tar").read_bytes()
    with pytest.raises(ValueError, match=r"holds 1 shard\(s\) the toy generator did not write"):
        toy.generate_toy(tmp_path, **small)  # n_image=0 would have deleted them
    assert (tmp_path / "image" / "000000.tar").read_bytes() == mine
    assert not (tmp_path / "text").exists() and not (tmp_path / "toy.json").exists()

    src = tmp_path / "docs.txt"
    src.write_text("a document\nanother\n")
    assert (
        fusion_data(["text", "--input", str(src), "--output", str(tmp_path / "w" / "text"), "--no-progress"])
        == 0
    )
    text = (tmp_path / "w" / "text" / "000000.tar").read_bytes()
    assert (
        fusion_data(
            [
                "toy",
                "--output",
                str(tmp_path / "w"),
                "--n-text",
                "4",
                "--n-image",
                "0",
                "--n-video",
                "0",
                "--n-vqa-train",
                "0",
                "--n-vqa-test",
                "0",
                "--n-video-vqa-train",
                "0",
                "--n-video-vqa-test",
                "0",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'w' / 'text'}' holds 1 shard(s) the toy generator did not write" in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "w" / "text" / "000000.tar").read_bytes() == text

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')  # the user's
    with pytest.raises(ValueError, match="is not a toy tokenizer"):
        toy.generate_toy(tmp_path / "tok", **small)
    assert not (tmp_path / "tok" / "text").exists()

    # A toy world is regenerated over itself, with other settings too.
    toy.generate_toy(tmp_path / "t", **small)
    toy.generate_toy(tmp_path / "t", **{**small, "n_text": 2}, seed=3)
    assert read_index(tmp_path / "t" / "text")["n_samples"] == 2


def test_a_complete_world_from_the_same_flags_is_reused(tmp_path, capsys):
    from fusion.data.build import main as fusion_data

    small = dict(
        n_text=5, n_image=4, n_video=0, n_vqa_train=4, n_vqa_test=2, n_video_vqa_train=0, n_video_vqa_test=0
    )
    first = toy.generate_toy(tmp_path, **small, samples_per_shard=2)
    assert first["reused"] is False
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}

    again = toy.generate_toy(tmp_path, **small, samples_per_shard=2)
    assert again["reused"] is True
    assert {k: v for k, v in again.items() if k not in ("seconds", "reused")} == {
        k: v for k, v in first.items() if k not in ("seconds", "reused")
    }
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()} == before

    args = ["toy", "--output", str(tmp_path), "--n-text", "5", "--n-image", "4", "--n-video", "0"]
    args += ["--n-vqa-train", "4", "--n-vqa-test", "2", "--n-video-vqa-train", "0", "--n-video-vqa-test", "0"]
    assert fusion_data([*args, "--samples-per-shard", "2"]) == 0
    assert "reused: its toy.json matches these flags" in capsys.readouterr().out

    # A truncated or altered shard, a missing tokenizer, --force or any other flag: written again,
    # same bytes.
    shard = tmp_path / "image" / "000001.tar"
    shard.write_bytes(before[shard][1][:1000])
    assert toy.generate_toy(tmp_path, **small, samples_per_shard=2)["reused"] is False
    assert shard.read_bytes() == before[shard][1]
    flipped = bytearray(before[shard][1])
    flipped[700] ^= 1
    shard.write_bytes(bytes(flipped))
    assert toy.generate_toy(tmp_path, **small, samples_per_shard=2)["reused"] is False
    assert shard.read_bytes() == before[shard][1]
    (tmp_path / "tokenizer.json").unlink()
    assert toy.generate_toy(tmp_path, **small, samples_per_shard=2)["reused"] is False
    assert fusion_data([*args, "--samples-per-shard", "2", "--force"]) == 0
    assert "reused" not in capsys.readouterr().out
    timed = "_stats.json"  # a shard's stats say how long it took
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(timed)} == {
        p: data for p, (_, data) in before.items() if not p.name.endswith(timed)
    }
    other = toy.generate_toy(tmp_path, **small, samples_per_shard=2, extra_colors=("white",))
    assert other["reused"] is False and other["extra_colors"] == {"white": [235, 235, 235]}


# ---------------------------------------------------------------- determinism


def _tars(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.tar"))}


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _assert_same_world(a: Path, b: Path) -> None:
    """Two toy worlds from the same flags: the same bytes, every shard, index and manifest (x264
    without its macroblock tree encodes the same frames to the same bytes: README, "The toy
    world")."""
    first, second = _tars(a), _tars(b)
    assert first.keys() == second.keys()
    differ = {}  # shard -> its members that differ
    for name in (n for n in first if first[n] != second[n]):
        one, two = _members(first[name]), _members(second[name])
        differ[name] = sorted(m for m in one.keys() | two.keys() if one.get(m) != two.get(m))
    assert differ == {}
    for name in ("toy.json", "tokenizer.json", *(f"{split}/index.json" for split in SPLIT_COUNTS)):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_same_seed_same_bytes_other_seed_differs(toy_dir, tmp_path):
    again = tmp_path / "again"
    toy.generate_toy(again, seed=0, image_size=SIZE, workers=2, **FLAGS)  # workers do not matter
    first = _tars(toy_dir)
    assert len(first) == sum(math.ceil(FLAGS[a] / FLAGS["samples_per_shard"]) for a in SPLIT_COUNTS.values())
    _assert_same_world(toy_dir, again)

    other = tmp_path / "other"
    toy.generate_toy(other, seed=1, image_size=SIZE, **FLAGS)
    third = _tars(other)
    assert third.keys() == first.keys()
    assert all(third[name] != first[name] for name in first)


# ---------------------------------------------------------------- one right answer


def _check_scene(scene: list[dict], size: int) -> None:
    for obj in scene:
        assert obj["shape"] in CHOICES["shape"] and obj["color"] in CHOICES["color"]
        reach = toy.CLEARANCE * obj["size"]
        assert reach <= obj["x"] <= size - reach and reach <= obj["y"] <= size - reach
    for i, a in enumerate(scene):  # no overlaps: counts are exact
        for b in scene[i + 1 :]:
            assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) > toy.CLEARANCE * (a["size"] + b["size"])


def derive_answer(qtype: str, ref: dict, scene: list[dict], size: int) -> str:
    """The one right answer of a question about `scene`, or AssertionError if it is ambiguous."""
    if qtype == "color":
        matches = [o for o in scene if o["shape"] == ref["shape"]]
        assert len(matches) == 1
        return matches[0]["color"]
    if qtype == "shape":
        matches = [o for o in scene if o["color"] == ref["color"]]
        assert len(matches) == 1
        return matches[0]["shape"]
    if qtype == "count":
        return str(len(scene))
    matches = [o for o in scene if (o["color"], o["shape"]) == (ref["color"], ref["shape"])]
    if qtype == "exists":
        assert len(matches) <= 1
        return "yes" if matches else "no"
    assert len(matches) == 1
    obj = matches[0]
    if qtype == "position":  # wholly on one side of the midline
        assert abs(obj["x"] - size / 2) > toy.CLEARANCE * obj["size"]
        return "left" if obj["x"] < size / 2 else "right"
    raise AssertionError(qtype)


def test_every_question_has_one_right_answer(samples):
    n_checked = 0
    for split in ("vqa_image_train", "vqa_image_test", "vqa_image_compositional"):
        for s in samples[split]:
            meta = s["meta"]
            _check_scene(meta["scene"], SIZE)
            for turn in meta.get("turns", [meta]):
                qtype, ref = parse_question(turn["question"])
                assert qtype == turn["type"]
                assert turn["choices"] == CHOICES[qtype] and turn["answer"] in turn["choices"]
                assert derive_answer(qtype, ref, meta["scene"], SIZE) == turn["answer"], meta
                if qtype == "exists" and turn["answer"] == "no":
                    assert (ref["color"], ref["shape"]) not in {
                        (o["color"], o["shape"]) for o in meta["scene"]
                    }
            n_checked += 1
    for split in ("vqa_video_train", "vqa_video_test"):
        for s in samples[split]:
            meta = s["meta"]
            qtype, ref = parse_question(meta["question"])
            assert qtype == meta["type"] == "direction"
            assert meta["choices"] == CHOICES["direction"] and meta["answer"] in meta["choices"]
            scene, event = meta["scene"], meta["event"]
            _check_scene(scene, SIZE)
            movers = [
                k for k, o in enumerate(scene) if (o["color"], o["shape"]) == (ref["color"], ref["shape"])
            ]
            assert movers == [event["index"]] and event["kind"] == "move"
            mover = scene[event["index"]]
            dx, dy = event["x1"] - mover["x"], event["y1"] - mover["y"]
            derived = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert min(abs(dx), abs(dy)) == 0 and max(abs(dx), abs(dy)) >= toy.MIN_TRAVEL * SIZE
            assert derived == meta["answer"]
            n_checked += 1
    assert n_checked == sum(FLAGS[a] for s, a in SPLIT_COUNTS.items() if s.startswith("vqa"))


def test_training_pictures_come_with_a_conversation(samples):
    """vqa_image_train records hold `turns`: the balanced question first (repeated at the top level
    for readers of one question), then other types, each type at most once, no turn naming a
    colour-shape pair an earlier turn already spelled out; test sets keep one question per record."""
    lengths = Counter()
    for s in samples["vqa_image_train"]:
        meta = s["meta"]
        turns = meta["turns"]
        assert turns[0] == {k: meta[k] for k in ("question", "answer", "choices", "type")}
        types = [t["type"] for t in turns]
        assert len(set(types)) == len(types) <= FLAGS["vqa_turns"]
        named = set()
        for turn in turns:
            qtype, ref = parse_question(turn["question"])
            pair = (
                ref.get("color", turn["answer"] if qtype == "color" else None),
                ref.get("shape", turn["answer"] if qtype == "shape" else None),
            )
            if None not in pair:
                assert pair not in named, turns
                named.add(pair)
        lengths[len(turns)] += 1
    assert sum(k * n for k, n in lengths.items()) >= 3 * len(samples["vqa_image_train"])
    for split in ("vqa_image_test", "vqa_image_compositional", "vqa_video_train", "vqa_video_test"):
        assert not any("turns" in s["meta"] for s in samples[split])


def test_text_qa_lines_use_the_templates(samples):
    qa = [s for s in samples["text"] if s["meta"]["kind"] == "qa"]
    assert qa, "no Q/A documents in the text corpus"
    for s in qa:
        text = s["txt"].decode()
        m = re.search(r"Q: (.+\?) A: (\S+)$", text)
        assert m, text
        qtype, _ = parse_question(m.group(1))
        assert qtype == s["meta"]["type"] and m.group(2) == s["meta"]["answer"]
        assert m.group(2) in CHOICES[qtype]


def test_word_tokenizer_covers_every_text_and_answers_are_one_token(toy_dir, samples, tmp_path):
    """DIR/tokenizer.json: every caption, question, answer and choice of every split encodes without
    the unknown token, a VQA answer is a single token, the special tokens have fixed ids inside the
    file, and a word from outside the toy world still encodes (as the unknown token)."""
    from fusion.data.samples import vqa_answer, vqa_prompt
    from fusion.data.tokenizer import build_tokenizer
    from fusion.schema import SPECIAL_TOKENS

    path = toy_dir / "tokenizer.json"
    assert json.loads((toy_dir / "toy.json").read_text())["tokenizer"] == "tokenizer.json"
    tok = build_tokenizer(str(path))
    unk = tok._tok.token_to_id(toy.UNKNOWN_WORD)
    stored = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    assert all(stored[t] == tok.special_ids[t] for t in SPECIAL_TOKENS)
    n = 0
    for split, rows in samples.items():
        for s in rows:
            meta = s.get("meta") or {}
            texts = [s["txt"].decode()] if "txt" in s else []
            for turn in meta.get("turns", [meta] if "question" in meta else []):
                texts += [vqa_prompt(turn["question"])]
                texts += [vqa_answer(c) for c in turn.get("choices", [turn["answer"]])]
                assert len(tok.encode(vqa_answer(turn["answer"]))) == 1, meta
            for text in texts:
                ids = tok.encode(text)
                assert ids and unk not in ids, (split, text)
                n += 1
    assert n > 500
    assert tok.encode("a zebra") == [tok.encode("a")[0], unk]
    assert (
        tok.decode(tok.encode(" Q: What color is the circle? A: red"))
        == "Q : What color is the circle ? A : red"
    )


# ---------------------------------------------------------------- pixels


def test_images_show_their_scene(samples):
    for split in ("image", "vqa_image_train", "vqa_image_test", "vqa_image_compositional"):
        for s in samples[split]:
            img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
            assert img.shape == (SIZE, SIZE, 3)
            scene = s["meta"]["scene"]
            for obj in scene:
                centre = img[int(obj["y"]), int(obj["x"])]
                assert tuple(centre) == toy.COLORS[obj["color"]], (split, s["__key__"], obj)
            present = {tuple(p) for p in img.reshape(-1, 3)}
            assert present == {toy.BACKGROUND} | {toy.COLORS[o["color"]] for o in scene}


# ---------------------------------------------------------------- held-out pairs


def _mentions(text: str, pair: tuple[str, str]) -> bool:
    return re.search(rf"\b{pair[0]} {pair[1]}", text) is not None


def _pairs_of(meta: dict) -> set[tuple[str, str]]:
    """Every colour-shape pair a sample's metadata shows, a colour change's result included."""
    pairs = {(o["color"], o["shape"]) for o in meta.get("scene", [])}
    event = meta.get("event")
    if event and event["kind"] == "change":
        pairs.add((event["color"], meta["scene"][event["index"]]["shape"]))
    return pairs


def test_held_out_pairs_never_in_training_and_always_in_compositional(toy_dir, samples):
    held = {tuple(p) for p in json.loads((toy_dir / "toy.json").read_text())["held_out_pairs"]}
    assert len(held) == 3
    assert len({c for c, _ in held}) == 3 and len({s for _, s in held}) == 3
    for split in (*TRAINING, "vqa_image_test", "vqa_video_test"):
        for s in samples[split]:
            texts = [s["txt"].decode()] if "txt" in s else []
            if s["meta"] and "question" in s["meta"]:
                texts += [t["question"] for t in s["meta"].get("turns", [s["meta"]])]
            for pair in held:
                assert not any(_mentions(t, pair) for t in texts), (split, s["__key__"], pair)
            if s["meta"]:
                assert not _pairs_of(s["meta"]) & held, (split, s["__key__"])
    seen_in_comp = set()
    for s in samples["vqa_image_compositional"]:
        meta = s["meta"]
        qtype, ref = parse_question(meta["question"])
        scene_pairs = _pairs_of(meta)
        if qtype == "count":
            assert scene_pairs & held
        elif qtype == "color":
            pair = next(p for p in scene_pairs if p[1] == ref["shape"])
            assert pair in held
        elif qtype == "shape":
            pair = next(p for p in scene_pairs if p[0] == ref["color"])
            assert pair in held
        else:
            pair = (ref["color"], ref["shape"])
            assert pair in held
        seen_in_comp |= scene_pairs & held
    assert seen_in_comp == held


# ---------------------------------------------------------------- videos


def _mover_centroids(frames: np.ndarray, scene: list[dict], index: int) -> np.ndarray:
    """(F, 2) x, y centroid of the mover's colour, other objects' discs masked out."""
    labels = nearest_color(frames)  # (F, H, W)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    keep = labels == color_id(scene[index]["color"])
    for k, o in enumerate(scene):
        if k != index:
            keep &= np.hypot(xx - o["x"], yy - o["y"]) > toy.CLEARANCE * o["size"] + 0.5
    out = []
    for m in keep:
        assert m.sum() > 3
        out.append([xx[m].mean(), yy[m].mean()])
    return np.array(out)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_videos_decode_and_show_their_event(samples, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    from fusion.data.video import decode

    n_move = 0
    for split in ("video", "vqa_video_train", "vqa_video_test"):
        for s in samples[split]:
            meta = s["meta"]
            n = meta["n_frames"]
            assert meta["duration"] == pytest.approx(n / meta["fps"])
            frames = decode(s["mp4"], list(range(n + 2)), backend=backend)  # past the end: clamped
            assert frames.shape == (n + 2, SIZE, SIZE, 3)
            assert (frames[n] == frames[n - 1]).all()
            frames = frames[:n]
            scene, event = meta["scene"], meta["event"]
            obj = scene[event["index"]]
            labels = nearest_color(frames)
            at = (int(obj["y"]), int(obj["x"]))
            if event["kind"] == "move":
                c = _mover_centroids(frames, scene, event["index"])
                dx, dy = toy.DIRECTIONS[event["direction"]]
                along = (c[-1] - c[0]) @ np.array([dx, dy])
                across = (c[-1] - c[0]) @ np.array([dy, dx])
                assert along >= 0.8 * toy.MIN_TRAVEL * SIZE and abs(across) < 1.5, (s["__key__"], c)
                steps = np.diff(c, axis=0) @ np.array([dx, dy])
                assert (steps > -0.5).all()  # it never goes back
                n_move += 1
            elif event["kind"] == "appear":
                assert labels[0][at] == 0 and labels[-1][at] == color_id(obj["color"])
                assert labels[event["frame"] - 1][at] == 0
                assert labels[event["frame"]][at] == color_id(obj["color"])
            else:
                assert labels[0][at] == color_id(obj["color"])
                assert labels[event["frame"] - 1][at] == color_id(obj["color"])
                assert labels[event["frame"]][at] == color_id(event["color"])
            for other in scene:  # still objects are where stated
                if other is not obj:
                    assert (labels[:, int(other["y"]), int(other["x"])] == color_id(other["color"])).all()
    assert n_move >= FLAGS["n_video_vqa_train"] + FLAGS["n_video_vqa_test"]


def test_video_captions_name_the_event(samples):
    kinds = Counter()
    for s in samples["video"]:
        meta, caption = s["meta"], s["txt"].decode()
        obj = meta["scene"][meta["event"]["index"]]
        kind = meta["event"]["kind"]
        kinds[kind] += 1
        assert f"{obj['color']} {obj['shape']}" in caption
        word = {
            "move": f"moves {'to the ' if meta['event'].get('direction') in ('left', 'right') else ''}"
            f"{meta['event'].get('direction')}",
            "appear": "appears",
            "change": f" {meta['event'].get('color')}.",
        }[kind]
        assert word in caption, caption
    assert set(kinds) == {"move", "appear", "change"}


def test_extra_colours_only_on_training_distractors(tmp_path):
    """--extra-colors: distractors in training scenes and captions may wear them; no question,
    answer or test scene does, every question keeps its one right answer, and pixels show them."""
    toy.generate_toy(
        tmp_path,
        seed=0,
        image_size=SIZE,
        n_text=60,
        n_image=40,
        n_video=0,
        n_vqa_train=60,
        n_vqa_test=30,
        n_vqa_compositional=30,
        n_video_vqa_train=0,
        n_video_vqa_test=0,
        vqa_turns=3,
        extra_colors=("white", "cyan"),
    )
    manifest = json.loads((tmp_path / "toy.json").read_text())
    assert manifest["extra_colors"] == {"white": [235, 235, 235], "cyan": [40, 210, 210]}
    worn = Counter()
    for split in ("text", "image", "vqa_image_train", "vqa_image_test", "vqa_image_compositional"):
        for s in iter_samples(list_shards(str(tmp_path / split))):
            meta = json.loads(s["json"])
            extra = [o for o in meta.get("scene", []) if o["color"] in ("white", "cyan")]
            worn[split] += len(extra)
            for turn in meta.get("turns", [meta] if "question" in meta else []):
                assert not re.search(r"white|cyan", turn["question"] + turn["answer"])
                qtype, ref = parse_question(turn["question"])
                if qtype != "direction":
                    assert derive_answer(qtype, ref, meta["scene"], SIZE) == turn["answer"]
            if "png" in s:
                img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
                for o in extra:
                    assert tuple(img[int(o["y"]), int(o["x"])]) == toy.EXTRA_COLORS[o["color"]]
            if "txt" in s and extra:
                assert f"{extra[0]['color']} {extra[0]['shape']}" in s["txt"].decode()
    assert worn["image"] and worn["vqa_image_train"] and worn["text"]
    assert worn["vqa_image_test"] == worn["vqa_image_compositional"] == 0
    with pytest.raises(ValueError, match="extra colors"):
        toy.generate_toy(tmp_path / "x", extra_colors=("red",), n_text=1)


def test_larger_image_size(tmp_path):
    toy.generate_toy(
        tmp_path,
        image_size=64,
        n_text=2,
        n_image=2,
        n_video=2,
        n_vqa_train=2,
        n_vqa_test=0,
        n_video_vqa_train=1,
        n_video_vqa_test=0,
    )
    from fusion.data.video import decode

    backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])
    for s in iter_samples(list_shards(str(tmp_path / "video"))):
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"]) == (64, 64)
        for backend in backends:
            assert decode(s["mp4"], [0], backend=backend).shape == (1, 64, 64, 3)
    for s in iter_samples(list_shards(str(tmp_path / "image"))):
        assert Image.open(io.BytesIO(s["png"])).size == (64, 64)
