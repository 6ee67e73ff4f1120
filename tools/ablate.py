"""Ablation grid: early vs late fusion x MoE vs dense, at equal training FLOPs, on the toy world.

    python tools/ablate.py                 # the CPU grid (minutes on 2 cores) -> docs/ablations.md + .png
    python tools/ablate.py --gpu           # the GPU grid (one GPU, bf16): the same four models, bigger
    python tools/ablate.py --grid demo     # the demo's recipe on 2 CPU ranks, scored as `make demo` (~30 min a seed)
    python tools/ablate.py --dry-run       # print the grid: steps and FLOPs of each run; train nothing

Each of the four models is trained with `fusion-train` (one process) for several seeds on the same
toy mixture (text, image captions, image VQA). Every run gets the same training-FLOP budget: its
steps are budget / (FLOPs per token from fusion-plan x tokens per step), so a model that costs
more per token trains for fewer steps. Runs evaluate toy image VQA (accuracy and the blind,
grey-image baseline) at a few points during training. The tool writes a table and a plot of toy-VQA
accuracy and training loss against training FLOPs to docs/ablations.md and docs/ablations.png;
text below the line `<!-- reading -->` in an existing docs/ablations.md is kept.

Finished runs (WORK/NAME/metrics.jsonl reaching the last step) are reused, so a rerun only trains
what is missing, and `--seeds`, `--budget` or the grid can grow without retraining the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "<!-- reading -->"


@dataclass
class Grid:
    name: str
    size: str  # model.size of every run
    seq_len: int
    micro_batch: int
    budget: float  # training FLOPs per run (fusion-plan's count)
    seeds: list[int]
    evals: int  # evaluations during a run (evenly spaced, the last at its end)
    eval_limit: int  # questions per evaluation
    xattn_every: int  # late fusion: a cross-attention block before layers 0, k, 2k, ...
    toy: dict  # fusion-data toy counts
    extra: list[str] = field(default_factory=list)  # more config overrides for every run
    env: dict = field(default_factory=dict)
    config: str | None = None  # a config file every run starts from (its model, data weights, lr)
    ranks: int = 1  # > 1: trained through the DeepSpeed launcher on this many ranks
    sets: list[str] = field(default_factory=list)  # VQA sets fusion-eval scores after training


TOY_SMALL = {
    "n-text": 400,
    "n-image": 600,
    "n-video": 0,
    "n-vqa-train": 1200,
    "n-vqa-test": 120,
    "n-vqa-compositional": 0,
    "n-video-vqa-train": 0,
    "n-video-vqa-test": 0,
    "samples-per-shard": 200,
}

GRIDS = {
    # 2-layer width-64 decoder, 4 experts top-1 + 1 shared, 32 px images as 16 tokens; about 60
    # optimizer steps of 8 x 128 tokens for the early-fusion MoE model: ~10 minutes on 2 cores
    "cpu": Grid(
        "cpu",
        size="debug",
        seq_len=128,
        micro_batch=8,
        budget=6.0e10,
        seeds=[0, 1],
        evals=2,
        eval_limit=60,
        xattn_every=2,
        toy=TOY_SMALL,
        extra=["model.moe.path=loop", "data.num_workers=0", "train.precision=fp32"],
        env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
    ),
    # the demo's 4-layer width-128 decoder on the default toy world, bf16 on one GPU: about 3000
    # steps of 32 x 256 tokens for the early-fusion MoE model, three seeds, 5 evaluations of 600
    # questions each; meant for one GPU (an hour or so of an H100/H200)
    "gpu": Grid(
        "gpu",
        size="demo",
        seq_len=256,
        micro_batch=32,
        budget=1.7e14,
        seeds=[0, 1, 2],
        evals=5,
        eval_limit=600,
        xattn_every=2,
        toy={},
        extra=["model.moe.path=grouped", "data.num_workers=2", "train.precision=bf16"],
    ),
}

# The demo's own recipe (configs/demo.yaml: model, optimizer, toy world, mixture, lr, 2 CPU ranks)
# for each of the four models, the budget set by the demo's step count for early fusion + MoE;
# every run is scored afterwards as `make demo` scores it (fusion-eval, every question of each set,
# with the blind baseline). About 30 minutes a seed on 2 cores.
# The toy world `make demo` trains on: the Makefile's TOY_FLAGS, extra colours included
DEMO_TOY = {
    "n-image": 40000,
    "n-video": 2400,
    "n-vqa-train": 60000,
    "n-video-vqa-train": 6000,
    "extra-colors": "white,pink,cyan,brown",
}
GRIDS["demo"] = Grid(
    "demo",
    size="demo",
    seq_len=0,
    micro_batch=0,
    budget=0.0,
    seeds=[0, 1],
    evals=4,
    eval_limit=600,
    xattn_every=2,
    toy=DEMO_TOY,
    config="configs/demo.yaml",
    ranks=2,
    sets=["vqa_image_test", "vqa_video_test", "vqa_image_compositional"],
    extra=["train.ckpt_every=0"],
    env={"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ROOT / ".venv" / "torch_extensions")},
)

VARIANTS = [("early", "moe"), ("early", "dense"), ("late", "moe"), ("late", "dense")]


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------


def model_overrides(grid: Grid, fusion: str, ffn: str) -> list[str]:
    switches = [
        f"model.fusion={fusion}",
        f"model.xattn_every={grid.xattn_every}",
        f"model.dense_baseline={'true' if ffn == 'dense' else 'false'}",
    ]
    if grid.config:  # the config's own model and vision tower
        return switches
    return [
        f"model.size={grid.size}",
        *switches,
        "model.vision.encoder=patch-linear",
        "model.vision.img_size=32",
        "model.vision.patch_size=8",
    ]


def use_config(grid: Grid, data: list[str]) -> None:
    """A grid built on a config file takes its row length, micro-batch and budget from it: the
    budget is what the config's steps cost early fusion + MoE (the config's own model). `data`:
    overrides that point the config at the grid's toy world (its tokenizer sets the vocabulary)."""
    if not grid.config:
        return
    from fusion.config import load_config
    from fusion.plan import make_plan

    cfg = load_config(str(ROOT / grid.config), data)
    t = cfg.train
    grid.seq_len, grid.micro_batch = t.seq_len, t.micro_batch * t.grad_accum * grid.ranks
    grid.size = cfg.model.size
    if not grid.budget:
        fpt = make_plan(load_config(str(ROOT / grid.config), model_overrides(grid, "early", "moe") + data))[
            "flops_per_token"
        ]
        grid.budget = t.steps * grid.seq_len * grid.micro_batch * fpt


