"""Toy-VQA evaluation: multiple-choice scoring by likelihood, a blind baseline, optional greedy
generation, `eval/SET.json` ({overall, by_type}: acc, n, chance, blind_acc) and a picture of examples.

    fusion-eval --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test

A question is a VQA shard sample (SPEC §4): media + {question, answer, choices, type}. Its prompt is
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

import argparse
import json
import math
import os
import random
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

GREY = 128            # the blind baseline's pixel value (uint8)
MAX_NEW_TOKENS = 8    # --generate stops here if no eos came first


class EvalError(ValueError):
    """Bad input, reported by the CLI as one line."""


# ---------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------


@dataclass
class Question:
    key: str
    question: str
    answer: str
    choices: list[str]
    type: str
    part: tuple                 # ("image", n_tokens) or ("video", n_groups, n_tokens): the media run
    pixels: torch.Tensor        # uint8 (3, S, S) image or (F, 3, S, S) video frames
    modality: int               # 1 image, 2 video

    @property
    def chance(self) -> float:
        return 1.0 / len(self.choices)


def make_sample_maker(model, n_frames: int, counter=None):
    """A `SampleMaker` for evaluation: the model's own vision config, deterministic media
    (centre crop, `segment_middle` frames)."""
    from fusion.config import Config, ConfigError, validate
    from fusion.data.samples import SampleMaker

    cfg = Config()
    cfg.model = model.cfg
    cfg.data.n_frames = n_frames
    cfg.data.frame_strategy = "segment_middle"
    try:
        validate(cfg)
    except ConfigError as e:
        raise EvalError(f"--n-frames {n_frames}: {e}") from None
    return SampleMaker(cfg, model.tokenizer, train=False, counter=counter)


def make_question(raw: dict, maker) -> Question | None:
    """A raw VQA shard sample -> Question, or None (the reason goes to `maker.counter`)."""
    from fusion.data.samples import IMAGE_EXTS
    from fusion.data.shards import SampleError, decode_json, vqa_type

    def skip(reason):
        if maker.counter is not None:
            maker.counter(reason, key)
        return None

    key = raw.get("__key__", "")
    if "json" not in raw:
        return skip("missing_json")
    try:
        meta = decode_json(raw["json"])
    except SampleError as e:
        return skip(e)
    choices = meta.get("choices") if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or not isinstance(meta.get("question"), str) or "answer" not in meta
            or not isinstance(choices, list) or not choices
            or not all(isinstance(c, (str, int, float)) for c in choices)):
        return skip("bad_vqa_json")
    choices = [str(c).strip() for c in choices]
    answer = str(meta["answer"]).strip()
    if answer not in choices:
        return skip("answer_not_in_choices")
    rng = random.Random(f"{maker.cfg.train.seed}-{key}")  # as SampleMaker.__call__ seeds it
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is not None:
        media = maker.image(raw[ext], rng)
    elif "mp4" in raw:
        media = maker.video(raw["mp4"], meta, rng)
    else:
        return skip("missing_media")
    if media is None:  # counted by the maker
        return None
    part, pixels, modality = media
    return Question(key=key, question=meta["question"].strip(), answer=answer, choices=choices,
                    type=vqa_type(meta.get("type")), part=part,
                    pixels=torch.as_tensor(pixels), modality=modality)


def iter_questions(vqa_dir: str | Path, maker) -> Iterator[Question]:
    """Usable questions of a VQA set, in shard order; the others are counted in `maker.counter`."""
    from fusion.data.shards import iter_samples

    for raw in iter_samples(set_shards(vqa_dir), maker.counter):
        q = make_question(raw, maker)
        if q is not None:
            yield q


def set_shards(vqa_dir: str | Path) -> list[str]:
    from fusion.data.shards import list_shards

    path = Path(vqa_dir)
    if not path.is_dir():
        raise EvalError(f"--vqa {vqa_dir}: no such directory")
    try:
        return list_shards(str(path))
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"--vqa {vqa_dir}: {e}") from None


def set_size(vqa_dir: str | Path) -> int | None:
    """n_samples from the set's index.json, if it has a readable one (for the progress bar)."""
    from fusion.data.shards import read_index

    try:
        index = read_index(vqa_dir)
    except ValueError:
        return None
    n = index.get("n_samples") if index else None
    return n if isinstance(n, int) else None


