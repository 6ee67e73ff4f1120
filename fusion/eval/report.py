"""What an evaluation shows: the table `fusion-eval` prints and SET.png, a picture of example
questions with their predictions."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import torch

from fusion.eval.questions import Question, Shown


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
        sheet[:, r * (S + 1) : r * (S + 1) + S, c * (S + 1) : c * (S + 1) + S] = frame
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
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        bottom=0.7 / (cell_h * rows + head),
        top=1 - (head + 0.6) / (cell_h * rows + head),
        wspace=0.15,
        hspace=0.6,
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        q = s.question
        ax.imshow(_picture(q), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(f"[{q.type}] {q.question}", 36)[:3]), fontsize=8)
        ax.text(
            0.5,
            -0.03,
            f"pred: {s.prediction}\nanswer: {q.answer}",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=9,
            color="green" if s.correct else "red",
        )
    if title:
        fig.suptitle(title, y=1 - 0.15 / (cell_h * rows + head))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
