"""Evaluation batches come in a few lengths: `forward_rows` pads to `padded_length`, so a compiled
decoder is compiled once per length bucket, not once per batch, and the scores stay those of the
exact lengths."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from fusion.config import load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.eval import vqa
from fusion.eval.questions import Question
from fusion.model.fusion import build_model


def test_padded_length_buckets():
    assert [vqa.padded_length(n) for n in (1, 31, 32, 33, 64, 65, 200, 1000, 1024)] == [
        32,
        32,
        32,
        64,
        64,
        128,
        256,
        1024,
        1024,
    ]
    assert [vqa.padded_length(n) for n in (1025, 2048, 2049, 5000)] == [2048, 2048, 3072, 5120]
    assert all(vqa.padded_length(n) >= n for n in range(1, 5000))
    assert len({vqa.padded_length(n) for n in range(1, 4097)}) == 9  # 32 ... 1024, 2048, 3072, 4096


@pytest.fixture(scope="module")
def tiny():
    # a dense decoder (dense_baseline): a whole forward is one graph, so each compilation is a shape
    cfg = load_config(
        None,
        [
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.dense_baseline=true",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, ByteTokenizer()).eval()
    model.tokenizer = ByteTokenizer()
    g = torch.Generator().manual_seed(0)
    questions = [
        Question(
            key=f"q{i}",
            question="why " * i + "?",
            answer="yes",
            choices=["yes", "no"],
            type="default",
            part=("image", model.vision.tokens_per_image),
            pixels=torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g),
            modality=1,
        )
        for i in range(0, 36, 3)
    ]  # 12 questions, rows of 12 lengths
    return model, questions


def scores_and_compilations(model, questions) -> tuple[list[list[float]], int]:
    torch._dynamo.reset()
    counter = CompileCounter()
    plain = model.decoder
    model.decoder = torch.compile(plain, backend=counter, dynamic=False)
    try:
        # batch_size 2: one question's two choices per batch, so only the length changes
        scores = vqa.score_choices(model, questions, batch_size=2)
    finally:
        model.decoder = plain
        torch._dynamo.reset()
    return scores, counter.frame_count


def test_compiled_decoder_compiles_once_per_length_bucket(tiny, monkeypatch):
    model, questions = tiny
    tok = model.tokenizer
    lengths = [len(vqa.prompt_tokens(tok, q)) + len(vqa.answer_tokens(tok, "yes")) - 1 for q in questions]
    buckets = {vqa.padded_length(n) for n in lengths}
    assert len(set(lengths)) == 12 and buckets == {32, 64, 128, 256}  # rows of 31 to 163 tokens

    scores, compiled = scores_and_compilations(model, questions)
    assert compiled <= len(buckets), compiled

    monkeypatch.setattr(vqa, "padded_length", lambda n: n)  # exact lengths: one compilation per batch
    exact, compiled_exact = scores_and_compilations(model, questions)
    assert compiled_exact > len(buckets)  # (dynamo stops recompiling at its recompile_limit, 8)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(exact), rtol=0, atol=1e-5)