def plan_runs(grid: Grid, data: list[str]) -> list[dict]:
    """One entry per (variant, seed): its overrides, FLOPs per token (fusion-plan), steps. `data`:
    as in `use_config`, for planning only (training is given the toy world's paths itself)."""
    from fusion.config import load_config
    from fusion.plan import make_plan

    runs = []
    tokens_per_step = grid.micro_batch * grid.seq_len
    for fusion, ffn in VARIANTS:
        if grid.config:  # rows per step: micro_batch x ranks, as the config trains
            over = model_overrides(grid, fusion, ffn)
            plan = make_plan(load_config(str(ROOT / grid.config), over + data))
        else:
            over = model_overrides(grid, fusion, ffn) + [
                f"train.seq_len={grid.seq_len}",
                f"train.micro_batch={grid.micro_batch}",
            ]
            plan = make_plan(load_config(None, over))
        fpt = plan["flops_per_token"]
        steps = max(2, round(grid.budget / (fpt * tokens_per_step)))
        for seed in grid.seeds:
            runs.append(
                {
                    "name": f"{fusion}-{ffn}-s{seed}",
                    "variant": f"{fusion} / {ffn}",
                    "seed": seed,
                    "sets": list(grid.sets),
                    "overrides": over,
                    "flops_per_token": fpt,
                    "steps": steps,
                    "tokens_per_step": tokens_per_step,
                    "flops": steps * tokens_per_step * fpt,
                    "params_total": plan["params"]["total"]["total"],
                    "params_active": plan["params"]["active"]["total"],
                }
            )
    return runs


