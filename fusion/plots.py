"""Pictures of a run: loss curves and expert-load heatmaps (layer x expert, one panel per modality).

Written into RUN/plots/ by the trainer (rank 0) at each checkpoint and at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fusion.schema import MODALITIES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_expert_load(load: np.ndarray, layer_ids: list[int], path: Path) -> Path:
    """load (L, 3, E): routed assignments per MoE layer, modality and expert. Each panel shows the
    share of that modality's tokens per expert (rows sum to 1), so modalities compare directly."""
    plt = _pyplot()
    L, _, E = load.shape
    used = [i for i in range(3) if load[:, i].sum() > 0] or [0]
    fig, axes = plt.subplots(1, len(used), figsize=(1.2 + 0.45 * E * len(used), 0.9 + 0.4 * L), squeeze=False)
    for ax, m in zip(axes[0], used):
        share = load[:, m] / np.maximum(load[:, m].sum(1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(share.max(), 1e-9))
        ax.set_title(f"{MODALITIES[m]} ({int(load[:, m].sum() / max(L, 1))} tokens/layer)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L), [str(i) for i in layer_ids])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("share of tokens routed to each expert", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(metrics_file: Path, path: Path) -> Path | None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ["loss"] + [f"loss/{m}" for m in MODALITIES]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1.2 if key == "loss" else 0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
