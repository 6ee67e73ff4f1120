"""Full training steps of `fusion-train` measured against references trained in the same run.

    python tools/bench_train.py --out runs/bench_train/results.json model.moe.path=fast model.attn_impl=flex
    python tools/bench_train.py --tiny --out runs/bench_train/tiny.json        # CPU smoke run, tiny sizes
    python tools/bench_train.py --vqa --toy data/toy --steps 500 --out runs/bench_train/vqa.json
                                 # configs/small.yaml on the whole toy world, then toy-VQA accuracy

Every run is the real `python -m fusion.train` (one process; DeepSpeed, the data loader, the
optimizer, the log) on toy shards built first with `fusion-data toy`; the figures come from its
metrics.jsonl, steps after --warmup only (medians). Extra `key=value` arguments go to every run.

| run            | what                                                                   |
|----------------|------------------------------------------------------------------------|
| moe            | configs/small.yaml (`small`: 16 experts top-1 + 1 shared every 2nd layer), text+image+video mixture |
| dense          | the same with model.dense_baseline=true: each MoE layer a SwiGLU of (top_k + n_shared) x expert width, equal active FLOPs |
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

--vqa trains configs/small.yaml itself (the toy world's captions and VQA training sets, its own
mixture weights) for --steps steps, or for as many as fit in --fit seconds at the step time of
an earlier results file (--fit-from), evaluates toy VQA at the last step (vqa_image_test,
vqa_video_test, --eval-limit questions per set, blind baseline included) and reports accuracy
beside blind and chance, wall time, tokens/s, MFU and peak memory against fusion-plan. A run of
a few hundred steps is not the config's 3000: the report says how many steps it had.
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
TINY = [
    "model.size=debug",
    "model.vision.img_size=32",
    "model.vision.patch_size=8",
    "train.seq_len=256",
    "train.micro_batch=2",
    "train.zero_stage=0",
    "train.precision=fp32",
    "data.num_workers=0",
    "data.n_frames=4",
]


def make_toy(workdir: Path, tiny: bool, given: str | None = None) -> Path:
    """Toy shards (text, image, video) for the runs: `given` (a `fusion-data toy` output) if set,
    else WORKDIR/toy, built once and reused."""
    from fusion.data.build import main as fusion_data

    if given:
        toy = Path(given).resolve()
        if not ((toy / "toy.json").is_file() and (toy / "tokenizer.json").is_file()):
            raise SystemExit(
                f"bench_train: --toy {given}: no toy world there (make one with fusion-data toy)"
            )
        return toy
    toy = workdir / "toy"
    if (toy / "toy.json").is_file() and (toy / "tokenizer.json").is_file():
        return toy
    n = (200, 200, 40) if tiny else (4000, 4000, 600)
    argv = [
        "toy",
        "--output",
        str(toy),
        "--n-text",
        str(n[0]),
        "--n-image",
        str(n[1]),
        "--n-video",
        str(n[2]),
        "--samples-per-shard",
        "100",
        "--n-vqa-train",
        "0",
        "--n-vqa-test",
        "0",
        "--n-vqa-compositional",
        "0",
        "--n-video-vqa-train",
        "0",
        "--n-video-vqa-test",
        "0",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = fusion_data(argv)
    if rc != 0:
        raise RuntimeError(f"fusion-data toy exited {rc}")
    return toy


def train_run(name: str, overrides: list[str], workdir: Path, env: dict) -> dict:
    run_dir = workdir / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "fusion.train",
        "--config",
        str(ROOT / "configs" / "small.yaml"),
        *overrides,
        f"run.dir={run_dir}",
    ]
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
    return {
        "name": name,
        "command": shlex.join(cmd),
        "rows": [r for r in rows if "loss" in r],
        "seconds": round(seconds, 1),
    }


def summarise(run: dict, warmup: int) -> dict:
    rows = [r for r in run["rows"] if r["step"] > warmup]
    if not rows:
        raise RuntimeError(f"run {run['name']}: no logged step after the {warmup} warm-up steps")

    def med(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    mem = [r["mem/peak_gib"] for r in rows if r.get("mem/peak_gib") is not None]
    return {
        "name": run["name"],
        "command": run["command"],
        "steps_measured": len(rows),
        "tokens_per_s": med("tokens_per_s"),
        "mfu": med("mfu"),
        "max_load": med("router/max_load"),
        "loss_last": rows[-1]["loss"],
        "peak_gib": max(mem) if mem else None,
        "wall_s": run["seconds"],
    }


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
    return n_batches / (time.perf_counter() - t0)  # `batches` goes, and its DataLoader workers with it


def plan_memory_gib(overrides: list[str]) -> float:
    from fusion.config import load_config
    from fusion.plan import GiB, make_plan

    cfg = load_config(ROOT / "configs" / "small.yaml", overrides)
    plan = make_plan(cfg, world=1)
    stage = cfg.train.zero_stage
    key = "total_ckpt" if cfg.train.activation_checkpointing else "total"
    return plan["memory"]["bytes"][stage][key] / GiB


def table(rep: dict) -> str:
    lines = [
        f"{'run':<16}{'tokens/s':>12}{'step ms':>10}{'MFU':>7}{'max/mean':>9}{'peak GiB':>10}"
        f"{'plan GiB':>10}{'loss':>8}"
    ]
    lines.append("-" * len(lines[0]))
    for r in rep["runs"]:
        lines.append(
            f"{r['name']:<16}{r['tokens_per_s']:>12,.0f}{r['step_ms']:>10.1f}"
            + (f"{r['mfu']:>7.3f}" if r["mfu"] is not None else f"{'-':>7}")
            + (f"{r['max_load']:>9.2f}" if r["max_load"] is not None else f"{'-':>9}")
            + (f"{r['peak_gib']:>10.2f}" if r["peak_gib"] is not None else f"{'-':>10}")
            + f"{r['plan_gib']:>10.2f}{r['loss_last']:>8.3f}"
        )
    lines.append("")
    for f in rep["figures"]:
        tgt = "" if f["target"] is None else f"  target {f['target']}" + ("" if f["met"] else "  missed")
        lines.append(f"{f['what']:<46}{f['value']:>8.3f}{tgt}")
    lines.append(
        f"\nin-run {rep['matmul']['dtype']} {rep['matmul']['n']}^3 matmul: "
        f"{rep['matmul']['tflops']:.3g} TFLOP/s"
    )
    return "\n".join(lines)


def fit_steps(seconds: float, results: str | None) -> tuple[int | None, str]:
    """Steps of the moe run's median step time that fit in `seconds` (multiple of 10, 10..3000)."""
    try:
        runs = json.loads(Path(results).read_text())["runs"]
        step_ms = next(r["step_ms"] for r in runs if r["name"] == "moe")
    except (OSError, TypeError, ValueError, KeyError, StopIteration) as e:
        return None, f"no moe step time in {results!r} ({type(e).__name__})"
    n = int(seconds * 1e3 / step_ms) // 10 * 10
    return max(10, min(3000, n)), f"{seconds:g} s at {step_ms:.1f} ms/step (moe run of {results})"


