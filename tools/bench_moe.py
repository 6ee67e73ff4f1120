"""MoE layer forward + backward against a dense SwiGLU FFN of equal active FLOPs, measured in one run.

    python tools/bench_moe.py --out runs/bench_moe/results.json          # GPU, bf16, the shapes below
    python tools/bench_moe.py --tiny --out runs/bench_moe/tiny.json      # CPU smoke run, fp32, tiny shapes

Shapes:
    coarse  16k tokens, dim 2048, 16 experts of width 4096, top-1 + 1 shared expert
    fine    16k tokens, dim 2048, 128 experts of width 1024, top-4, no shared expert

Subjects, each fwd + bwd of one layer on the same input and output gradient (the router z-loss
included for the MoE layers):
    dense     the reference: FeedForward(dim, (top_k + n_shared) * width), same active matmul FLOPs
    fast      MoE, model.moe.path=fast (fusion/model/moe/fast.py); on CUDA the shared expert overlaps
    fast-seq  the same without the shared-expert stream overlap (CUDA only, where there is a shared expert)
    grouped   MoE, model.moe.path=grouped (sort + _grouped_mm, host syncs)
    loop      MoE, model.moe.path=loop (the per-expert reference loop)
    floor     the three grouped matmuls alone on an aligned buffer of balanced groups (what
              routing, permutation and combine add on top of is fast - floor)

Routing: "uniform" (random router, loads near balanced) and "skewed" (a fixed router bias, as the
aux-loss-free balancer would hold, that sends the hottest expert several times its share; the
measured max/mean load is reported). Times are medians of --repeats timed runs, subjects
interleaved so that they see the same clocks; each figure is a ratio to `dense` from the same run.
The in-run bf16 (CPU: fp32) matmul rate is reported beside them. Timing is never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion.config import MoEConfig  # noqa: E402
from fusion.model.ffn import FeedForward  # noqa: E402
from fusion.model.moe import MoE  # noqa: E402
from fusion.model.moe import fast as grouped  # noqa: E402

SHAPES = {
    "coarse": dict(tokens=16384, dim=2048, width=4096, n_experts=16, top_k=1, n_shared=1),
    "fine": dict(tokens=16384, dim=2048, width=1024, n_experts=128, top_k=4, n_shared=0),
}
TINY = {
    "coarse": dict(tokens=1024, dim=128, width=256, n_experts=16, top_k=1, n_shared=1),
    "fine": dict(tokens=1024, dim=128, width=64, n_experts=64, top_k=4, n_shared=0),
}
TARGETS = {"coarse": 1.3, "fine": 1.8}  # fast / dense on an H100/H200 (docs/benchmarks.md)
# skewed routing: a router bias from 2 logit standard deviations (expert 0) down to 0 (the last);
# the hottest expert then gets about 3-4x the mean load
SKEW = 2.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    s = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / s / 1e12


class Subject:
    """One layer, its input and output gradient; `step()` runs forward + backward."""

    def __init__(self, name: str, module, x: torch.Tensor, grad: torch.Tensor, moe: bool):
        self.name, self.module, self.moe = name, module, moe
        self.x = x.detach().clone().requires_grad_(True)
        self.grad = grad

    def step(self) -> None:
        for p in self.module.parameters():
            p.grad = None
        self.x.grad = None
        if self.moe:
            y, _, z = self.module(self.x)
            torch.autograd.backward((y, z), (self.grad, torch.ones_like(z)))
        else:
            self.module(self.x).backward(self.grad)


class Floor:
    """The expert matmuls alone: an aligned buffer with balanced groups through `run_buffer`."""

    def __init__(self, experts, tokens: int, top_k: int, dim: int, device, dtype):
        E = experts.w1.shape[0]
        expert = torch.arange(tokens * top_k, device=device) % E
        self.layout = grouped.layout_pairs(expert, None, E)
        self.buf = torch.randn(self.layout.rows, dim, device=device, dtype=dtype, requires_grad=True)
        self.grad = torch.randn(self.layout.rows, dim, device=device, dtype=dtype)
        self.experts, self.name = experts, "floor"

    def step(self) -> None:
        for p in self.experts.parameters():
            p.grad = None
        self.buf.grad = None
        grouped.run_buffer(self.experts, self.buf, self.layout.offs).backward(self.grad)


def build(shape: dict, routing: str, device, dtype, subjects: list[str]) -> tuple[list, float]:
    torch.manual_seed(0)
    D, H, E, K, S, N = (shape[k] for k in ("dim", "width", "n_experts", "top_k", "n_shared", "tokens"))
    x = torch.randn(1, N, D, device=device, dtype=dtype)
    grad = torch.randn(1, N, D, device=device, dtype=dtype)
    cfg = MoEConfig(
        n_experts=E,
        top_k=K,
        n_shared=S,
        moe_ffn_dim=H,
        score="sigmoid",
        gate_on="input",
        balance="bias",
        z_coef=1e-3,
        path="fast",
    )
    with device:  # parameters made and initialised on the device: seconds less per layer on a GPU
        base = MoE(D, cfg).to(dtype=dtype)
    if routing == "skewed":
        with torch.no_grad():
            spread = base.router(x.reshape(N, D))[2].std()  # logits' spread: the skew in its units
            base.router.expert_bias.copy_(SKEW * spread * torch.linspace(1.0, 0.0, E, device=device))
    with torch.no_grad():
        idx, _, _ = base.router(x.reshape(N, D))
        load = torch.bincount(idx.reshape(-1), minlength=E).double()
    max_over_mean = float(load.max() / load.mean())
    out = []
    for name in subjects:
        if name == "dense":
            with device:
                ffn = FeedForward(D, (K + S) * H).to(dtype=dtype)
            for lin in (ffn.w1, ffn.w2, ffn.w3):
                torch.nn.init.normal_(lin.weight, std=0.02)
            out.append(Subject(name, ffn, x, grad, moe=False))
        elif name == "floor":
            out.append(Floor(base.experts, N, K, D, device, dtype))
        else:
            path = "fast" if name.startswith("fast") else name
            with device:
                moe = MoE(D, MoEConfig(**{**cfg.__dict__, "path": path})).to(dtype=dtype)
            moe.load_state_dict(base.state_dict())
            moe.router.expert_bias.copy_(base.router.expert_bias)
            moe.overlap_shared = name != "fast-seq"
            moe.train()
            out.append(Subject(name, moe, x, grad, moe=True))
    return out, max_over_mean


def measure(subjects: list, device, warmup: int, repeats: int) -> dict[str, dict]:
    for s in subjects:
        for _ in range(warmup):
            s.step()
    times: dict[str, list[float]] = {s.name: [] for s in subjects}
    for _ in range(repeats):
        for s in subjects:  # interleaved: every subject sees the same clocks and temperature
            times[s.name].append(timed(s.step, device))
    peaks = {}
    if device.type == "cuda":
        for s in subjects:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            s.step()
            sync(device)
            peaks[s.name] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return {
        name: {
            "ms": 1e3 * statistics.median(t),
            "runs_ms": [round(1e3 * v, 3) for v in t],
            "peak_step_gib": peaks.get(name),
        }
        for name, t in times.items()
    }


def machine(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        import os

        info.update(cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    return info


def table(report: dict) -> str:
    lines = [
        f"{'shape':<8}{'routing':<9}{'max/mean':>9}  {'subject':<10}{'ms':>10}{'x dense':>9}"
        f"{'x loop':>8}{'TFLOP/s':>9}{'peak GiB':>10}  target"
    ]
    lines.append("-" * len(lines[0]))
    for r in report["results"]:
        tgt = ""
        if r["subject"] == "fast" and r["target"] is not None:
            tgt = f"<= {r['target']}" + ("" if r["met"] else "  missed")
        lines.append(
            f"{r['shape']:<8}{r['routing']:<9}{r['max_over_mean']:>9.2f}  {r['subject']:<10}"
            f"{r['ms']:>10.3f}{r['x_dense']:>9.2f}"
            + (f"{r['x_loop']:>8.2f}" if r.get("x_loop") is not None else f"{'':>8}")
            + f"{r['tflops']:>9.{1 if r['tflops'] >= 10 else 3}f}"
            + (f"{r['peak_step_gib']:>10.2f}" if r["peak_step_gib"] is not None else f"{'':>10}")
            + f"  {tgt}"
        )
    lines.append(
        f"\nin-run {report['matmul']['dtype']} {report['matmul']['n']}^3 matmul: "
        f"{report['matmul']['tflops']:.3g} TFLOP/s"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run), fp32 off CUDA")
    p.add_argument("--shapes", default="coarse,fine", help="comma-separated: coarse, fine (default both)")
    p.add_argument("--routing", default="uniform,skewed", help="comma-separated: uniform, skewed")
    p.add_argument(
        "--subjects",
        default="dense,fast,fast-seq,grouped,loop,floor",
        help="comma-separated subjects (default all; dense is always measured)",
    )
    p.add_argument("--tokens", type=int, default=0, help="tokens per layer call (default: the shape's)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each subject (median kept)")
    p.add_argument("--out", default="runs/bench_moe/results.json", help="JSON results")
    args = p.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY if args.tiny else SHAPES
    wanted = [s for s in args.shapes.split(",") if s]
    for s in wanted:
        if s not in shapes:
            p.error(f"--shapes: unknown shape '{s}' (known: {', '.join(shapes)})")
    routings = [r for r in args.routing.split(",") if r]
    if any(r not in ("uniform", "skewed") for r in routings):
        p.error("--routing: give uniform and/or skewed")
    subjects = ["dense"] + [s for s in args.subjects.split(",") if s and s != "dense"]
    known = {"fast", "fast-seq", "grouped", "loop", "floor"}
    if any(s not in known for s in subjects[1:]):
        p.error(f"--subjects: known subjects are dense, {', '.join(sorted(known))}")
    if device.type != "cuda":
        subjects = [s for s in subjects if s != "fast-seq"]  # the overlap exists on CUDA only

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    mm_n = 8192 if device.type == "cuda" else 512
    report = {
        "command": "python tools/bench_moe.py"
        + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(device),
        "dtype": str(dtype).replace("torch.", ""),
        "statistic": f"median of {args.repeats}",
        "matmul": {
            "n": mm_n,
            "dtype": str(dtype).replace("torch.", ""),
            "tflops": matmul_tflops(device, dtype, mm_n),
        },
        "results": [],
    }
    for shape_name in wanted:
        shape = dict(shapes[shape_name])
        if args.tokens:
            shape["tokens"] = args.tokens
        active = 3 * shape["dim"] * shape["width"] * (shape["top_k"] + shape["n_shared"])
        flops = 6 * shape["tokens"] * active  # fwd + bwd matmul FLOPs of the active experts
        for routing in routings:
            subs = [s for s in subjects if not (s == "fast-seq" and shape["n_shared"] == 0)]
            built, mom = build(shape, routing, device, dtype, subs)
            print(f"{shape_name} / {routing}: {', '.join(subs)} ...", flush=True)
            res = measure(built, device, args.warmup, args.repeats)
            dense, loop = res["dense"]["ms"], res.get("loop", {}).get("ms")
            for name, r in res.items():
                fast = name == "fast"
                report["results"].append(
                    {
                        "shape": shape_name,
                        "routing": routing,
                        "subject": name,
                        **shape,
                        "max_over_mean": mom,
                        "ms": r["ms"],
                        "runs_ms": r["runs_ms"],
                        "x_dense": r["ms"] / dense,
                        "x_loop": r["ms"] / loop if loop else None,
                        "tflops": flops / (r["ms"] / 1e3) / 1e12,
                        "peak_step_gib": r["peak_step_gib"],
                        "target": TARGETS[shape_name]
                        if fast and device.type == "cuda" and not args.tiny
                        else None,
                        "met": (r["ms"] / dense <= TARGETS[shape_name]) if fast else None,
                    }
                )
            del built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # what is measured so far, should a time limit stop the run before the next shape
            out.write_text(json.dumps({**report, "partial": True}, indent=1) + "\n")
    report["seconds"] = round((datetime.datetime.now().astimezone() - started).total_seconds(), 1)
    print()
    print(table(report))
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
