"""Toy-VQA evaluation: multiple-choice scoring by likelihood, a blind baseline, optional greedy
generation, `eval/SET.json` ({overall, by_type}: acc, n, chance, blind_acc) and a picture of examples.

    fusion-eval --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test

A question is a VQA shard sample (docs/shards.md): media + {question, answer, choices, type}. Its prompt is
built by the training code itself (`build_sample` with the media run and `vqa_prompt`), so the model
sees exactly the text it was trained on:

    <bos> <media run> " Q: {question} A:"   then each choice   " {choice}" <eos>

Scoring: each choice gets the length-normalised log-likelihood of its continuation (mean log-prob
per continuation token, eos included: choices of different lengths compete fairly); the prediction
is the best choice (the first one on ties). One row per (question, choice), padded on the right,
`--batch-size` rows per forward pass.

Blind baseline: the same model, prompts and placeholder runs, with every image (every video frame)
replaced by uniform mid-grey pixels: what the model gets from the question alone. `chance` is the
mean over questions of 1 / len(choices).

Generation (`--generate`): greedy decoding after the prompt (the model is re-run, no KV cache), at
most 8 tokens or until eos, special tokens other than eos never chosen; exact match with the answer
(stripped, case-insensitive) is `gen_acc`.

Samples that cannot be used (bad image or video, bad json, answer not among the choices, unreadable
shard) are skipped and counted: `skipped` and `skipped_reasons` in the JSON.

Library: `evaluate(model, vqa_dir, ...) -> dict` (the SET.json content), `evaluate_run(run_dir,
vqa_dirs, ...)` (writes the files; the trainer calls it with its live model), `score_choices`
(the scorer; `score_fn=` replaces it).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable

import torch

from fusion.eval.questions import (
    EvalError,
    Question,
    Shown,
    iter_questions,
    make_sample_maker,
    set_name,
    set_size,
)
from fusion.eval.report import plot_examples
from fusion.eval.runs import check_out_dir, check_sets, default_out_dir, load_for_eval, run_n_frames
from fusion.files import write_atomic

GREY = 128  # the blind baseline's pixel value (uint8)
MAX_NEW_TOKENS = 8  # --generate stops here if no eos came first


def prompt_tokens(tok, q: Question) -> list[int]:
    """<bos> media run, " Q: ... A:" (or " Q: ...", media run, " A:") -- the training sample
    without its answer and eos."""
    from fusion.data.samples import vqa_prompt_parts
    from fusion.data.sequence import build_sample

    tokens, _, _ = build_sample(tok, vqa_prompt_parts(q.part, q.question, q.where))
    return tokens[:-1]


def answer_tokens(tok, choice: str) -> list[int]:
    from fusion.data.samples import vqa_answer

    return tok.encode(vqa_answer(choice)) + [tok.eos_id]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def padded_length(n: int) -> int:
    """The length a batch whose longest row has `n` tokens is padded to: a power of two from 32 up
    to 1024, then a multiple of 1024. Compiled attention and `train.compile` blocks are compiled
    for a few lengths instead of once per batch (FlexAttention is compiled with static shapes)."""
    if n <= 1024:
        return max(32, 1 << (n - 1).bit_length())
    return -(-n // 1024) * 1024


def forward_rows(
    model, rows: list[list[int]], questions: list[Question], blind: bool = False, device=None
) -> torch.Tensor:
    """Logits (B, T, V) of token rows, each holding the media of its question, T the longest row.
    The forward pass pads on the right to `padded_length(T)` (pad id, position 0, doc id -1:
    attention and routing never see the padding, so the logits are those of the exact length)."""
    tok = model.tokenizer
    device = torch.device(device) if device is not None else _device_of(model)
    T = max(len(r) for r in rows)
    L = padded_length(T)
    input_ids = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), L, dtype=torch.long)
    doc_ids = torch.full((len(rows), L), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = torch.tensor(r)
        positions[b, : len(r)] = torch.arange(len(r))
        doc_ids[b, : len(r)] = 0
    media = {}
    for name, modality in (("images", 1), ("videos", 2)):
        pixels = [q.pixels for q in questions if q.modality == modality]  # row order == run order
        if pixels:
            stacked = torch.stack(pixels)  # (N, 3, S, S) or (M, F, 3, S, S)
            media[name] = (torch.full_like(stacked, GREY) if blind else stacked).to(device)
    logits = model(input_ids.to(device), positions=positions.to(device), doc_ids=doc_ids.to(device), **media)
    return logits[:, :T]  # (B, T, V)


@torch.no_grad()
def score_choices(
    model, questions: list[Question], *, blind: bool = False, batch_size: int = 16, device=None
) -> list[list[float]]:
    """Per question, per choice: mean log-prob of the choice's tokens (eos included) after the
    prompt. One row per (question, choice), `batch_size` rows per forward pass."""
    tok = model.tokenizer
    pairs = []  # (question index, choice index, prompt length, row tokens)
    for qi, q in enumerate(questions):
        prompt = prompt_tokens(tok, q)
        for ci, choice in enumerate(q.choices):
            pairs.append((qi, ci, len(prompt), prompt + answer_tokens(tok, choice)))
    scores = [[0.0] * len(q.choices) for q in questions]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        rows = [full[:-1] for _, _, _, full in batch]  # inputs; targets are full[1:]
        logits = forward_rows(model, rows, [questions[qi] for qi, *_ in batch], blind, device)
        for b, (qi, ci, n_prompt, full) in enumerate(batch):
            # logits at i predict full[i + 1]: the continuation full[n_prompt:] is predicted
            # from positions n_prompt-1 .. len(full)-2
            cont = torch.tensor(full[n_prompt:], device=logits.device)
            logp = logits[b, n_prompt - 1 : len(full) - 1].float().log_softmax(-1)  # (C, V)
            scores[qi][ci] = logp.gather(1, cont[:, None]).mean().item()
    return scores


@torch.no_grad()
def generate_answers(
    model,
    questions: list[Question],
    *,
    batch_size: int = 16,
    device=None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answers after each prompt (re-running the model each token, no KV cache). Special
    tokens other than eos are never generated: a stray placeholder would have no media."""
    tok = model.tokenizer
    banned = torch.tensor(sorted(set(tok.special_ids.values()) - {tok.eos_id}))
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        seqs = [prompt_tokens(tok, q) for q in batch]
        new: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))
        for _ in range(max_new_tokens):
            if not active:
                break
            logits = forward_rows(model, [seqs[i] for i in active], [batch[i] for i in active], device=device)
            last = logits[torch.arange(len(active)), torch.tensor([len(seqs[i]) - 1 for i in active])]
            last = last.float()  # (B, V)
            last[:, banned.to(last.device)] = -math.inf
            last[:, tok.vocab_size :] = -math.inf  # rows past the tokenizer (padded vocab)
            still = []
            for i, nxt in zip(active, last.argmax(-1).tolist()):
                if nxt == tok.eos_id:
                    continue
                seqs[i].append(nxt)
                new[i].append(nxt)
                still.append(i)
            active = still
        answers += [tok.decode(ids).strip() for ids in new]
    return answers


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


