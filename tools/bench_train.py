"""Full training steps of `fusion-train` measured against references trained in the same run.

    python tools/bench_train.py --out runs/bench_train/results.json model.moe.path=fast model.attn_impl=flex
    python tools/bench_train.py --tiny --out runs/bench_train/tiny.json        # CPU smoke run, tiny sizes

Every run is the real `python -m fusion.train` (one process; DeepSpeed, the data loader, the
optimizer, the log) on toy shards built first with `fusion-data toy`; the figures come from its
metrics.jsonl, steps after --warmup only (medians). Extra `key=value` arguments go to every run.

| run            | what                                                                   |
|----------------|------------------------------------------------------------------------|
| moe            | configs/small.yaml (`small`: 16 experts top-1 + 1 shared every 2nd layer), text+image+video mixture |
| dense          | the same with model.moe.n_experts=0 and the dense width that gives equal active parameters |
| text           | moe on text only (data.image, data.video empty), same seq_len and batch: the same decoder tokens |
| moe-unbalanced | moe with model.moe.balance=none: routing left to drift (its max/mean load is reported) |

Figures (ratios inside one run of this tool):
    MFU (decoder FLOPs per token from fusion-plan, x tokens / s, over the GPU's peak; target >= 0.40)
    MoE step / dense step (target <= 1.4)
    mixture step / text step (early-fusion cost) and the vision share 1 - text / mixture
    peak GPU memory / fusion-plan's prediction for the config's ZeRO stage (target within 15%)
    loader: batches / s that `build_batches` produces for the mixture config alone / batches / s
            the moe run consumed (target >= 1.5)
plus the in-run bf16 matmul rate. Timing is never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TARGETS = {"mfu": 0.40, "moe_over_dense": 1.4, "memory_error": 0.15, "loader_over_step": 1.5}
TINY = ["model.size=debug", "model.vision.img_size=32", "model.vision.patch_size=8", "train.seq_len=256",
        "train.micro_batch=2", "train.zero_stage=0", "train.precision=fp32", "data.num_workers=0",
        "data.n_frames=4"]


def make_toy(workdir: Path, tiny: bool) -> Path:
    """Toy shards (text, image, video) for the runs; reused when present."""
    from fusion.data.build import main as fusion_data

    toy = workdir / "toy"
    if (toy / "toy.json").is_file() and (toy / "tokenizer.json").is_file():
        return toy
    n = (200, 200, 40) if tiny else (4000, 4000, 600)
    argv = ["toy", "--output", str(toy), "--n-text", str(n[0]), "--n-image", str(n[1]),
            "--n-video", str(n[2]), "--samples-per-shard", "100", "--n-vqa-train", "0",
            "--n-vqa-test", "0", "--n-vqa-compositional", "0", "--n-video-vqa-train", "0",
            "--n-video-vqa-test", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = fusion_data(argv)
    if rc != 0:
        raise RuntimeError(f"fusion-data toy exited {rc}")
    return toy


def dense_width(cfg) -> int:
    """ffn_dim of an all-dense model with the MoE model's active FFN parameters (multiple of 64)."""
    from fusion.config import moe_layer_ids

    m = cfg.model
    n_moe = len(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts))
    total = (m.n_layers - n_moe) * m.ffn_dim + n_moe * (m.moe.top_k + m.moe.n_shared) * m.moe.moe_ffn_dim
    return max(64, round(total / m.n_layers / 64) * 64)