def vqa_main(args, p, argv) -> int:
    """configs/small.yaml on the whole toy world for a given (or fitted) number of steps, then the
    in-training toy-VQA evaluation at the last step."""
    if not args.toy:
        p.error("--vqa needs --toy DIR, a `fusion-data toy` output with its VQA sets")
    import torch
    from bench_moe import machine

    from fusion.config import load_config

    default = 20 if args.tiny else 300
    steps, how = args.steps, "--steps"
    if not steps and args.fit:
        steps, how = fit_steps(args.fit, args.fit_from)
        if steps is None:
            print(f"bench_train --vqa: {how}; using {default} steps", flush=True)
            steps, how = default, f"default ({how})"
    steps = steps or default
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "vqa.json"
    toy = make_toy(workdir, args.tiny, args.toy)
    sets = ["vqa_image_test", "vqa_video_test"]
    missing = [
        d for d in ["vqa_image_train", "vqa_video_train", *sets] if not (toy / d / "index.json").is_file()
    ]
    if missing:
        p.error(f"--toy {args.toy}: no {', '.join(missing)} there (fusion-data toy writes them)")
    cuda = torch.cuda.is_available() and not args.tiny
    base = load_config(ROOT / "configs" / "small.yaml", [])
    log_every = max(1, min(10, steps // 10))
    data = [
        f"data.tokenizer={toy / 'tokenizer.json'}",
        f"data.text={toy / 'text'}",
        f"data.image={toy / 'vqa_image_train'},{toy / 'image'}",
        f"data.video={toy / 'vqa_video_train'},{toy / 'video'}",
        "data.eval=" + ",".join(str(toy / s) for s in sets),
        f"data.eval_limit={args.eval_limit}",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        "train.ckpt_every=0",
        f"train.log_every={log_every}",
    ]
    if steps < 4 * base.train.warmup:  # a short run keeps a warm-up of at most a quarter of it
        data.append(f"train.warmup={max(1, steps // 4)}")
    overrides = (TINY if args.tiny else []) + data + list(args.overrides)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    started = datetime.datetime.now().astimezone()
    rep = {
        "command": "python tools/bench_train.py"
        + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(torch.device("cuda" if cuda else "cpu")),
        "config": "configs/small.yaml",
        "config_steps": base.train.steps,
        "steps": steps,
        "steps_from": how,
        "overrides": overrides,
    }
    print(f"run vqa: configs/small.yaml for {steps} steps ({how}) ...", flush=True)
    run = train_run("vqa", overrides, workdir, env)
    warm = min(args.warmup or 15, steps // 2)
    s = summarise(run, warm)
    cfg = load_config(ROOT / "configs" / "small.yaml", overrides)
    s["tokens_per_step"] = cfg.train.micro_batch * cfg.train.grad_accum * cfg.train.seq_len
    s["step_ms"] = 1e3 * s["tokens_per_step"] / s["tokens_per_s"] if s["tokens_per_s"] else None
    s["plan_gib"] = plan_memory_gib(overrides)
    evals = {}
    for name in sets:
        f = workdir / "runs" / "vqa" / "eval" / f"{name}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            evals[name] = {"overall": r["overall"], "by_type": r["by_type"]}
    rep.update(
        run=s,
        eval=evals,
        losses=[{"step": r["step"], "loss": r["loss"]} for r in run["rows"]],
        seconds=round((datetime.datetime.now().astimezone() - started).total_seconds(), 1),
    )
    lines = [
        f"configs/small.yaml, {steps} steps of the config's {base.train.steps} ({how}); "
        f"wall {s['wall_s']:.0f} s for the whole process (start, training, evaluation, checkpoint)",
        f"tokens/s {s['tokens_per_s']:,.0f}, step {s['step_ms']:.1f} ms, MFU "
        + (f"{s['mfu']:.3f}" if s["mfu"] is not None else "-")
        + ", peak "
        + (f"{s['peak_gib']:.2f}" if s["peak_gib"] is not None else "-")
        + f" GiB (fusion-plan {s['plan_gib']:.2f} GiB), last loss {s['loss_last']:.3f}",
        "",
        f"{'set / type':<28}{'n':>6}{'acc':>8}{'blind':>8}{'chance':>8}",
    ]
    for name, r in evals.items():
        for t, v in [("overall", r["overall"]), *sorted(r["by_type"].items())]:
            blind = "-" if v.get("blind_acc") is None else f"{v['blind_acc']:.3f}"
            lines.append(
                f"{(name if t == 'overall' else '  ' + t):<28}{v['n']:>6}{v['acc']:>8.3f}"
                f"{blind:>8}{v['chance']:>8.3f}"
            )
    if not evals:
        lines.append("(no evaluation files: see the run's log)")
    print()
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"results: {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="debug-size model on CPU (a smoke run of the tool)")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default 40; --tiny 6)")
    p.add_argument(
        "--warmup", type=int, default=0, help="steps left out of the medians (default 15; --tiny 2)"
    )
    p.add_argument("--runs", default="moe,dense,text,moe-unbalanced", help="comma-separated runs")
    p.add_argument(
        "--loader-batches", type=int, default=0, help="batches timed for the loader (default 60; --tiny 10)"
    )
    p.add_argument("--workdir", default="runs/bench_train", help="toy shards, runs and logs")
    p.add_argument("--out", default=None, help="JSON results (default WORKDIR/results.json)")
    p.add_argument(
        "--toy",
        default=None,
        metavar="DIR",
        help="an existing `fusion-data toy` output (default: build one in WORKDIR/toy; --vqa needs it)",
    )
    p.add_argument(
        "--vqa",
        action="store_true",
        help="train configs/small.yaml on the toy world and report toy-VQA accuracy (see above)",
    )
    p.add_argument(
        "--fit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="--vqa: as many steps as fit in SECONDS at the moe step time in --fit-from",
    )
    p.add_argument(
        "--fit-from", default=None, metavar="JSON", help="--vqa: results of an earlier run of this tool"
    )
    p.add_argument(
        "--eval-limit", type=int, default=300, help="--vqa: questions per evaluation set (0 = all)"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = p.parse_args(argv)
    if args.vqa:
        return vqa_main(args, p, argv)
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
    toy = make_toy(workdir, args.tiny, args.toy)
    data = [
        f"data.text={toy / 'text'}",
        f"data.image={toy / 'image'}",
        f"data.video={toy / 'video'}",
        f"data.tokenizer={toy / 'tokenizer.json'}",
        "data.eval=",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.log_every=1",
        f"train.steps={steps}",
        f"train.warmup={min(steps, 10)}",
    ]
    common = (TINY if args.tiny else []) + data + list(args.overrides)
    base_cfg = load_config(ROOT / "configs" / "small.yaml", common)
    variants = {
        "moe": [],
        "dense": ["model.dense_baseline=true"],
        "text": ["data.image=", "data.video=", "data.weights=[1.0,0.0,0.0]"],
        "moe-unbalanced": ["model.moe.balance=none"],
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"

    rep = {
        "command": "python tools/bench_train.py"
        + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(torch.device("cuda" if cuda else "cpu")),
        "settings": {
            "steps": steps,
            "warmup": warmup,
            "overrides": common,
            "statistic": "median over steps after warm-up",
        },
        "matmul": {"n": 8192 if cuda else 512, "dtype": "bfloat16" if cuda else "float32"},
    }
    dev = torch.device("cuda" if cuda else "cpu")
    rep["matmul"]["tflops"] = matmul_tflops(
        dev, torch.bfloat16 if cuda else torch.float32, rep["matmul"]["n"]
    )

    from fusion.plan import active_parameters, vocab_of

    results: dict = {}

    def figures(loader_bps: float | None) -> list[dict]:
        """The ratios of the runs so far (and of the loader, when measured)."""
        moe, out_figs = results["moe"], []

        def fig(what, value, target=None, met=None):
            if not cuda:  # the targets are for the GPU; a CPU run only shows that the tool works
                target = met = None
            out_figs.append({"what": what, "value": value, "target": target, "met": met})

        if moe["mfu"] is not None:
            fig(
                "MFU of the MoE step (decoder FLOPs)",
                moe["mfu"],
                TARGETS["mfu"],
                moe["mfu"] >= TARGETS["mfu"],
            )
        if "dense" in results:
            r = moe["step_ms"] / results["dense"]["step_ms"]
            fig(
                "MoE step / dense step (model.dense_baseline)",
                r,
                TARGETS["moe_over_dense"],
                r <= TARGETS["moe_over_dense"],
            )
        if "text" in results:
            r = moe["step_ms"] / results["text"]["step_ms"]
            fig("mixture step / text-only step", r)
            fig("vision share of the mixture step", 1 - 1 / r)
        for name, s in results.items():
            if s["peak_gib"] is not None:
                err = s["peak_gib"] / s["plan_gib"] - 1
                fig(
                    f"{name}: peak memory / fusion-plan - 1",
                    err,
                    TARGETS["memory_error"],
                    abs(err) <= TARGETS["memory_error"],
                )
        if loader_bps is not None:
            r = loader_bps / step_batches_per_s()
            fig(
                "loader batches/s / training batches/s",
                r,
                TARGETS["loader_over_step"],
                r >= TARGETS["loader_over_step"],
            )
        return out_figs

    def step_batches_per_s() -> float:
        moe = results["moe"]
        return moe["tokens_per_s"] / moe["tokens_per_step"] * base_cfg.train.grad_accum

    # the loader first: every partial result below then has all its figures
    print("loader alone ...", flush=True)
    loader_bps = loader_rate(common, args.loader_batches or (10 if args.tiny else 60))
    print(f"  {loader_bps:,.1f} batches/s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in runs:
        print(f"run {name} ({steps} steps) ...", flush=True)
        ov = common + variants[name]
        s = summarise(train_run(name, ov, workdir, env), warmup)
        cfg = load_config(ROOT / "configs" / "small.yaml", ov)
        s["active_params"] = sum(
            v for k, v in active_parameters(cfg.model, vocab_of(cfg)).items() if k != "vision"
        )
        s["tokens_per_step"] = cfg.train.micro_batch * cfg.train.grad_accum * cfg.train.seq_len
        s["step_ms"] = 1e3 * s["tokens_per_step"] / s["tokens_per_s"]
        s["plan_gib"] = plan_memory_gib(ov)
        results[name] = s
        print(f"  {s['tokens_per_s']:,.0f} tokens/s, {s['step_ms']:.1f} ms/step", flush=True)
        # what is measured so far, should a time limit stop a later run
        out.write_text(
            json.dumps(
                {**rep, "partial": True, "runs": list(results.values()), "figures": figures(loader_bps)},
                indent=1,
            )
            + "\n"
        )

    rep.update(
        runs=list(results.values()),
        loader={"batches_per_s": loader_bps, "step_batches_per_s": step_batches_per_s()},
        figures=figures(loader_bps),
        seconds=round((datetime.datetime.now().astimezone() - started).total_seconds(), 1),
    )
    print()
    print(table(rep))
    out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