ScoreFn = Callable[..., list[list[float]]]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first best on ties


def _summary(rows: list[dict], blind: bool, generate: bool) -> dict:
    n = len(rows)
    out = {
        "acc": sum(r["correct"] for r in rows) / n,
        "n": n,
        "chance": sum(r["chance"] for r in rows) / n,
        "blind_acc": sum(r["blind_correct"] for r in rows) / n if blind else None,
    }
    if generate:
        out["gen_acc"] = sum(r["gen_correct"] for r in rows) / n
    return out


def reduce_results(values: torch.Tensor) -> torch.Tensor:
    """Collective: per-question results (n, len(RESULT_COLUMNS)), each row filled by the one rank
    that scored it and zero elsewhere, summed over ranks (one all-reduce on the communication
    device) and read on the host."""
    from fusion import dist

    dist.all_reduce(values)
    return dist.fetch(values, "evaluation: the questions' results from every rank")


RESULT_COLUMNS = ("correct", "blind_correct", "gen_correct", "prediction")


def _score_batch(
    model, chunk: list[Question], score_fn: ScoreFn, blind: bool, generate: bool, **kw
) -> list[list[float]]:
    """RESULT_COLUMNS of each question of `chunk`: correct, blind correct, generation correct, the
    predicted choice's index."""
    scores = score_fn(model, chunk, blind=False, **kw)
    blind_scores = score_fn(model, chunk, blind=True, **kw) if blind else None
    gens = generate_answers(model, chunk, **kw) if generate else None
    out = []
    for i, q in enumerate(chunk):
        pred = _argmax(scores[i])
        blind_ok = blind and q.choices[_argmax(blind_scores[i])] == q.answer
        gen_ok = generate and gens[i].strip().lower() == q.answer.strip().lower()
        out.append([float(q.choices[pred] == q.answer), float(blind_ok), float(gen_ok), float(pred)])
    return out


