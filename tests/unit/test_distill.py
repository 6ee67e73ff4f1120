"""Distillation (distill.teacher): the KL term, its mixing with the next-token loss, a frozen teacher,
and fusion-train driving a dense student's KL to an MoE teacher down."""

from __future__ import annotations

import json

import pytest
import torch

from fusion.checkpoint import export_model
from fusion.config import ConfigError, load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.distill import Distiller, kl_divergence, load_teacher
from fusion.model.fusion import build_model
from fusion.schema import IGNORE
from tests.conftest import BIN, run_cli, text_rows

TOK = ByteTokenizer()


def model_of(*overrides, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.size=debug", "model.moe.path=loop", *overrides])
    model = build_model(cfg.model, TOK)
    model.tokenizer = TOK
    return cfg, model


def rows(n=8, T=48, seed=0):
    """Byte-tokenised toy sentences, one per row, padded with IGNORE labels."""
    ids, labels = text_rows(TOK, n, T, seed)
    return {"input_ids": ids, "labels": labels}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """An MoE debug model trained for a few steps on toy sentences, exported as a checkpoint."""
    cfg, model = model_of(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(25):
        b = rows(seed=step)
        out = model(b["input_ids"], labels=b["labels"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("teacher") / "ckpt"
    export_model(model, cfg, path)
    return path


def test_kl_is_zero_for_equal_logits_and_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert kl_divergence(t, t, mask, 2.0).abs() < 1e-6
    T = 2.0
    p, q = (t[mask] / T).softmax(-1), (s[mask] / T).softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert kl_divergence(s, t, mask, T) == pytest.approx(float(want), rel=1e-5)
    # masked positions do not count
    s2 = s.clone()
    s2[~mask] = 100.0
    assert kl_divergence(s2, t, mask, T) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("loss_average", ["token", "sample"])
def test_mix_weights_the_two_losses(teacher_dir, loss_average):
    """Whatever `train.loss_average` the student trains with, the weight moves exactly its
    next-token loss onto the KL term (rows of different lengths: the averages differ)."""
    _, student = model_of("model.dense_baseline=true", seed=2)
    student.loss_average = loss_average
    teacher = load_teacher(str(teacher_dir), student, torch.device("cpu"), torch.float32)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    b = rows()

    def grads(weight, T=2.0):
        student.zero_grad()
        out = student(b["input_ids"], labels=b["labels"], return_logits=True)
        loss = Distiller(teacher, T, weight, loss_average).mix(out, b)
        loss.backward()
        return loss.detach(), out, [p.grad.clone() for p in student.parameters()]

    loss0, out0, g0 = grads(0.0)
    assert loss0 == pytest.approx(out0.loss.item())  # W = 0: plain next-token training
    loss1, out1, g1 = grads(1.0)
    with torch.no_grad():
        tl = teacher(b["input_ids"])
    kl = kl_divergence(out1.logits.detach(), tl, b["labels"] != IGNORE, 2.0)
    assert loss1 == pytest.approx(4.0 * kl.item(), rel=1e-5)  # W = 1: T^2 * KL alone (dense: no aux)
    _, _, gh = grads(0.5)
    for a, c, h in zip(g0, g1, gh):
        assert torch.allclose(h, 0.5 * a + 0.5 * c, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_errors_name_the_key(teacher_dir, tmp_path):
    _, student = model_of()
    with pytest.raises(ConfigError, match="distill.teacher.*no run or checkpoint"):
        load_teacher(str(tmp_path / "nope"), student, torch.device("cpu"), torch.float32)
    _, wider = model_of("model.vocab_size=512")
    with pytest.raises(ConfigError, match="distill.teacher.*vocabulary"):
        load_teacher(str(teacher_dir), wider, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="distill.temperature"):
        load_config(None, ["distill.temperature=0"])


@pytest.mark.slow
def test_fusion_train_student_kl_falls(teacher_dir, text_shards, tmp_path):
    """fusion-train a dense student against the MoE teacher: distill/kl is logged and falls."""
    run_dir = tmp_path / "student"
    r = run_cli(
        [
            str(BIN / "fusion-train"),
            "--config",
            "configs/debug.yaml",
            "model.dense_baseline=true",
            f"distill.teacher={teacher_dir}",
            "distill.temperature=2",
            "distill.weight=0.9",
            f"data.text={text_shards}",
            "data.num_workers=0",
            "train.steps=16",
            "train.seq_len=64",
            "train.lr=1e-2",
            "train.warmup=2",
            f"run.dir={run_dir}",
        ],
        env={"OMP_NUM_THREADS": "2"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [row["distill/kl"] for row in got]
    assert len(kl) == 16 and all(k >= 0 for k in kl)
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, kl
    bad = run_cli(
        [
            str(BIN / "fusion-train"),
            "--config",
            "configs/debug.yaml",
            f"data.text={text_shards}",
            f"distill.teacher={tmp_path / 'missing'}",
            f"run.dir={tmp_path / 'x'}",
        ]
    )
    assert bad.returncode == 2 and "distill.teacher" in bad.stderr.strip().splitlines()[-1]