# ---------------------------------------------------------------------------------------------
# tokens and forward passes
# ---------------------------------------------------------------------------------------------


def prompt_tokens(tok, q: Question) -> list[int]:
    """<bos> media run, " Q: ... A:" -- the training sample without its answer and eos."""
    from fusion.data.samples import vqa_prompt
    from fusion.data.sequence import build_sample

    tokens, _, _ = build_sample(tok, [q.part, vqa_prompt(q.question)])
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


def forward_rows(model, rows: list[list[int]], questions: list[Question], blind: bool = False,
                 device=None) -> torch.Tensor:
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
    logits = model(input_ids.to(device), positions=positions.to(device), doc_ids=doc_ids.to(device),
                   **media)
    return logits[:, :T]  # (B, T, V)


@torch.no_grad()
def score_choices(model, questions: list[Question], *, blind: bool = False, batch_size: int = 16,
                  device=None) -> list[list[float]]:
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
        batch = pairs[start:start + batch_size]
        rows = [full[:-1] for _, _, _, full in batch]  # inputs; targets are full[1:]
        logits = forward_rows(model, rows, [questions[qi] for qi, *_ in batch], blind, device)
        for b, (qi, ci, n_prompt, full) in enumerate(batch):
            # logits at i predict full[i + 1]: the continuation full[n_prompt:] is predicted
            # from positions n_prompt-1 .. len(full)-2
            cont = torch.tensor(full[n_prompt:], device=logits.device)
            logp = logits[b, n_prompt - 1: len(full) - 1].float().log_softmax(-1)  # (C, V)
            scores[qi][ci] = logp.gather(1, cont[:, None]).mean().item()
    return scores