def _check_args(model, batch_size: int, limit: int | None) -> None:
    if batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be positive, got {limit}")
    if getattr(model, "tokenizer", None) is None:
        raise EvalError("the model has no tokenizer (load it with fusion.load_model, or set model.tokenizer)")


def _result(
    rows: list[dict], values: list[list[float]], kept: list[Question], blind: bool, generate: bool
) -> tuple[dict, list[Shown]]:
    """The questions' results (RESULT_COLUMNS, every rank's) folded into the rows -> ({overall,
    by_type, examples}, the kept questions with their predictions)."""
    for row, (correct, blind_ok, gen_ok, _) in zip(rows, values):
        row.update(
            correct=bool(correct),
            **({"blind_correct": bool(blind_ok)} if blind else {}),
            **({"gen_correct": bool(gen_ok)} if generate else {}),
        )
    shown = [Shown(q, q.choices[int(values[i][3])], rows[i]["correct"]) for i, q in enumerate(kept)]
    by_type = {
        t: _summary([r for r in rows if r["type"] == t], blind, generate)
        for t in sorted({r["type"] for r in rows})
    }
    examples = [
        {
            "key": s.question.key,
            "type": s.question.type,
            "question": s.question.question,
            "answer": s.question.answer,
            "prediction": s.prediction,
            "correct": s.correct,
        }
        for s in shown
    ]
    return {"overall": _summary(rows, blind, generate), "by_type": by_type, "examples": examples}, shown


