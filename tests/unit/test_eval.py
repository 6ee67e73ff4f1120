"""fusion-eval: multiple-choice scoring, chance, the blind baseline, length normalisation, the files
it writes and its errors, on a hand-made VQA set and a tiny exported model."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fusion
from fusion.checkpoint import export_model
from fusion.config import load_config
from fusion.data.samples import vqa_answer, vqa_prompt
from fusion.data.sequence import build_sample
from fusion.data.shards import write_index
from fusion.data.tar import ShardWriter
from fusion.data.tokenizer import ByteTokenizer
from fusion.eval import cli, questions, vqa
from fusion.model.fusion import build_model

COLORS = ["red", "green", "blue"]  # type "color": 3 choices
SIDES = ["left", "right"]  # type "side": 2 choices
# (type, answer) in shard order; the answer is the first choice for 2 of 4 colour questions and
# 1 of 3 side questions
QUESTIONS = [
    ("color", "red"),
    ("side", "left"),
    ("color", "green"),
    ("side", "right"),
    ("color", "blue"),
    ("side", "right"),
    ("color", "red"),
]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
    """7 good questions in 2 shards (32x32 noise PNGs, kept in `.pixels` by key) + 2 bad samples."""
    root = tmp_path_factory.mktemp("vqa") / "mini_vqa"
    rng = np.random.default_rng(0)
    pixels = {}
    for shard, items in enumerate((QUESTIONS[:4], QUESTIONS[4:])):
        with ShardWriter(root, shard) as w:
            for i, (qtype, answer) in enumerate(items):
                key = f"q{shard}_{i}"
                pixels[key] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                question = "What color is it?" if qtype == "color" else "Is it on the left or the right?"
                w.write(
                    key,
                    {
                        "png": png(pixels[key]),
                        "json": {
                            "question": question,
                            "answer": answer,
                            "type": qtype,
                            "choices": COLORS if qtype == "color" else SIDES,
                        },
                    },
                )
            if shard == 1:  # corrupt samples: skipped and counted, never fatal
                w.write(
                    "bad_image",
                    {
                        "png": b"\x89PNG not really",
                        "json": {
                            "question": "What color?",
                            "answer": "red",
                            "choices": COLORS,
                            "type": "color",
                        },
                    },
                )
                w.write(
                    "bad_answer",
                    {
                        "png": png(pixels[key]),
                        "json": {
                            "question": "What color?",
                            "answer": "pink",
                            "choices": COLORS,
                            "type": "color",
                        },
                    },
                )
    write_index(root, "vqa")
    return root, pixels


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    from fusion.data.toy import encode_mp4, video_meta

    root = tmp_path_factory.mktemp("vqa") / "mini_video"
    with ShardWriter(root, 0) as w:
        for i, direction in enumerate(["left", "right"]):
            frames = np.zeros((6, 32, 32, 3), np.uint8)
            for f in range(6):
                x = 4 + 4 * f if direction == "right" else 24 - 4 * f
                frames[f, 12:20, x : x + 6] = (220, 40, 40)
            data = encode_mp4(frames)
            w.write(
                f"v{i}",
                {
                    "mp4": data,
                    "json": {
                        "question": "Which way does the red square move?",
                        "answer": direction,
                        "choices": ["left", "right", "up", "down"],
                        "type": "direction",
                        **video_meta(data),
                    },
                },
            )
    write_index(root, "vqa")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = load_config(None, ["model.vision.img_size=32", "model.vision.patch_size=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ByteTokenizer()).eval()
    run = tmp_path_factory.mktemp("runs") / "tiny"
    export_model(model, cfg, run / "checkpoints" / "step_2")
    (run / "checkpoints" / "latest").write_text("step_2")
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return fusion.load_model(run_dir)


def gold(model, questions, **kw):
    return [[1.0 if c == q.answer else 0.0 for c in q.choices] for q in questions]


def first(model, questions, **kw):
    return [[-float(i) for i in range(len(q.choices))] for q in questions]


def test_scores_decide_accuracy_and_chance_is_per_question(model, vqa_set):
    root, _ = vqa_set
    r = vqa.evaluate(model, root, score_fn=gold, progress=False, batch_size=3)
    assert r["overall"] == {
        "acc": 1.0,
        "n": 7,
        "chance": pytest.approx((4 / 3 + 3 / 2) / 7),
        "blind_acc": 1.0,
    }
    assert r["by_type"]["color"]["chance"] == pytest.approx(1 / 3)
    assert r["by_type"]["side"]["chance"] == pytest.approx(1 / 2)
    assert (r["by_type"]["color"]["n"], r["by_type"]["side"]["n"]) == (4, 3)
    assert r["skipped"] == 2
    assert r["skipped_reasons"] == {"bad_image": 1, "answer_not_in_choices": 1}

    r = vqa.evaluate(model, root, score_fn=first, progress=False, batch_size=3)
    assert r["overall"]["acc"] == pytest.approx(3 / 7)
    assert r["by_type"]["color"]["acc"] == pytest.approx(2 / 4)
    assert r["by_type"]["side"]["acc"] == pytest.approx(1 / 3)

    r = vqa.evaluate(model, root, score_fn=gold, progress=False, limit=2, blind=False)
    assert r["overall"]["n"] == 2 and r["overall"]["blind_acc"] is None


def test_choice_score_is_mean_token_log_prob_of_the_training_text(model, vqa_set):
    root, _ = vqa_set
    maker = questions.make_sample_maker(model, n_frames=8)
    q = next(q for q in questions.iter_questions(root, maker) if q.type == "side")
    scores = vqa.score_choices(model, [q], batch_size=2)[0]  # " left" and " right": padding in the batch
    tok = model.tokenizer
    n_prompt = len(build_sample(tok, [q.part, vqa_prompt(q.question)])[0]) - 1  # without eos
    for choice, score in zip(q.choices, scores):
        tokens, _, _ = build_sample(tok, [q.part, vqa_prompt(q.question) + vqa_answer(choice)])
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]), images=q.pixels[None])[0]  # (T, V)
        logp = logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
        cont = logp[n_prompt - 1 :]  # the answer's tokens and eos
        assert len(cont) == len(vqa_answer(choice)) + 1
        assert score == pytest.approx(cont.mean().item(), abs=1e-5)
        assert score != pytest.approx(cont.sum().item(), abs=1e-3)


def test_blind_baseline_gives_grey_media_with_the_same_tokens(model, vqa_set):
    root, pixels = vqa_set
    calls = []
    plain = model.forward

    def spy(input_ids, **kw):
        calls.append((input_ids.clone(), kw["images"].clone()))
        return plain(input_ids, **kw)

    model.forward = spy
    try:
        vqa.evaluate(model, root, limit=2, batch_size=64, progress=False)
    finally:
        del model.forward
    assert len(calls) == 2  # one forward with the images, one blind
    (ids, seen), (blind_ids, blind_seen) = calls
    # rows: q0_0 (3 colour choices) then q0_1 (2 side choices), each with its own image
    expected = [pixels["q0_0"]] * 3 + [pixels["q0_1"]] * 2
    assert torch.equal(seen, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    assert torch.equal(blind_ids, ids)
    assert blind_seen.shape == seen.shape and bool((blind_seen == 128).all())


def test_cli_writes_json_table_and_picture(run_dir, vqa_set, video_set, tmp_path, capsys):
    root, _ = vqa_set
    rc = cli.main(
        [
            "--run",
            str(run_dir),
            "--vqa",
            str(root),
            str(video_set),
            "--generate",
            "--batch-size",
            "5",
            "--n-frames",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "overall" in out and "direction" in out and "blind" in out
    for name, types, n in (("mini_vqa", {"color", "side"}, 7), ("mini_video", {"direction"}, 2)):
        result = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        for part in [result["overall"], *result["by_type"].values()]:
            assert {"acc", "n", "chance", "blind_acc", "gen_acc"} <= set(part)
            assert 0 <= part["acc"] <= 1 and 0 <= part["blind_acc"] <= 1 and 0 <= part["gen_acc"] <= 1
        assert set(result["by_type"]) == types and result["overall"]["n"] == n
        assert result["step"] == 2 and result["set"] == name
        with Image.open(run_dir / "eval" / f"{name}.png") as img:
            assert img.format == "PNG" and img.width > 100
    assert result["overall"]["chance"] == pytest.approx(0.25)

    # --checkpoint writes to --out; the trainer's call keeps its model in training mode
    rc = cli.main(
        [
            "--checkpoint",
            str(run_dir / "checkpoints"),
            "--vqa",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--no-blind",
            "--examples",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "out" / "mini_vqa.json").read_text())
    assert result["overall"]["blind_acc"] is None and not (tmp_path / "out" / "mini_vqa.png").exists()
    trained = fusion.load_model(run_dir).train()
    results = vqa.evaluate_run(tmp_path / "run2", [root], model=trained, limit=2, examples=2)
    assert trained.training and results["mini_vqa"]["overall"]["n"] == 2
    assert (tmp_path / "run2" / "eval" / "mini_vqa.png").is_file()


def test_unusable_inputs_are_one_line_errors(run_dir, vqa_set, tmp_path, capsys):
    root, _ = vqa_set
    cases = [
        (["--run", str(run_dir), "--vqa", str(tmp_path / "nope")], "nope"),
        (["--run", str(tmp_path), "--vqa", str(root)], "model.safetensors"),
    ]
    empty = tmp_path / "empty_set"
    with ShardWriter(empty, 0) as w:
        w.write("x", {"png": b"junk", "json": {"question": "?", "answer": "a", "choices": ["a"]}})
    cases.append((["--run", str(run_dir), "--vqa", str(empty)], "no usable questions"))
    for argv, needle in cases:
        assert cli.main(argv + ["--no-progress"]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err

    # the real command line (no model given at all)
    r = subprocess.run(
        [sys.executable, "-m", "fusion.eval.cli", "--vqa", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--run" in r.stderr


class Scripted(torch.nn.Module):
    """Logits that spell `script` after the prompt's final ':' (then eos), with the patch
    placeholder always scored higher still: generation must never pick a special token."""

    def __init__(self, tokenizer, script: str, eos: bool = True):
        super().__init__()
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(script) + ([tokenizer.eos_id] if eos else [])
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, positions=None, doc_ids=None, images=None, videos=None):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.tokenizer.vocab_size)
        logits[..., self.tokenizer.patch_id] = 10.0
        for b in range(B):
            last = int((doc_ids[b] >= 0).sum()) - 1
            colon = max(i for i in range(last + 1) if input_ids[b, i] == ord(":"))
            n = last - colon  # tokens generated so far
            logits[b, last, self.script[n % len(self.script)]] = 5.0
        return logits


def test_greedy_generation_stops_at_eos_or_8_tokens_and_skips_specials(model, vqa_set):
    root, _ = vqa_set
    qs = list(questions.iter_questions(root, questions.make_sample_maker(model, n_frames=8)))[:3]
    tok = model.tokenizer
    assert vqa.generate_answers(Scripted(tok, " Red "), qs, batch_size=2) == ["Red"] * 3
    assert vqa.generate_answers(Scripted(tok, "abc", eos=False), qs) == ["abcabcab"] * 3


def test_a_model_trained_with_the_question_first_is_asked_that_way(vqa_set, tmp_path):
    """`data.question` is kept in model.json: the evaluation's prompt and a choice are then exactly
    the training sample of that question and answer; a model.json without it (older checkpoints,
    fusion-convert) asks with the media first, and a bad value is refused naming the file."""
    from fusion.checkpoint import CheckpointError
    from fusion.data.samples import SampleMaker

    root, _ = vqa_set
    for where in ("before", "after"):
        cfg = load_config(
            None, ["model.vision.img_size=32", "model.vision.patch_size=8", f"data.question={where}"]
        )
        torch.manual_seed(0)
        export_model(build_model(cfg.model, ByteTokenizer()).eval(), cfg, tmp_path / where)
        assert json.loads((tmp_path / where / "model.json").read_text())["question"] == where
        model = fusion.load_model(tmp_path / where)
        assert model.question == where
        tok = model.tokenizer
        for q in list(questions.iter_questions(root, questions.make_sample_maker(model, n_frames=8)))[:2]:
            trained = SampleMaker(cfg, tok).vqa_tokens(q.part, [(q.question, q.answer)])["tokens"]
            asked = vqa.prompt_tokens(tok, q)
            assert asked + vqa.answer_tokens(tok, q.answer) == trained
            assert (asked[1] in tok.encode(" Q")) == (where == "before")  # the question first, or the media
    meta = json.loads((tmp_path / "before" / "model.json").read_text())
    del meta["question"]
    (tmp_path / "before" / "model.json").write_text(json.dumps(meta))
    assert fusion.load_model(tmp_path / "before").question == "after"
    meta["question"] = "sideways"
    (tmp_path / "before" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.json.*data\.question"):
        fusion.load_model(tmp_path / "before")
