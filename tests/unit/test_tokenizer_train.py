"""`fusion-data tokenizer`: a tokenizer.json trained on the text of shard directories (text, image
and video captions, VQA questions / answers / choices), byte-level BPE or word-level, with fusion's
special tokens; deterministic, atomic, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.data import tokenizer_train as tt
from fusion.data.build import main as fusion_data
from fusion.data.samples import vqa_answer, vqa_prompt
from fusion.data.shards import write_index
from fusion.data.tar import ShardWriter
from fusion.data.tokenizer import build_tokenizer
from fusion.schema import SPECIAL_TOKENS

DOCS = [
    "The ferry leaves at noon.",
    "Zebras graze near the river; herons wait.",
    "A kettle whistles twice.",
    "Über-long words: naïve café déjà vu!",
]
CAPTIONS = [
    "three vertical stripes in teal",
    "a checkerboard of amber squares",
    "dots scattered on a dark field",
]
CLIP_CAPTIONS = ["a bar slides toward the top"]
QUESTIONS = [
    ("Which way do the stripes run?", "vertical", ["horizontal", "vertical"], "stripes"),
    ("What pattern fills the tile?", "checks", ["stripes", "checks", "dots"], "pattern"),
    ("How many bars are there?", 3, [2, 3, 4], "count"),
]


def _shards(directory: Path, samples: list[dict], modality: str) -> Path:
    with ShardWriter(directory, 0) as w:
        for i, sample in enumerate(samples):
            w.write(f"s{i:04d}", sample)
    write_index(directory, modality, names=["000000.tar"], counts={"000000.tar": len(samples)})
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """One shard directory per kind; media bytes are placeholders (the text reader never decodes
    them). The VQA .json has other fields (source, width) that are not text."""
    root = tmp_path_factory.mktemp("tokdata")
    vqa = [
        {
            "png": b"\x89PNG fake",
            "json": {
                "question": q,
                "answer": a,
                "choices": c,
                "type": t,
                "source": "pictures/secretname.png",
                "width": 32,
            },
        }
        for q, a, c, t in QUESTIONS
    ]
    return {
        "text": _shards(root / "text", [{"txt": d} for d in DOCS], "text"),
        "image": _shards(
            root / "image",
            [{"png": b"fake", "txt": c, "json": {"source": "x.png"}} for c in CAPTIONS],
            "image",
        ),
        "video": _shards(
            root / "video", [{"mp4": b"fake", "txt": c, "json": {"fps": 8}} for c in CLIP_CAPTIONS], "video"
        ),
        "vqa": _shards(root / "vqa", vqa, "vqa"),
    }


def _train(dirs, tmp_path, *flags, name="tok.json") -> Path:
    out = tmp_path / name
    argv = [
        "tokenizer",
        "--input",
        *(str(dirs[k]) for k in ("text", "image", "video", "vqa")),
        "--output",
        str(out),
        *flags,
    ]
    assert fusion_data(argv) == 0
    return out


def _training_texts() -> list[str]:
    """What training tokenizes from the shards above (fusion.data.samples)."""
    texts = list(DOCS) + [" " + c for c in CAPTIONS + CLIP_CAPTIONS]
    for q, _answer, choices, _ in QUESTIONS:
        texts += [vqa_prompt(q)] + [vqa_answer(str(c)) for c in choices]
    return texts


def _stored_specials(path: Path, tok) -> None:
    stored = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    assert all(stored[t] == tok.special_ids[t] for t in SPECIAL_TOKENS)


def test_bpe_encodes_every_text_and_round_trips(dirs, tmp_path, capsys):
    path = _train(dirs, tmp_path, "--vocab-size", "300")
    out = capsys.readouterr().out
    assert out.startswith("tokenizer: bpe, vocabulary ") and str(path) in out
    tok = build_tokenizer(str(path))
    _stored_specials(path, tok)
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size <= 300 and tok.vocab_size > tt.MIN_BPE_VOCAB  # merges were learnt
    for text in _training_texts() + ["text never seen: ½ ✓ 漢字"]:
        ids = tok.encode(text)
        assert ids and tok.decode(ids) == text
    # the corpus' words became few tokens: a frequent word is one
    assert len(tok.encode(" the")) == 1


def test_word_level_knows_every_word_and_answers_are_one_token(dirs, tmp_path):
    path = _train(dirs, tmp_path, "--kind", "word")
    tok = build_tokenizer(str(path))
    _stored_specials(path, tok)
    unk = tok._tok.token_to_id(tt.UNKNOWN_WORD)
    assert unk == 0
    for text in _training_texts():
        assert unk not in tok.encode(text), text
    for _, _, choices, _ in QUESTIONS:
        assert all(len(tok.encode(vqa_answer(str(c)))) == 1 for c in choices)
    vocab = tok._tok.get_vocab()
    assert "secretname" not in vocab and "png" not in vocab  # only question/answer/choices of .json
    assert tok.encode(" Q: a zebra? A:")[3] == unk == tok.encode("unseen")[0]


def test_word_vocab_size_keeps_the_most_frequent_words(dirs, tmp_path, capsys):
    path = _train(dirs, tmp_path, "--kind", "word", "--vocab-size", "20")
    tok = build_tokenizer(str(path))
    assert tok.vocab_size == 20
    vocab = tok._tok.get_vocab()
    assert {"Q", ":", "A", "the", "?"} <= set(vocab)  # the prompt's words and the commonest
    assert "kettle" not in vocab  # seen once
    assert "words kept" in capsys.readouterr().out


def test_same_input_same_bytes_in_another_process(dirs, tmp_path):
    for kind in ("bpe", "word"):
        first = _train(dirs, tmp_path, "--kind", kind, name=f"{kind}1.json")
        second = tmp_path / f"{kind}2.json"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fusion.data.build",
                "tokenizer",
                "--input",
                *(str(dirs[k]) for k in ("text", "image", "video", "vqa")),
                "--output",
                str(second),
                "--kind",
                kind,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert first.read_bytes() == second.read_bytes()
    # the order of the inputs is part of the input (word counts tie-break by word, so only BPE
    # could differ); the same order is what is promised


def test_the_toy_world_uses_the_same_word_level_builder():
    from fusion.data import toy

    assert toy.word_level_tokenizer is tt.word_level_tokenizer
    assert toy.UNKNOWN_WORD == tt.UNKNOWN_WORD and toy.WORD_PATTERN is tt.WORD_PATTERN


def test_help_documents_every_flag(capsys):
    assert fusion_data(["tokenizer", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--kind", "--vocab-size", "bpe", "word"):
        assert flag in text
    assert fusion_data(["--help"]) == 0
    assert "tokenizer" in capsys.readouterr().out


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("missing", ["--input", "MISSING"], "--input: no such directory: 'MISSING'"),
        ("file", ["--input", "FILE"], "--input: 'FILE' is not a directory"),
        ("empty", ["--input", "EMPTY"], "--input: no .tar shards in 'EMPTY'"),
        ("no text", ["--input", "NOTEXT"], "--input: no text in the 2 samples of 'NOTEXT'"),
        (
            "bpe vocab",
            ["--input", "TEXT", "--vocab-size", "100"],
            "--vocab-size: 100 is too small for --kind bpe: at least 265",
        ),
        (
            "word vocab",
            ["--input", "TEXT", "--kind", "word", "--vocab-size", "12"],
            "--vocab-size: 12 is too small for --kind word: at least 13",
        ),
        (
            "huge vocab",
            ["--input", "TEXT", "--vocab-size", str(10**9)],
            "--vocab-size: 1000000000 is larger than",
        ),
        ("zero vocab", ["--input", "TEXT", "--vocab-size", "0"], "argument --vocab-size: must be >= 1"),
        (
            "text vocab",
            ["--input", "TEXT", "--vocab-size", "many"],
            "argument --vocab-size: expected an integer",
        ),
        ("kind", ["--input", "TEXT", "--kind", "sentencepiece"], "argument --kind: invalid choice"),
        ("output dir", ["--input", "TEXT", "--output", "OUTDIR"], "--output: 'OUTDIR' is a directory"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_output_alone(case, flags, message, dirs, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not shards\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "outdir").mkdir()
    _shards(
        tmp_path / "notext", [{"png": b"fake", "txt": "   "}, {"png": b"fake", "json": {"w": 1}}], "image"
    )
    subst = {
        "MISSING": str(tmp_path / "missing"),
        "FILE": str(tmp_path / "file.txt"),
        "EMPTY": str(tmp_path / "empty"),
        "NOTEXT": str(tmp_path / "notext"),
        "TEXT": str(dirs["text"]),
        "OUTDIR": str(tmp_path / "outdir"),
    }
    for key, value in subst.items():
        flags = [f.replace(key, value) for f in flags]
        message = message.replace(key, value)
    out = tmp_path / "tok.json"
    out.write_text("the user's old tokenizer")
    argv = ["tokenizer", *(flags if "--output" in flags else [*flags, "--output", str(out)])]
    assert fusion_data(argv) != 0
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fusion-data tokenizer: error: ") and message in line, line
    assert out.read_text() == "the user's old tokenizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt", "notext", "outdir", "tok.json"]


def test_an_existing_file_is_replaced_whole_or_not_at_all(dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tok.json"
    out.write_text("old")
    path = _train(dirs, tmp_path, "--kind", "word")
    assert path == out and build_tokenizer(str(out)).vocab_size > 20
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary file left
    good = out.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tt.os, "replace", broken_replace)
    assert fusion_data(["tokenizer", "--input", str(dirs["text"]), "--output", str(out)]) == 1
    assert "--output: cannot write" in _one_line(capsys.readouterr().err)
    assert out.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


def test_output_directories_are_created(dirs, tmp_path):
    out = tmp_path / "a" / "b" / "tokenizer.json"
    assert (
        fusion_data(["tokenizer", "--input", str(dirs["vqa"]), "--output", str(out), "--kind", "word"]) == 0
    )
    assert build_tokenizer(str(out)).encode(" vertical") != []


def test_texts_of_a_sample_are_what_training_reads():
    """Text shards as they are, captions after a space, VQA in the training prompt with every
    answer and choice, each turn of a record of several questions; other .json fields are not
    text, and a .json beside no media (a text shard's) is not read."""
    assert tt.sample_texts({"txt": b"  a doc \n"}) == ["a doc"]
    assert tt.sample_texts({"txt": b"a doc", "json": b'{"question": "no?"}'}) == ["a doc"]
    assert tt.sample_texts({"mp4": b"", "txt": b"a clip", "json": b'{"fps": 8}'}) == [" a clip"]
    one = {"question": "How many?", "answer": 3, "choices": [2, 3, {"bad": 1}], "source": "x.png"}
    assert tt.sample_texts({"jpg": b"", "json": json.dumps(one).encode()}) == [
        vqa_prompt("How many?"),
        vqa_answer("3"),
        vqa_answer("2"),
    ]
    turns = {
        "question": "Which?",
        "answer": "a",
        "turns": [
            {"question": "Which?", "answer": "a", "choices": ["a", "b"]},
            {"question": "And?", "answer": "c"},
        ],
    }
    assert tt.sample_texts({"png": b"", "json": json.dumps(turns).encode()}) == [
        vqa_prompt("Which?"),
        vqa_answer("a"),
        vqa_answer("b"),
        vqa_prompt("And?"),
        vqa_answer("c"),
    ]
    with pytest.raises(Exception, match="bad_utf8"):
        tt.sample_texts({"txt": b"\xff\xfe"})


def test_a_trained_bpe_tokenizer_makes_training_samples(dirs, tmp_path):
    """The file is what data.tokenizer names: a VQA sample becomes <bos> image placeholders, the
    prompt, and the answer (the only tokens with loss) that decodes back to itself."""
    import io

    import numpy as np
    from PIL import Image

    from fusion.config import load_config
    from fusion.data.samples import SampleMaker
    from fusion.schema import tokens_per_image

    path = _train(dirs, tmp_path)
    cfg = load_config(None, [f"data.tokenizer={path}", "train.seq_len=128"])
    tok = build_tokenizer(cfg.data.tokenizer)
    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(png, format="PNG")
    meta = {
        "question": "Which way do the stripes run?",
        "answer": "vertical",
        "choices": ["horizontal", "vertical"],
    }
    out = SampleMaker(cfg, tok)({"__key__": "k", "png": png.getvalue(), "json": json.dumps(meta).encode()})
    assert out is not None and out["tokens"][0] == tok.bos_id
    assert out["tokens"].count(tok.patch_id) == tokens_per_image(cfg.model.vision)
    answer = [t for t, m in zip(out["tokens"], out["loss_mask"]) if m]
    assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == vqa_answer("vertical")
    assert vqa_prompt(meta["question"]) in tok.decode(out["tokens"])