def _score_set(
    model,
    questions,
    name: str,
    total: int | None,
    shard: tuple[int, int],
    limit: int | None,
    batch_size: int,
    examples: int,
    progress: bool,
    score_fn: ScoreFn,
    blind: bool,
    generate: bool,
    device,
) -> tuple[list[dict], list[list[float]], list[Question]]:
    """This rank's share of a set's questions scored, batch by batch. -> (rows: type and chance per
    question; values: RESULT_COLUMNS per question, zeros where another rank scores; the first
    `examples` questions). The model is in eval mode meanwhile."""
    from tqdm import tqdm

    rank, world = shard
    was_training = model.training
    model.eval()
    rows: list[dict] = []  # per question: type, chance; then the results
    kept: list[Question] = []  # the first `examples` questions, for the picture
    values: list[list[float]] = []  # per question: RESULT_COLUMNS, zeros where another rank scores
    try:
        with tqdm(
            total=total, desc=name, unit="q", file=sys.stderr, disable=not progress, dynamic_ncols=True
        ) as bar:
            while limit is None or len(rows) < limit:
                want = batch_size if limit is None else min(batch_size, limit - len(rows))
                chunk = [q for _, q in zip(range(want), questions)]
                if not chunk:
                    break
                mine = (len(rows) // batch_size) % world == rank  # batch i is rank i % world's
                values += (
                    _score_batch(
                        model,
                        chunk,
                        score_fn,
                        blind,
                        generate,
                        batch_size=batch_size,
                        device=device,
                    )
                    if mine
                    else [[0.0] * len(RESULT_COLUMNS) for _ in chunk]
                )
                rows += [{"type": q.type, "chance": q.chance} for q in chunk]
                kept += chunk[: examples - len(kept)]
                bar.update(len(chunk))
    finally:
        questions.close()
        model.train(was_training)
    return rows, values, kept


def run_evaluation(
    model,
    vqa_dir,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    generate: bool = False,
    blind: bool = True,
    n_frames: int = 8,
    device=None,
    progress: bool = True,
    examples: int = 16,
    score_fn: ScoreFn | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[dict, list[Shown]]:
    """(result dict, the first `examples` questions with their predictions).

    `shard=(rank, world)`: the ranks of a process group share the work, batch i scored by rank
    i % world; every rank then holds every result (`reduce_results`, a collective: all ranks
    call it with the same set and limit)."""
    from fusion.data.shards import ErrorCounter

    _check_args(model, batch_size, limit)
    t0 = time.perf_counter()
    counter = ErrorCounter()
    maker = make_sample_maker(model, n_frames, counter)
    total = set_size(vqa_dir)  # for the progress bar
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    name, world = set_name(vqa_dir), shard[1]
    rows, values, kept = _score_set(
        model,
        iter_questions(vqa_dir, maker),
        name,
        total,
        shard,
        limit,
        batch_size,
        examples,
        progress,
        score_fn or score_choices,
        blind,
        generate,
        device,
    )
    if world > 1:
        from fusion import dist

        values = reduce_results(
            dist.tensor(values, dtype=torch.float64).reshape(-1, len(RESULT_COLUMNS))
        ).tolist()
    if not rows:
        raise EvalError(
            f"--vqa {vqa_dir}: no usable questions (skipped {counter.total}: {counter.summary()})"
        )
    folded, shown = _result(rows, values, kept, blind, generate)
    result = {
        "set": name,
        "vqa_dir": str(vqa_dir),
        "overall": folded["overall"],
        "by_type": folded["by_type"],
        "skipped": counter.total,
        "skipped_reasons": dict(counter.counts),
        "n_frames": n_frames,
        "seconds": round(time.perf_counter() - t0, 2),
        "examples": folded["examples"],
    }
    return result, shown


def evaluate(
    model,
    vqa_dir,
    batch_size: int = 16,
    limit: int | None = None,
    generate: bool = False,
    blind: bool = True,
    n_frames: int = 8,
    device=None,
    progress: bool = True,
    score_fn: ScoreFn | None = None,
) -> dict:
    """Evaluate `model` (with `model.tokenizer`) on one VQA set; returns the SET.json content:
    {"overall": {acc, n, chance, blind_acc[, gen_acc]}, "by_type": {type: {...}}, "skipped", ...}.
    `device=None` runs where the model is; `blind=False` gives blind_acc None."""
    result, _ = run_evaluation(
        model,
        vqa_dir,
        batch_size=batch_size,
        limit=limit,
        generate=generate,
        blind=blind,
        n_frames=n_frames,
        device=device,
        progress=progress,
        examples=0,
        score_fn=score_fn,
    )
    return result


def evaluate_run(
    run_dir=None,
    vqa_dirs=(),
    *,
    model=None,
    out_dir=None,
    step: int | None = None,
    checkpoint: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    generate: bool = False,
    blind: bool = True,
    n_frames: int | None = None,
    device=None,
    examples: int = 16,
    progress: bool = False,
    score_fn: ScoreFn | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, dict]:
    """Evaluate on each VQA set and write OUT/SET.json and OUT/SET.png (OUT = `out_dir`, default
    `default_out_dir`: RUN/eval). `run_dir` may also be a checkpoints dir, a step dir or a model
    dir. `model=None` loads its latest checkpoint; the trainer passes its live model (put back in
    training mode afterwards) and may say which `step` / `checkpoint` it is, recorded in the JSON.
    `n_frames=None`: the run's `data.n_frames`, else 8. Returns {set name: result}. Nothing is
    ever written inside a checkpoint directory (EvalError). `shard=(rank, world)`: the ranks of a
    process group share the questions (`run_evaluation`); rank 0 alone writes the files."""
    if not vqa_dirs:
        raise EvalError("--vqa: give at least one VQA set directory")
    if out_dir is None and run_dir is None:
        raise EvalError("--out is required without --run")
    names = check_sets(vqa_dirs)
    meta: dict = {"checkpoint": str(checkpoint)} if checkpoint else {}
    if model is None:
        if run_dir is None:
            raise EvalError("no model: give --run or --checkpoint")
        model, meta = load_for_eval(run_dir, device)
        step = meta.get("step") if step is None else step
    if step is not None:
        meta["step"] = step
    if n_frames is None:
        n_frames = run_n_frames(meta.get("checkpoint") or run_dir) or 8
    if out_dir is None:
        out_dir = default_out_dir(meta.get("checkpoint") or run_dir)
    out_dir = check_out_dir(out_dir)
    write = shard[0] == 0
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, vqa_dir in zip(names, vqa_dirs):
        result, shown = run_evaluation(
            model,
            vqa_dir,
            batch_size=batch_size,
            limit=limit,
            generate=generate,
            blind=blind,
            n_frames=n_frames,
            device=device,
            progress=progress,
            examples=examples,
            score_fn=score_fn,
            shard=shard,
        )
        result = {**meta, **result}
        results[name] = result
        if not write:
            continue
        write_atomic(out_dir / f"{name}.json", (json.dumps(result, indent=1) + "\n").encode())
        if shown:
            plot_examples(shown, out_dir / f"{name}.png", title=f"{name}: acc {result['overall']['acc']:.3f}")
    return results