def make_toy(grid: Grid, work: Path) -> Path:
    """WORK/toy with the grid's flags (`fusion-data toy` reuses a complete world made with them)."""
    toy = work / "toy"
    cmd = [str(BIN / "fusion-data"), "toy", "--output", str(toy)]
    for k, v in grid.toy.items():
        cmd += [f"--{k}", str(v)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return toy


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(run_dir: Path, steps: int, sets: list[str] = ()) -> bool:
    return any(r.get("step") == steps and "loss" in r for r in read_metrics(run_dir)) and all(
        (run_dir / "eval" / f"{name}.json").is_file() for name in sets
    )


def train(grid: Grid, run: dict, toy: Path, work: Path) -> float:
    """fusion-train one run (skipped when finished); returns its wall seconds (0 when reused)."""
    run_dir = work / run["name"]
    if finished(run_dir, run["steps"], grid.sets):
        return 0.0
    eval_every = max(1, math.ceil(run["steps"] / grid.evals))
    if grid.config:  # the config's data, mixture, lr and schedule; only the budget and seed change
        launch = (
            [
                str(BIN / "deepspeed"),
                "--num_gpus",
                str(grid.ranks),
                "--master_port",
                str(29500 + 7 * VARIANTS.index(tuple(run["variant"].split(" / "))) + run["seed"]),
                "--module",
                "fusion.train",
            ]
            if grid.ranks > 1
            else [str(BIN / "fusion-train")]
        )
        cmd = [
            *launch,
            "--config",
            str(ROOT / grid.config),
            *run["overrides"],
            *grid.extra,
            f"data.tokenizer={toy / 'tokenizer.json'}",
            f"data.text={toy / 'text'}",
            f"data.image={toy / 'vqa_image_train'},{toy / 'image'}",
            f"data.video={toy / 'vqa_video_train'},{toy / 'video'}",
            f"data.eval={toy / 'vqa_image_test'}",
            f"data.eval_limit={grid.eval_limit}",
            f"train.steps={run['steps']}",
            f"train.seed={run['seed']}",
            f"train.eval_every={eval_every}",
            "train.resume=none",
            f"run.dir={run_dir}",
        ]
    else:
        cmd = [
            str(BIN / "fusion-train"),
            *run["overrides"],
            *grid.extra,
            f"data.text={toy / 'text'}",
            f"data.image={toy / 'vqa_image_train'},{toy / 'image'}",
            "data.video=",
            "data.weights=[0.1,1.0,0.0]",
            f"data.eval={toy / 'vqa_image_test'}",
            f"data.eval_limit={grid.eval_limit}",
            f"train.steps={run['steps']}",
            f"train.seed={run['seed']}",
            f"train.warmup={max(1, run['steps'] // 10)}",
            "train.lr=3e-3",
            "train.log_every=1",
            f"train.eval_every={eval_every}",
            "train.ckpt_every=0",
            "train.resume=none",
            f"run.dir={run_dir}",
        ]
    if run_dir.exists():  # an unfinished run: start it again from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(work / f"{run['name']}.log", "w") as log:
        r = subprocess.run(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **grid.env}
        )
        if r.returncode == 0 and grid.sets:  # scored as `make demo` scores: fusion-eval, blind too
            r = subprocess.run(
                [
                    str(BIN / "fusion-eval"),
                    "--run",
                    str(run_dir),
                    "--vqa",
                    *[str(toy / name) for name in grid.sets],
                    "--limit",
                    str(grid.eval_limit),
                    "--no-progress",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **grid.env},
            )
    if r.returncode != 0:
        raise RuntimeError(
            f"run {run['name']} failed (exit {r.returncode}); see {work / (run['name'] + '.log')}"
        )
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def collect(run: dict, work: Path) -> dict:
    rows = read_metrics(work / run["name"])
    per_token = run["tokens_per_step"] * run["flops_per_token"]
    loss = [(r["step"] * per_token, r["loss"]) for r in rows if "loss" in r]
    acc = [
        (r["step"] * per_token, r[k], r[k.replace("/acc", "/blind_acc")])
        for r in rows
        for k in r
        if k.startswith("eval/") and k.endswith("/acc") and k.count("/") == 2
    ]
    tail = max(1, len(loss) // 10)
    final_loss = statistics.fmean(v for _, v in loss[-tail:])
    image_loss = [r["loss/image"] for r in rows if "loss/image" in r][-tail:]
    last_acc = acc[-1] if acc else (None, None, None)
    scores = {}  # (set, type) -> (acc, blind) from fusion-eval after training
    for name in run.get("sets", ()):
        path = work / run["name"] / "eval" / f"{name}.json"
        if path.is_file():
            res = json.loads(path.read_text())
            for kind, r in [("overall", res["overall"]), *sorted(res["by_type"].items())]:
                scores[(name, kind)] = (r["acc"], r["blind_acc"])
    if ("vqa_image_test", "overall") in scores:
        last_acc = (None, *scores[("vqa_image_test", "overall")])
    return {
        **run,
        "loss_curve": loss,
        "acc_curve": acc,
        "final_loss": final_loss,
        "final_image_loss": statistics.fmean(image_loss) if image_loss else None,
        "acc": last_acc[1],
        "blind_acc": last_acc[2],
        "scores": scores,
    }


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def by_variant(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["variant"], []).append(r)
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| fusion / FFN | params total | params active | FLOPs / token | steps | training FLOPs | "
        "final loss | final image loss | toy-VQA acc | blind acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, rs in by_variant(results).items():
        r0 = rs[0]
        lines.append(
            f"| {variant} | {r0['params_total'] / 1e3:.0f} K | {r0['params_active'] / 1e3:.0f} K | "
            f"{r0['flops_per_token']:.3g} | {r0['steps']} | {r0['flops']:.3g} | "
            f"{mean_sd([r['final_loss'] for r in rs])} | {mean_sd([r['final_image_loss'] for r in rs])} | "
            f"{mean_sd([r['acc'] for r in rs])} | {mean_sd([r['blind_acc'] for r in rs])} |"
        )
    return "\n".join(lines)


def mean_range(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def type_table(results: list[dict]) -> str:
    """fusion-eval's accuracy per set and question type: mean (min-max over seeds) per model,
    and the blind baseline's mean over every run of every model."""
    variants = by_variant(results)
    keys = []
    for r in results:
        keys += [k for k in r.get("scores", {}) if k not in keys]
    if not keys:
        return ""
    lines = [
        "| set | type | " + " | ".join(variants) + " | blind |",
        "|---|---|" + "---|" * len(variants) + "---|",
    ]
    for name, kind in keys:
        cells = [
            mean_range([r["scores"].get((name, kind), (None, None))[0] for r in rs])
            for rs in variants.values()
        ]
        blind = [r["scores"][(name, kind)][1] for r in results if (name, kind) in r.get("scores", {})]
        label = f"**{kind}**" if kind == "overall" else f"`{kind}`"
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {statistics.fmean(blind):.3f} |")
    return "\n".join(lines)


def contrasts(results: list[dict]) -> list[str]:
    """Differences of final loss between variants, seed-matched, mean ± sd over seeds."""
    final = {(r["variant"], r["seed"]): r["final_loss"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    out = []
    for a, b, what in (
        ("late / moe", "early / moe", "late - early fusion (MoE)"),
        ("late / dense", "early / dense", "late - early fusion (dense)"),
        ("early / dense", "early / moe", "dense - MoE (early fusion)"),
        ("late / dense", "late / moe", "dense - MoE (late fusion)"),
    ):
        diffs = [final[(a, s)] - final[(b, s)] for s in seeds if (a, s) in final and (b, s) in final]
        if diffs:
            out.append(f"- {what}: final training loss {mean_sd(diffs)} ({len(diffs)} seed(s))")
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (variant, rs) in enumerate(by_variant(results).items()):
        color = f"C{i}"
        for j, r in enumerate(rs):
            xs = [x for x, _ in r["loss_curve"]]
            ys = [y for _, y in r["loss_curve"]]
            k = max(1, len(ys) // 15)  # running mean over ~1/15 of the run
            smooth = [statistics.fmean(ys[max(0, n - k + 1) : n + 1]) for n in range(len(ys))]
            ax_l.plot(xs, smooth, color=color, alpha=0.8, label=variant if j == 0 else None)
            if r["acc_curve"]:
                ax_a.plot(
                    [x for x, _, _ in r["acc_curve"]],
                    [a for _, a, _ in r["acc_curve"]],
                    "o-",
                    color=color,
                    alpha=0.8,
                    label=variant if j == 0 else None,
                )
                ax_a.plot(
                    [x for x, _, _ in r["acc_curve"]],
                    [b for _, _, b in r["acc_curve"]],
                    "x:",
                    color=color,
                    alpha=0.5,
                )
    ax_l.set(
        xlabel="training FLOPs (fusion-plan)",
        ylabel="training loss (running mean)",
        title="loss against training FLOPs",
    )
    ax_a.set(
        xlabel="training FLOPs (fusion-plan)",
        ylabel="toy image-VQA accuracy",
        title="accuracy (o) and blind baseline (x)",
    )
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_doc(grid: Grid, results: list[dict], out: Path, png: Path, argv: list[str], seconds: float) -> None:
    kept = ""
    if out.is_file() and MARKER in out.read_text():
        kept = out.read_text().split(MARKER, 1)[1]
    r0 = results[0]
    cmd = "python tools/ablate.py " + " ".join(argv)
    if grid.config:
        setup = f"""Grid `{grid.name}`: the demo's recipe, `{grid.config}` as `make demo` trains it (its model,
vision tower, optimizer, precision, toy world, mixture, learning rate and schedule; {grid.ranks} DeepSpeed CPU ranks, rows of
{grid.seq_len} tokens, {grid.micro_batch} rows per step), seeds {grid.seeds} (`train.seed`: initial
weights and data order). The four models:
"""
        flags = " ".join(f"--{k} {v}" for k, v in grid.toy.items()) or "(default sizes)"
        colours = "" if "extra-colors" in grid.toy else " (without the extra colours of its training scenes)"
        data = f"""Data: `fusion-data toy {flags}`, the sizes of the toy world `make demo` trains
on{colours}, the config's mixture. Accuracy: after training, `fusion-eval` scores each run on
up to {grid.eval_limit} questions of each set (as `make demo` does: all of them), by choice likelihood, beside the blind baseline with grey media;
during training, `vqa_image_test` is scored {grid.evals} times for the curves. "Final loss" is the
mean training loss over the last tenth of the logged steps. Mean ± standard deviation over seeds
in the first table, mean (min-max) in the second."""
    else:
        setup = f"""Grid `{grid.name}`: model.size `{grid.size}` (patch-linear vision, 32 px images as 16 tokens),
`train.seq_len={grid.seq_len}`, `train.micro_batch={grid.micro_batch}`, one process, seeds {grid.seeds}.
The four models:
"""
        data = f"""Data: `fusion-data toy` ({", ".join(f"--{k} {v}" for k, v in grid.toy.items()) or "default sizes"}), mixture weights
text 0.1, image captions + image VQA 1.0. Accuracy: toy image VQA (`vqa_image_test`, the first
{grid.eval_limit} questions) scored by choice likelihood during training, beside the blind baseline
(the same questions with grey images). "Final loss" is the mean training loss over the last tenth of
the steps; "final image loss" the same for rows of image samples. Mean ± standard deviation over seeds."""
    per_type = type_table(results)
    if per_type:
        per_type = (
            "Accuracy per question type (fusion-eval after training; mean, and min-max over seeds):\n\n"
            + per_type
        )
    text = f"""# Ablations: early vs late fusion, MoE vs dense, at equal training FLOPs

Written by `{cmd.strip()}` on {time.strftime("%Y-%m-%d")} ({platform.machine()}, {os.cpu_count()} CPU
cores{", GPU" if grid.name == "gpu" else ""}); {len(results)} runs, {seconds / 60:.1f} min of training and
evaluation in this invocation (reused runs not counted).

## What was run

{setup}
- **early / moe**: the default, image embeddings spliced into the token stream, MoE layers as in the size.
- **early / dense**: `model.dense_baseline=true`, each MoE layer a dense SwiGLU of the same active
  width, (top_k + n_shared) x moe_ffn_dim (the router's gate is the only active weight it lacks).
- **late / moe**, **late / dense**: `model.fusion=late model.xattn_every={grid.xattn_every}`: the decoder reads text
  only and a gated cross-attention block before layers 0, {grid.xattn_every}, ... reads the image embeddings.

Every run gets {grid.budget:.3g} training FLOPs by fusion-plan's count (6 x active matmul parameters +
attention, per token; late fusion's cross-attention included, its tokens all counted as decoder
tokens, an upper bound): steps = budget / (FLOPs per token x {r0["tokens_per_step"]} tokens per step).
{data}

## Results

{table(results)}

{per_type}

![loss and toy-VQA accuracy against training FLOPs]({png.name})

Seed-matched differences:

{chr(10).join(contrasts(results))}

## What this can and cannot show

{caveat(grid)}

{MARKER}"""
    out.write_text(text + kept)


def caveat(grid: Grid) -> str:
    if grid.config:
        return f"""Every model here is the demo's size (about 1.1 M active parameters; late fusion's
cross-attention adds 0.5 M) trained for minutes of CPU on a toy world of coloured shapes,
{len(grid.seeds)} seeds each. Differences of a few hundredths are within seed noise (compare the ranges), and
{grid.eval_limit} questions per image set ({grid.eval_limit // 5} per type) resolve a type to about ±{math.sqrt(0.09 / (grid.eval_limit // 5)):.2f} (one standard error at 0.9). What holds here
is a statement about this budget and this data, not about which design wins at scale."""
    return f"""At this size the grid measures the switches working side by side on one footing: the same data,
evaluation and FLOP accounting, and how the training loss of each model moves per FLOP. It cannot
show which design wins at scale: the models are tiny, runs are tens of steps, the seeds are few,
and toy-VQA accuracy this early sits at the blind baseline for every model (the demo needs well over
600 steps of a bigger model before images help; see docs/demo.md), so accuracy
differences here are noise. The `--gpu` grid (`python tools/ablate.py --gpu`: model.size demo,
{GRIDS["gpu"].budget:.2g} FLOPs per run, 3 seeds, {GRIDS["gpu"].eval_limit}-question evaluations) is the
smallest grid where accuracy can separate from the blind baseline."""


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--gpu", action="store_true", help="the GPU grid (model.size demo, bf16) instead of the CPU one"
    )
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="the grid: cpu (the default; minutes), demo (the demo's recipe on 2 CPU "
        "ranks; about 30 minutes a seed), gpu (same as --gpu)",
    )
    p.add_argument("--work", default=None, help="runs and toy data (default runs/ablate-GRID)")
    p.add_argument(
        "--out",
        default="docs/ablations.md",
        help="the markdown written (default docs/ablations.md; the plot goes beside it as .png)",
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the grid's)")
    p.add_argument("--budget", type=float, default=None, help="training FLOPs per run (default: the grid's)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the runs (steps, FLOPs) and stop (a grid on a config makes its toy world first: "
        "its tokenizer sets the vocabulary)",
    )
    args = p.parse_args(argv)
    grid = GRIDS[args.grid or ("gpu" if args.gpu else "cpu")]
    if args.seeds is not None:
        if args.seeds < 1:
            p.error(f"--seeds must be >= 1, got {args.seeds}")
        grid.seeds = list(range(args.seeds))
    if args.budget is not None:
        if args.budget <= 0:
            p.error(f"--budget must be positive, got {args.budget}")
        grid.budget = args.budget
    sys.path.insert(0, str(ROOT))
    work = Path(args.work or f"runs/ablate-{grid.name}")
    toy, data = None, []
    if grid.config:  # the config's vocabulary is the toy world's tokenizer: make the world first
        toy = make_toy(grid, work)
        data = [f"data.tokenizer={toy / 'tokenizer.json'}"]
    use_config(grid, data)
    runs = sorted(plan_runs(grid, data), key=lambda r: r["seed"])  # every model's first seed first
    for r in runs:
        print(
            f"{r['name']:<18} {r['steps']:>6} steps  {r['flops_per_token']:.3g} FLOPs/token  "
            f"{r['flops']:.3g} FLOPs  {r['params_active'] / 1e6:.3f} M active",
            flush=True,
        )
    if args.dry_run:
        return 0
    work.mkdir(parents=True, exist_ok=True)
    toy = toy or make_toy(grid, work)
    seconds = 0.0
    for r in runs:
        took = train(grid, r, toy, work)
        seconds += took
        print(f"{r['name']}: {'reused' if took == 0 else f'{took:.0f} s'}", flush=True)
    results = [collect(r, work) for r in runs]
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(results, png)
    write_doc(grid, results, out, png, argv, seconds)
    print(table(results))
    print(f"-> {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