@torch.no_grad()
def generate_answers(model, questions: list[Question], *, batch_size: int = 16, device=None,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers after each prompt (re-running the model each token, no KV cache). Special
    tokens other than eos are never generated: a stray placeholder would have no media."""
    tok = model.tokenizer
    banned = torch.tensor(sorted(set(tok.special_ids.values()) - {tok.eos_id}))
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        seqs = [prompt_tokens(tok, q) for q in batch]
        new: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))
        for _ in range(max_new_tokens):
            if not active:
                break
            logits = forward_rows(model, [seqs[i] for i in active], [batch[i] for i in active],
                                  device=device)
            last = logits[torch.arange(len(active)), torch.tensor([len(seqs[i]) - 1 for i in active])]
            last = last.float()  # (B, V)
            last[:, banned.to(last.device)] = -math.inf
            last[:, tok.vocab_size:] = -math.inf  # rows past the tokenizer (padded vocab)
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


@dataclass
class Shown:
    """A question kept for the picture of examples."""

    question: Question
    prediction: str
    correct: bool


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first best on ties


def _summary(rows: list[dict], blind: bool, generate: bool) -> dict:
    n = len(rows)
    out = {"acc": sum(r["correct"] for r in rows) / n, "n": n,
           "chance": sum(r["chance"] for r in rows) / n,
           "blind_acc": sum(r["blind_correct"] for r in rows) / n if blind else None}
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


def run_evaluation(model, vqa_dir, *, batch_size: int = 16, limit: int | None = None,
                   generate: bool = False, blind: bool = True, n_frames: int = 8, device=None,
                   progress: bool = True, examples: int = 16, score_fn: ScoreFn | None = None,
                   shard: tuple[int, int] = (0, 1)) -> tuple[dict, list[Shown]]:
    """(result dict, the first `examples` questions with their predictions).

    `shard=(rank, world)`: the ranks of a process group share the work, batch i scored by rank
    i % world; every rank then holds every result (`reduce_results`, a collective: all ranks
    call it with the same set and limit)."""
    from tqdm import tqdm

    from fusion.data.shards import ErrorCounter

    if batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be positive, got {limit}")
    if getattr(model, "tokenizer", None) is None:
        raise EvalError("the model has no tokenizer (load it with fusion.load_model, or set "
                        "model.tokenizer)")
    score_fn = score_fn or score_choices
    t0 = time.perf_counter()
    counter = ErrorCounter()
    maker = make_sample_maker(model, n_frames, counter)
    total = set_size(vqa_dir)
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    name = set_name(vqa_dir)
    was_training = model.training
    model.eval()
    rank, world = shard
    rows: list[dict] = []
    kept: list[Question] = []  # the first `examples` questions, for the picture
    values: list[list[float]] = []  # per question: RESULT_COLUMNS, this rank's questions only
    questions = iter_questions(vqa_dir, maker)
    try:
        with tqdm(total=total, desc=name, unit="q", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            batch_index = 0
            while limit is None or len(rows) < limit:
                want = batch_size if limit is None else min(batch_size, limit - len(rows))
                chunk = [q for _, q in zip(range(want), questions)]
                if not chunk:
                    break
                mine = batch_index % world == rank
                batch_index += 1
                kw = dict(batch_size=batch_size, device=device)
                if mine:
                    scores = score_fn(model, chunk, blind=False, **kw)
                    blind_scores = score_fn(model, chunk, blind=True, **kw) if blind else None
                    gens = generate_answers(model, chunk, **kw) if generate else None
                for i, q in enumerate(chunk):
                    rows.append({"type": q.type, "chance": q.chance})
                    if len(kept) < examples:
                        kept.append(q)
                    if not mine:
                        values.append([0.0] * len(RESULT_COLUMNS))
                        continue
                    pred = _argmax(scores[i])
                    blind_ok = blind and q.choices[_argmax(blind_scores[i])] == q.answer
                    gen_ok = generate and gens[i].strip().lower() == q.answer.strip().lower()
                    values.append([float(q.choices[pred] == q.answer), float(blind_ok), float(gen_ok),
                                   float(pred)])
                bar.update(len(chunk))
    finally:
        questions.close()
        model.train(was_training)
    if world > 1:
        from fusion import dist

        values = reduce_results(dist.tensor(values, dtype=torch.float64).reshape(-1, len(RESULT_COLUMNS))).tolist()
    for row, (correct, blind_ok, gen_ok, _) in zip(rows, values):
        row["correct"] = bool(correct)
        if blind:
            row["blind_correct"] = bool(blind_ok)
        if generate:
            row["gen_correct"] = bool(gen_ok)
    shown = [Shown(q, q.choices[int(values[i][3])], rows[i]["correct"]) for i, q in enumerate(kept)]
    if not rows:
        raise EvalError(f"--vqa {vqa_dir}: no usable questions (skipped {counter.total}: "
                        f"{counter.summary()})")
    by_type = {t: _summary([r for r in rows if r["type"] == t], blind, generate)
               for t in sorted({r["type"] for r in rows})}
    result = {"set": name, "vqa_dir": str(vqa_dir),
              "overall": _summary(rows, blind, generate), "by_type": by_type,
              "skipped": counter.total, "skipped_reasons": dict(counter.counts),
              "n_frames": n_frames, "seconds": round(time.perf_counter() - t0, 2),
              "examples": [{"key": s.question.key, "type": s.question.type,
                            "question": s.question.question, "answer": s.question.answer,
                            "prediction": s.prediction, "correct": s.correct} for s in shown]}
    return result, shown


def evaluate(model, vqa_dir, batch_size: int = 16, limit: int | None = None, generate: bool = False,
             blind: bool = True, n_frames: int = 8, device=None, progress: bool = True,
             score_fn: ScoreFn | None = None) -> dict:
    """Evaluate `model` (with `model.tokenizer`) on one VQA set; returns the SET.json content:
    {"overall": {acc, n, chance, blind_acc[, gen_acc]}, "by_type": {type: {...}}, "skipped", ...}.
    `device=None` runs where the model is; `blind=False` gives blind_acc None."""
    result, _ = run_evaluation(model, vqa_dir, batch_size=batch_size, limit=limit, generate=generate,
                               blind=blind, n_frames=n_frames, device=device, progress=progress,
                               examples=0, score_fn=score_fn)
    return result


def evaluate_run(run_dir=None, vqa_dirs=(), *, model=None, out_dir=None, step: int | None = None,
                 checkpoint: str | None = None,
                 batch_size: int = 16, limit: int | None = None, generate: bool = False,
                 blind: bool = True, n_frames: int | None = None, device=None, examples: int = 16,
                 progress: bool = False, score_fn: ScoreFn | None = None,
                 shard: tuple[int, int] = (0, 1)) -> dict[str, dict]:
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
        result, shown = run_evaluation(model, vqa_dir, batch_size=batch_size, limit=limit,
                                       generate=generate, blind=blind, n_frames=n_frames,
                                       device=device, progress=progress, examples=examples,
                                       score_fn=score_fn, shard=shard)
        result = {**meta, **result}
        results[name] = result
        if not write:
            continue
        write_atomic(out_dir / f"{name}.json", (json.dumps(result, indent=1) + "\n").encode())
        if shown:
            plot_examples(shown, out_dir / f"{name}.png", title=f"{name}: acc {result['overall']['acc']:.3f}")
    return results


def set_name(vqa_dir: str | Path) -> str:
    """SET: the VQA directory's name as the user wrote it (a symlink keeps its own name), trailing
    slashes ignored; `.` or `..` name the directory they stand for."""
    name = Path(vqa_dir).name
    return name if name not in ("", ".", "..") else Path(vqa_dir).resolve().name


def check_sets(vqa_dirs) -> list[str]:
    """Set names (directory names), after checking each set has shards and names are unique."""
    names = []
    for d in vqa_dirs:
        set_shards(d)
        name = set_name(d)
        if name in names:
            raise EvalError(f"--vqa {d}: two sets named '{name}' would write the same {name}.json")
        names.append(name)
    return names


def default_out_dir(path: str | Path) -> Path:
    """Where SET.json goes without --out, for a model at `path` (a run, checkpoints, step or model
    dir): the run's eval/ for RUN, RUN/checkpoints or RUN/checkpoints/step_N; beside any other
    checkpoint (a dir with manifest.json, whose files it covers: an added one would make resuming
    refuse the checkpoint); DIR/eval for any other model dir (e.g. `fusion-convert from-hf` OUT)."""
    from fusion.checkpoint import LATEST, MANIFEST, TAG_PATTERN

    path = Path(os.path.abspath(path))  # "." and ".." have no name to go by

    def is_checkpoints(p: Path) -> bool:
        return p.name == "checkpoints" or (p / LATEST).is_file()

    if TAG_PATTERN.fullmatch(path.name) and is_checkpoints(path.parent):
        return path.parent.parent / "eval"
    if is_checkpoints(path):
        return path.parent / "eval"
    if (path / MANIFEST).is_file():
        return path.parent / "eval"
    return path / "eval"


def check_out_dir(out_dir: str | Path, flag: str = "--out") -> Path:
    """`out_dir`, unless it lies inside a checkpoint (EvalError: the checkpoint's manifest lists
    every file under it, so an eval file there would make `train.resume` refuse it)."""
    from fusion.checkpoint import checkpoint_covering

    ckpt = checkpoint_covering(out_dir)
    if ckpt is not None:
        raise EvalError(f"{flag} {out_dir}: inside checkpoint {ckpt}, whose manifest.json lists every "
                        f"file there (an eval file would make resuming refuse it); write elsewhere, "
                        f"e.g. {default_out_dir(ckpt)}")
    return Path(out_dir)


def load_for_eval(path, device=None) -> tuple[object, dict]:
    """(model, {"checkpoint", "step"}) from a run dir, checkpoints dir or step dir."""
    from fusion.checkpoint import CheckpointError, find_model_dir, load_model

    try:
        model_dir = find_model_dir(path)
        model = load_model(model_dir, device or "cpu")
    except (FileNotFoundError, CheckpointError) as e:
        raise EvalError(str(e)) from None
    meta: dict = {"checkpoint": str(model_dir)}
    m = re.fullmatch(r"step_(\d+)", model_dir.name)
    if m:
        meta["step"] = int(m.group(1))
    return model, meta


def run_n_frames(path) -> int | None:
    """`data.n_frames` from the config.yaml of the run a checkpoint belongs to, if found."""
    import yaml

    if path is None:
        return None
    path = Path(path)
    for p in (path, path.parent, path.parent.parent):
        cfg = p / "config.yaml"
        if cfg.is_file():
            try:
                n = (yaml.safe_load(cfg.read_text()) or {}).get("data", {}).get("n_frames")
            except (yaml.YAMLError, AttributeError, OSError):
                return None
            return n if isinstance(n, int) and not isinstance(n, bool) else None
    return None


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    gen = "gen_acc" in result["overall"]

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    head = f"{'type':<14} {'n':>6} {'acc':>7} {'blind':>7} {'chance':>7}" + (f" {'gen':>7}" if gen else "")
    lines = [f"{result['set']}  ({result['overall']['n']} questions, skipped {result['skipped']})", head]
    items = list(result["by_type"].items()) + [("overall", result["overall"])]
    for t, s in items:
        line = f"{t:<14} {s['n']:>6} {fmt(s['acc']):>7} {fmt(s['blind_acc']):>7} {fmt(s['chance']):>7}"
        lines.append(line + (f" {fmt(s['gen_acc']):>7}" if gen else ""))
    return "\n".join(lines)


def _picture(q: Question, max_frames: int = 8, per_row: int = 4):
    """uint8 (H, W, 3): the image, or up to `max_frames` frames tiled `per_row` to a row."""
    if q.modality == 1:
        return q.pixels.permute(1, 2, 0).numpy()
    frames = q.pixels[:max_frames]  # (F, 3, S, S)
    F, _, S, _ = frames.shape
    cols, rows = min(F, per_row), math.ceil(F / per_row)
    sheet = torch.full((3, rows * (S + 1) - 1, cols * (S + 1) - 1), 255, dtype=torch.uint8)
    for i, frame in enumerate(frames):  # a 1-pixel white line between frames
        r, c = divmod(i, per_row)
        sheet[:, r * (S + 1): r * (S + 1) + S, c * (S + 1): c * (S + 1) + S] = frame
    return sheet.permute(1, 2, 0).numpy()


def plot_examples(shown: list[Shown], path: Path, title: str = "", cols: int = 4) -> None:
    """A grid: picture, question, prediction and answer (green if right, red if wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(shown)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    cell_h, head = 3.9, 0.5  # inches: picture + question above + prediction below; title band
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, cell_h * rows + head), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.7 / (cell_h * rows + head),
                        top=1 - (head + 0.6) / (cell_h * rows + head), wspace=0.15, hspace=0.6)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        q = s.question
        ax.imshow(_picture(q), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(f"[{q.type}] {q.question}", 36)[:3]), fontsize=8)
        ax.text(0.5, -0.03, f"pred: {s.prediction}\nanswer: {q.answer}", transform=ax.transAxes,
                ha="center", va="top", fontsize=9, color="green" if s.correct else "red")
    if title:
        fig.suptitle(title, y=1 - 0.15 / (cell_h * rows + head))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusion-eval", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="example:\n  fusion-eval --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR",
                     help="run directory: evaluates its latest checkpoint, writes RUN_DIR/eval/SET.json")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a checkpoints/ dir (its latest), a checkpoints/step_N dir or a model dir "
                          "(fusion-convert from-hf OUT)")
    p.add_argument("--vqa", nargs="+", required=True, metavar="DIR",
                   help="VQA shard directories (media + .json {question, answer, choices, type}); each writes SET.json and SET.png, "
                        "SET being the directory's name")
    p.add_argument("--out", metavar="OUT_DIR",
                   help="where SET.json / SET.png go (default: the run's eval/ for a run, its "
                        "checkpoints/ or a step_N dir; DIR/eval for another model dir; never inside "
                        "a checkpoint)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="(question, choice) rows per forward pass (default 16)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N usable questions of each set")
    p.add_argument("--generate", action="store_true",
                   help=f"also greedy-generate up to {MAX_NEW_TOKENS} tokens and report exact-match gen_acc")
    p.add_argument("--no-blind", action="store_true",
                   help="skip the blind (grey-media) baseline; blind_acc is then null")
    p.add_argument("--n-frames", type=int, default=None, metavar="N",
                   help="frames sampled per video (default: the run's data.n_frames, else 8)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where to run the model (default: cuda if available, else cpu)")
    p.add_argument("--examples", type=int, default=16, metavar="N",
                   help="questions shown in SET.png (default 16; 0: no picture)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--quantize", choices=("int4",), default=None,
                   help="also evaluate with weight-only int4 linear and expert weights (fusion/quant.py); "
                        "SET.json gains an 'int4' section beside the unquantised result, with the weight "
                        "memory of each")
    p.add_argument("--group-size", type=int, default=64, metavar="G",
                   help="--quantize: weights per int4 scale/offset group, along the input axis (even; default 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    from fusion.cli import pipe_safe

    return pipe_safe(lambda: _main(argv))  # `fusion-eval ... | head`: no traceback


def _main(argv: list[str] | None) -> int:
    from fusion.config import ConfigError

    try:
        args = build_parser().parse_args(argv)
        for flag, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                                 ("--n-frames", args.n_frames, 1), ("--examples", args.examples, 0)):
            if value is not None and value < low:
                raise EvalError(f"{flag} must be >= {low}, got {value}")
        if args.quantize and (args.group_size < 2 or args.group_size % 2):
            raise EvalError(f"--group-size must be an even number >= 2, got {args.group_size}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: CUDA is not available")
        check_sets(args.vqa)
        source = args.run or args.checkpoint
        if not Path(source).exists():
            raise EvalError(f"{'--run' if args.run else '--checkpoint'} {source}: no such directory")
        out = check_out_dir(args.out) if args.out else None
        model, meta = load_for_eval(source, device)
        out = out or default_out_dir(meta["checkpoint"])
        results = evaluate_run(args.run, args.vqa, model=model, out_dir=out,
                               step=meta.get("step"), checkpoint=meta["checkpoint"],
                               batch_size=args.batch_size, limit=args.limit,
                               generate=args.generate, blind=not args.no_blind,
                               n_frames=args.n_frames or run_n_frames(meta["checkpoint"]) or 8,
                               device=device, examples=args.examples, progress=not args.no_progress)
        if args.quantize:  # the same sets again with int4 weights, written beside the result above
            from fusion.quant import add_int4_results

            add_int4_results(model, results, out,
                             group_size=args.group_size, batch_size=args.batch_size, limit=args.limit,
                             blind=not args.no_blind, device=device, progress=not args.no_progress)
    except BrokenPipeError:
        raise
    except _UsageError as e:
        print(f"fusion-eval: error: {e} (see --help)", file=sys.stderr)
        return 2
    except (EvalError, ConfigError, OSError) as e:  # OSError: e.g. a missing file, no permission
        print(f"fusion-eval: error: {e}", file=sys.stderr)
        return 1
    for name, result in results.items():
        print(format_table(result))
        if "int4" in result:
            from fusion.quant import format_int4

            print(format_int4(result))
        print(f"-> {out / (name + '.json')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