def train_run(name: str, overrides: list[str], workdir: Path, env: dict) -> dict:
    run_dir = workdir / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "fusion.train", "--config", str(ROOT / "configs" / "small.yaml"),
           *overrides, f"run.dir={run_dir}"]
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = (run_dir.parent / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"run {name} exited {rc}:\n{tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs for `small`; not needed here
    return {"name": name, "command": shlex.join(cmd), "rows": [r for r in rows if "loss" in r],
            "seconds": round(seconds, 1)}


def summarise(run: dict, warmup: int) -> dict:
    rows = [r for r in run["rows"] if r["step"] > warmup]
    if not rows:
        raise RuntimeError(f"run {run['name']}: no logged step after the {warmup} warm-up steps")

    def med(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    mem = [r["mem/peak_gib"] for r in rows if r.get("mem/peak_gib") is not None]
    return {"name": run["name"], "command": run["command"], "steps_measured": len(rows),
            "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"), "max_load": med("router/max_load"),
            "loss_last": rows[-1]["loss"], "peak_gib": max(mem) if mem else None,
            "wall_s": run["seconds"]}


def loader_rate(overrides: list[str], n_batches: int) -> float:
    """Batches per second `build_batches` gives for this config, with nothing else running."""
    from fusion.config import load_config
    from fusion.data.mixing import build_batches
    from fusion.data.tokenizer import build_tokenizer

    cfg = load_config(ROOT / "configs" / "small.yaml", overrides)
    batches = build_batches(cfg, build_tokenizer(cfg.data.tokenizer), rank=0, world=1)
    for _ in range(max(3, n_batches // 4)):  # warm-up: workers start, buffers fill
        next(batches)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches / (time.perf_counter() - t0)


def plan_memory_gib(overrides: list[str]) -> float:
    from fusion.config import load_config
    from fusion.plan import GiB, make_plan

    cfg = load_config(ROOT / "configs" / "small.yaml", overrides)
    plan = make_plan(cfg, world=1)
    stage = cfg.train.zero_stage
    key = "total_ckpt" if cfg.train.activation_checkpointing else "total"
    return plan["memory"]["bytes"][stage][key] / GiB


def table(rep: dict) -> str:
    lines = [f"{'run':<16}{'tokens/s':>12}{'step ms':>10}{'MFU':>7}{'max/mean':>9}{'peak GiB':>10}"
             f"{'plan GiB':>10}{'loss':>8}"]
    lines.append("-" * len(lines[0]))
    for r in rep["runs"]:
        lines.append(f"{r['name']:<16}{r['tokens_per_s']:>12,.0f}{r['step_ms']:>10.1f}"
                     + (f"{r['mfu']:>7.3f}" if r["mfu"] is not None else f"{'-':>7}")
                     + (f"{r['max_load']:>9.2f}" if r["max_load"] is not None else f"{'-':>9}")
                     + (f"{r['peak_gib']:>10.2f}" if r["peak_gib"] is not None else f"{'-':>10}")
                     + f"{r['plan_gib']:>10.2f}{r['loss_last']:>8.3f}")
    lines.append("")
    for f in rep["figures"]:
        tgt = "" if f["target"] is None else f"  target {f['target']}" + ("" if f["met"] else "  missed")
        lines.append(f"{f['what']:<46}{f['value']:>8.3f}{tgt}")
    lines.append(f"\nin-run {rep['matmul']['dtype']} {rep['matmul']['n']}^3 matmul: "
                 f"{rep['matmul']['tflops']:.3g} TFLOP/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="debug-size model on CPU (a smoke run of the tool)")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default 40; --tiny 6)")
    p.add_argument("--warmup", type=int, default=0, help="steps left out of the medians (default 15; --tiny 2)")
    p.add_argument("--runs", default="moe,dense,text,moe-unbalanced", help="comma-separated runs")
    p.add_argument("--loader-batches", type=int, default=0, help="batches timed for the loader (default 60; --tiny 10)")
    p.add_argument("--workdir", default="runs/bench_train", help="toy shards, runs and logs")
    p.add_argument("--out", default=None, help="JSON results (default WORKDIR/results.json)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = p.parse_args(argv)
    steps = args.steps or (6 if args.tiny else 40)
    warmup = args.warmup or (2 if args.tiny else 15)
    if warmup >= steps:
        p.error(f"--warmup {warmup} must be below --steps {steps}")
    known = ("moe", "dense", "text", "moe-unbalanced")
    runs = [r for r in args.runs.split(",") if r]
    if "moe" not in runs or any(r not in known for r in runs):
        p.error(f"--runs: a comma-separated subset of {', '.join(known)} that includes moe")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "results.json"

    import torch

    from bench_moe import machine, matmul_tflops
    from fusion.config import load_config

    cuda = torch.cuda.is_available() and not args.tiny
    started = datetime.datetime.now().astimezone()
    toy = make_toy(workdir, args.tiny)
    data = [f"data.text={toy / 'text'}", f"data.image={toy / 'image'}", f"data.video={toy / 'video'}",
            f"data.tokenizer={toy / 'tokenizer.json'}", "data.eval=", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=1",
            f"train.steps={steps}", f"train.warmup={min(steps, 10)}"]
    common = (TINY if args.tiny else []) + data + list(args.overrides)
    base_cfg = load_config(ROOT / "configs" / "small.yaml", common)
    variants = {
        "moe": [],
        "dense": ["model.moe.n_experts=0", f"model.ffn_dim={dense_width(base_cfg)}"],
        "text": ["data.image=", "data.video=", "data.weights=[1.0,0.0,0.0]"],
        "moe-unbalanced": ["model.moe.balance=none"],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"

    rep = {"command": "python tools/bench_train.py" + "".join(
               " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
           "date": started.isoformat(timespec="seconds"),
           "machine": machine(torch.device("cuda" if cuda else "cpu")),
           "settings": {"steps": steps, "warmup": warmup, "overrides": common,
                        "statistic": "median over steps after warm-up"},
           "matmul": {"n": 8192 if cuda else 512, "dtype": "bfloat16" if cuda else "float32"}}
    dev = torch.device("cuda" if cuda else "cpu")
    rep["matmul"]["tflops"] = matmul_tflops(dev, torch.bfloat16 if cuda else torch.float32, rep["matmul"]["n"])

    from fusion.plan import active_parameters, vocab_of

    results = {}
    for name in runs:
        print(f"run {name} ({steps} steps) ...", flush=True)
        ov = common + variants[name]
        s = summarise(train_run(name, ov, workdir, env), warmup)
        cfg = load_config(ROOT / "configs" / "small.yaml", ov)
        s["active_params"] = sum(v for k, v in active_parameters(cfg.model, vocab_of(cfg)).items() if k != "vision")
        s["tokens_per_step"] = cfg.train.micro_batch * cfg.train.grad_accum * cfg.train.seq_len
        s["step_ms"] = 1e3 * s["tokens_per_step"] / s["tokens_per_s"]
        s["plan_gib"] = plan_memory_gib(ov)
        results[name] = s
        print(f"  {s['tokens_per_s']:,.0f} tokens/s, {s['step_ms']:.1f} ms/step", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)  # partial results, should a later run not finish
        out.write_text(json.dumps({**rep, "partial": True, "runs": list(results.values())}, indent=1) + "\n")

    print("loader alone ...", flush=True)
    loader_bps = loader_rate(common, args.loader_batches or (10 if args.tiny else 60))
    moe = results["moe"]
    figures = []

    def fig(what, value, target=None, met=None):
        if not cuda:  # the targets are for the GPU; a CPU run only shows that the tool works
            target = met = None
        figures.append({"what": what, "value": value, "target": target, "met": met})

    if moe["mfu"] is not None:
        fig("MFU of the MoE step (decoder FLOPs)", moe["mfu"], TARGETS["mfu"], moe["mfu"] >= TARGETS["mfu"])
    if "dense" in results:
        r = moe["step_ms"] / results["dense"]["step_ms"]
        fig("MoE step / dense step (equal active params)", r, TARGETS["moe_over_dense"],
            r <= TARGETS["moe_over_dense"])
    if "text" in results:
        r = moe["step_ms"] / results["text"]["step_ms"]
        fig("mixture step / text-only step", r)
        fig("vision share of the mixture step", 1 - 1 / r)
    for name, s in results.items():
        if s["peak_gib"] is not None:
            err = s["peak_gib"] / s["plan_gib"] - 1
            fig(f"{name}: peak memory / fusion-plan - 1", err, TARGETS["memory_error"],
                abs(err) <= TARGETS["memory_error"])
    step_bps = moe["tokens_per_s"] / moe["tokens_per_step"] * base_cfg.train.grad_accum
    r = loader_bps / step_bps
    fig("loader batches/s / training batches/s", r, TARGETS["loader_over_step"], r >= TARGETS["loader_over_step"])
    rep.update(runs=list(results.values()), loader={"batches_per_s": loader_bps, "step_batches_per_s": step_bps},
               figures=figures, seconds=round((datetime.datetime.now().astimezone() - started).total_seconds(), 1))
    print()
    print(table(rep))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
