"""Where a training step's time goes: data loading, forward, backward, the gradient all-reduce,
the optimizer, and what is left (Python and bookkeeping), measured inside the real training loop.

    DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$PWD/.venv/torch_extensions \\
        .venv/bin/deepspeed --num_gpus 2 tools/profile_step.py --steps 40 [key=value ...]

It runs `fusion.train` itself (the same config, loader, DeepSpeed engine and step) for
`--warmup + --steps` steps into a throw-away run directory (`--run-dir`), with timers wrapped around the pieces
of a step: the loader's `next()` and the host-to-device copy (data), the engine's forward,
its backward, every collective (`torch.distributed` all_reduce / all_gather / all_to_all / barrier:
DeepSpeed's gradient all-reduce, the expert gradients, the routers' loads, the non-finite flag),
DeepSpeed's and the experts' optimizer steps. Each phase's time excludes the phases nested in
it (the all-reduce inside DeepSpeed's backward counts as all-reduce, not backward). A collective's
time includes waiting for the slower rank, so the table also gives each rank's compute time.
Inside the forward it separates the vision tower, attention, FFN / MoE layers and the rest
(embeddings, output head, loss) by module hooks. Only the last `--steps` steps are measured; all
figures are shares of those steps' wall time on one run, so they compare across loads of the
machine better than absolute times do; each rank's CPU time per step (its own process time) is
printed too, the figure least moved by other programs on a shared machine.

`--ops N` also runs PyTorch's profiler over the measured steps on rank 0 and prints the N ops with
the most self time and the share of the step spent outside any op (Python, the dispatcher, the
loop); the profiler adds its own per-op cost, so that share is an upper bound.
Runs on one process too (`python tools/profile_step.py ...`: world of one, no all-reduce).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("data", "forward", "backward", "all-reduce", "optimizer")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all_single",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
)


class PhaseClock:
    """Exclusive wall time per phase: a phase entered inside another is subtracted from it."""

    def __init__(self):
        self.on = False
        self.total = defaultdict(float)
        self.stack: list[list] = []  # [name, start, time of children]

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.on:
            yield
            return
        frame = [name, time.perf_counter(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            spent = time.perf_counter() - frame[1]
            self.total[name] += spent - frame[2]
            if self.stack:
                self.stack[-1][2] += spent


def wrap(owner, attr: str, clock: PhaseClock, name: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        with clock.phase(name):
            return fn(*args, **kwargs)

    setattr(owner, attr, timed)


def module_timers(model, clock: PhaseClock) -> None:
    """Forward-hook timers on every attention and every FFN / MoE module (nested in `forward`,
    so their time is taken out of it); the vision tower's encode calls are wrapped in main."""

    def hook(name):
        def pre(mod, args):
            if clock.on:
                clock.stack.append([name, time.perf_counter(), 0.0])

        def post(mod, args, out):
            if clock.on and clock.stack and clock.stack[-1][0] == name:
                frame = clock.stack.pop()
                spent = time.perf_counter() - frame[1]
                clock.total[name] += spent - frame[2]
                if clock.stack:
                    clock.stack[-1][2] += spent

        return pre, post

    targets = []
    for block in model.decoder.layers:
        targets.append(("forward: attention", block.attn))
        targets.append(("forward: ffn / moe", block.moe if block.moe is not None else block.ffn))
    if getattr(model, "late", None) is not None:
        targets.append(("forward: cross-attention", model.late))
    for name, mod in targets:
        pre, post = hook(name)
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="configs/demo.yaml", help="the run's config (default configs/demo.yaml)"
    )
    p.add_argument("--steps", type=int, default=40, help="measured steps (default 40)")
    p.add_argument("--warmup", type=int, default=10, help="steps before measuring (default 10)")
    p.add_argument(
        "--ops",
        type=int,
        default=0,
        metavar="N",
        help="also profile ops on rank 0 and print the N with the most self time",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--run-dir",
        default="runs/profile_step",
        help="the throw-away run directory, deleted at the end (default runs/profile_step)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)

    import deepspeed
    import torch
    import torch.distributed as tdist

    import fusion.step as S
    import fusion.train as T
    from fusion.config import load_config
    from fusion.data.mixing import Batches
    from fusion.model.vision import VisionTower
    from fusion.parallel import ExpertParallel

    clock = PhaseClock()
    wrap(Batches, "__next__", clock, "data")
    wrap(S, "to_device", clock, "data")
    for attr in COLLECTIVES:
        if hasattr(tdist, attr):
            wrap(tdist, attr, clock, "all-reduce")
    engine_cls = deepspeed.runtime.engine.DeepSpeedEngine
    wrap(engine_cls, "forward", clock, "forward")
    wrap(engine_cls, "backward", clock, "backward")
    wrap(engine_cls, "step", clock, "optimizer")
    wrap(ExpertParallel, "step", clock, "optimizer")
    wrap(VisionTower, "encode_images", clock, "forward: vision")
    wrap(VisionTower, "encode_videos", clock, "forward: vision")

    first = args.warmup
    last = args.warmup + args.steps
    state = {"t0": None, "t1": None, "prof": None, "hooked": False, "tokens": 0.0, "loss": 0.0, "slots": 0}
    original_step = T.train_step

    def train_step(parts, batches, step):
        if not state["hooked"]:
            module_timers(parts.model, clock)
            state["hooked"] = True
        if step == first:
            tdist.barrier() if tdist.is_initialized() else None
            clock.on = True
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()
            if args.ops and int(os.environ.get("RANK", 0)) == 0:
                from torch.profiler import ProfilerActivity, profile

                state["prof"] = profile(activities=[ProfilerActivity.CPU])
                state["prof"].__enter__()
        stats = original_step(parts, batches, step)
        if first <= step < last:  # this rank's rows: real tokens and loss-bearing positions
            t = parts.cfg.train
            state["tokens"] += float(stats.tokens.sum())
            state["loss"] += float(stats.loss_count.sum())
            state["slots"] += t.micro_batch * t.grad_accum * t.seq_len
        if step == last - 1:
            clock.on = False
            state["t1"], state["c1"] = time.perf_counter(), time.process_time()
            if state["prof"] is not None:
                state["prof"].__exit__(None, None, None)
        return stats

    T.train_step = train_step
    run_dir = args.run_dir  # the same on every rank: they write one checkpoint there at the end
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"train.steps={last}",
            "train.ckpt_every=0",
            "train.eval_every=0",
            "train.resume=none",
            f"run.dir={run_dir}",
            f"train.log_every={last}",
        ],
    )
    T.train(cfg)

    import fusion.dist as fdist

    rank, world = fdist.rank(), fdist.world()
    wall = state["t1"] - state["t0"]
    shares = dict(clock.total)
    compute = sum(v for k, v in shares.items() if k not in ("data", "all-reduce"))
    cpu = state["c1"] - state["c0"]  # this process's CPU time: what other programs' load hides less
    mine = torch.tensor(
        [wall, compute, shares.get("all-reduce", 0.0), shares.get("data", 0.0), cpu], dtype=torch.float64
    )
    gathered = [mine.clone() for _ in range(world)]
    if world > 1:
        tdist.all_gather(gathered, mine)
    if rank == 0:
        phases = [
            "data",
            "forward",
            "forward: vision",
            "forward: attention",
            "forward: ffn / moe",
            "forward: cross-attention",
            "backward",
            "all-reduce",
            "optimizer",
        ]
        accounted = sum(shares.values())
        rows = [(k, shares[k]) for k in phases if k in shares]
        rows.append(("other (loop, stats, Python between phases)", wall - accounted))
        print(
            f"\n{args.steps} steps after {args.warmup} warm-up steps, world {world}, "
            f"{torch.get_num_threads()} thread(s) per rank; {wall / args.steps * 1e3:.0f} ms per step on rank 0"
        )
        print(f"{'phase':<46}{'ms/step':>9}{'share':>8}")
        for k, v in rows:
            print(f"{k:<46}{v / args.steps * 1e3:>9.1f}{v / wall:>8.1%}")
        slots = max(state["slots"], 1)
        print(
            f"rows on rank 0: padding {1 - state['tokens'] / slots:.1%} of positions, "
            f"loss on {state['loss'] / slots:.1%}"
        )
        print(
            "per rank: "
            + "; ".join(
                f"rank {r}: compute {g[1] / args.steps * 1e3:.0f} ms, collectives {g[2] / args.steps * 1e3:.0f} ms, "
                f"data {g[3] / args.steps * 1e3:.0f} ms, CPU time {g[4] / args.steps * 1e3:.0f} ms"
                for r, g in enumerate(gathered)
            )
            + " per step"
        )
        out = {
            "world": world,
            "steps": args.steps,
            "ms_per_step": wall / args.steps * 1e3,
            "padding": 1 - state["tokens"] / slots,
            "loss_tokens": state["loss"] / slots,
            "shares": {k: v / wall for k, v in rows},
            "per_rank": [
                {
                    "compute_ms": g[1].item() / args.steps * 1e3,
                    "collectives_ms": g[2].item() / args.steps * 1e3,
                    "data_ms": g[3].item() / args.steps * 1e3,
                    "cpu_ms": g[4].item() / args.steps * 1e3,
                }
                for g in gathered
            ],
        }
        prof = state["prof"]
        if prof is not None:
            events = prof.key_averages()
            top = [e for e in events if e.key != "ProfilerStep*"]
            op_self = sum(e.self_cpu_time_total for e in top) / 1e6
            print(
                f"\nop profile (rank 0): time inside ops {op_self / wall:.1%} of the measured wall time; "
                f"outside any op (Python, dispatch, the loop; upper bound) {1 - op_self / wall:.1%}"
            )
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.ops))
            out["inside_ops"] = op_self / wall
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
