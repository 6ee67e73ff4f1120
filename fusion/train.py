"""Training: config -> model -> deepspeed.initialize -> loop -> checkpoints.

One process:          fusion-train --config configs/debug.yaml data.text=DIR
Several (CPU or GPU): deepspeed --num_gpus 2 --module fusion.train --config configs/debug.yaml data.text=DIR
(on CPU, set DS_ACCELERATOR=cpu; ranks talk over gloo).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion import dist
from fusion.config import (MODALITIES, Config, ConfigError, deepspeed_config, dump_yaml, finalize,
                           load_config)
from fusion.data.mixing import NoDataError
from fusion.faults import Faults
from fusion.guard import NonFiniteError, NonFiniteGuard, innermost_optimizer
from fusion.metrics import DebugLog, MetricsLog, StepStats, router_metrics


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fusion-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of overrides (see configs/); defaults otherwise")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the DeepSpeed launcher; not for users")
    p.add_argument("--dry-run", action="store_true",
                   help="run one step of the config on an accelerator stand-in (meta tensors, a fake "
                        "process group: no GPU, no data needed) and print what it checked, the tensor "
                        "shapes per part and the memory fusion-plan predicts; exits 1 on what a GPU run "
                        "would hit (README: 'Checking the GPU path without a GPU')")
    p.add_argument("--world", type=int, default=1, metavar="N",
                   help="with --dry-run: the number of ranks to check the step for (default 1)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, applied after the YAML file (e.g. train.steps=50)")
    return p.parse_intermixed_args(argv)  # options may follow overrides


# ---------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Use the launcher's environment, or make a world of one for `fusion-train`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() == "cpu":
        release_shm_buffer()
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks on one host share its cores; oversubscribed intra-op threads spin and crawl
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    dist.setup(device)  # the communication device: collectives take tensors there
    return dist.rank(), dist.world(), device


def release_shm_buffer(shm_dir: str = "/dev/shm") -> Path | None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every local rank has mapped it.

    On CPU, DeepSpeed maps a 66 MiB shared-memory file per rank, named after MASTER_ADDR and
    MASTER_PORT, and never removes it: every run on a new port would leave 66 MiB per rank in
    /dev/shm (RAM) until reboot. The peers open each other's files during init_distributed, so
    after a barrier the names are no longer needed; the memory is freed when the last rank exits,
    even if it crashes. Returns the path removed, if any.
    """
    if dist.world() == 1:
        return None
    dist.barrier()
    path = Path(shm_dir) / "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        dist.rank())
    try:
        path.unlink()
    except FileNotFoundError:  # ranks on several hosts, or no shm op: no buffer
        return None
    return path


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def param_groups(model: torch.nn.Module, weight_decay: float, vision_lr_scale: float) -> list[dict]:
    """Dense matrices decay; norms and biases don't; experts get a group of their own; the vision
    tower learns at `model.vision.lr_scale` times the decoder's rate. Frozen parameters stay out."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = name.startswith("vision.")
        if getattr(p, "expert", False):
            key, wd = "experts", weight_decay
        elif p.dim() < 2 or "pos" in name.split(".")[-1]:
            key, wd = "no_decay", 0.0
        else:
            key, wd = "decay", weight_decay
        key = f"vision_{key}" if vision else key
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": wd,
                                        "lr_scale": vision_lr_scale if vision else 1.0})
        group["params"].append(p)
    return list(groups.values())


def grad_l2_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of every gradient of `model`, a device scalar (read at logging)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def lr_at(step: int, cfg) -> float:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """Training FLOPs per token, the count `fusion-plan` reports (formula in fusion/plan.py):
    6 x active matmul parameters + causal attention scores (chunked layers over their chunk)."""
    from fusion.plan import flops_per_token as planned

    return planned(cfg.model, model.vocab_size, cfg.train.seq_len)


KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def run_metadata() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    import deepspeed
    return {"git_sha": sha or None, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "host": platform.node(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def evaluate_in_training(model, cfg: Config, run_dir: Path, step: int) -> dict:
    """Toy-VQA accuracy of the live model on `data.eval` sets -> metrics `eval/acc/{type}` (first
    set holding that type) and `eval/{set}/acc`, `eval/{set}/blind_acc`; files in eval/step_N/,
    copied to eval/ (SET.json there is always the latest). Collective: the ranks share the
    questions (one reduction per set), rank 0 writes the files; every rank gets the row."""
    import shutil

    from fusion.eval.vqa import evaluate_run

    sets = [s for s in cfg.data.eval.split(",") if s]
    out_dir = run_dir / "eval" / f"step_{step}"
    results = evaluate_run(run_dir, sets, model=model, out_dir=out_dir,
                           step=step, limit=cfg.data.eval_limit or None, n_frames=cfg.data.n_frames,
                           examples=8, progress=False, shard=(dist.rank(), dist.world()))
    if dist.rank() == 0:
        for path in out_dir.iterdir():  # eval/SET.json (and SET.png): the latest evaluation
            if path.is_file():
                shutil.copy2(path, run_dir / "eval" / path.name)
    row: dict = {}
    for name, res in results.items():
        row[f"eval/{name}/acc"] = res["overall"]["acc"]
        row[f"eval/{name}/blind_acc"] = res["overall"]["blind_acc"]
        for kind, r in res["by_type"].items():
            row.setdefault(f"eval/acc/{kind}", r["acc"])
    return row


def draw_plots(run_dir: Path, run_load, layer_ids: list[int], log) -> None:
    from fusion.plots import plot_expert_load, plot_losses

    log.flush()
    plot_losses(run_dir / "metrics.jsonl", run_dir / "plots" / "loss.png")
    if run_load is not None:
        plot_expert_load(host_load(run_load), layer_ids, run_dir / "plots" / "expert_load.png")


def host_load(run_load: torch.Tensor):
    """The expert loads summed since the start (L, 3, E), read on the host for the heatmap at a
    checkpoint boundary."""
    return dist.fetch(run_load, "checkpoint: the expert-load heatmap").numpy()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def dry_run_main(cfg: Config, args) -> int:
    """`fusion-train --dry-run`: the report on stdout; 1 with one line saying what a GPU run would
    hit (and where) otherwise."""
    from fusion.dryrun import DryRunError, dry_run, explain

    name = args.config or "the default config"
    if args.overrides:
        name += " " + " ".join(args.overrides)
    try:
        report = dry_run(cfg, args.world, name)
    except DryRunError as e:
        print(f"fusion-train: dry run: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"fusion-train: dry run: {explain(e)}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


def check_inputs(cfg: Config) -> None:
    """The files a run reads exist, checked before any process group or model is built: one
    ConfigError naming the key."""
    from fusion.data.shards import list_shards

    used = [m for m in MODALITIES if getattr(cfg.data, m)]
    if not used:
        raise ConfigError("config keys 'data.text', 'data.image', 'data.video' are all empty: give at "
                          "least one shard directory")
    for m in used:
        try:
            list_shards(getattr(cfg.data, m))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key 'data.{m}': {e}") from None
    for name in filter(None, cfg.data.eval.split(",")):
        if not Path(name).is_dir():
            raise ConfigError(f"config key 'data.eval': no VQA set directory '{name}'")
    if cfg.data.tokenizer not in ("", "byte") and not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"config key 'data.tokenizer': no tokenizer file '{cfg.data.tokenizer}' "
                          "(give 'byte' or a local tokenizer.json)")
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).exists():
        raise ConfigError(f"config key 'train.resume': no checkpoint at {cfg.train.resume}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.world != 1 and not args.dry_run:
        print("fusion-train: error: --world is for --dry-run (the launcher sets the world of a real run)",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run_main(cfg, args)
        check_inputs(cfg)
    except ConfigError as e:
        print(f"fusion-train: error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"fusion-train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"fusion-train: error: {e}", file=sys.stderr)
        return 1
    except NoDataError as e:
        print(f"fusion-train: error: {NoDataError.one_line(e)}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# one optimizer step
# ---------------------------------------------------------------------------------------------


@dataclass
class StepParts:
    """What an optimizer step works with. `engine` is DeepSpeed's (or the dry run's stand-in with
    the same calls: __call__, backward, is_gradient_accumulation_boundary, step,
    get_global_grad_norm, zero_optimization_stage, bfloat16_enabled, module)."""

    cfg: Config
    engine: Any
    optimizer: torch.optim.Optimizer   # the non-expert parameters' (its groups take the lr)
    experts: Any                       # fusion.parallel.ExpertParallel
    guard: NonFiniteGuard
    faults: Faults
    distiller: Any                     # fusion.distill.Distiller or None
    model: torch.nn.Module
    device: torch.device
    bf16: bool


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch on the compute device; pinned host memory lets the copy overlap compute."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def train_step(p: StepParts, batches, step: int) -> StepStats:
    """Optimizer step `step` (counted from 0): `grad_accum` micro-steps of forward and backward,
    the expert gradients' reduction, the non-finite decision, DeepSpeed's and the experts' update,
    and the routers' balancing. Host reads only at the accumulation boundary (the skip decision;
    DeepSpeed's own) and, under expert parallelism, the all-to-all's row counts."""
    cfg, t = p.cfg, p.cfg.train
    lr = lr_at(step, cfg)
    for group in [*p.optimizer.param_groups, *p.experts.param_groups]:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    stats = StepStats.zeros(p.device)
    p.faults.step = step + 1
    skipped, grad_norm = False, None
    for _ in range(t.grad_accum):
        batch = to_device(next(batches), p.device)
        out = p.engine(batch["input_ids"], labels=batch["labels"], positions=batch["positions"],
                       doc_ids=batch["doc_ids"], sample_modality=batch["sample_modality"],
                       images=batch.get("images"), videos=batch.get("videos"),
                       return_logits=p.distiller is not None)
        loss = p.faults.loss(out.loss if p.distiller is None else p.distiller.mix(out, batch))
        p.guard.observe_loss(loss)
        p.engine.backward(loss)
        stats.add_micro(out, batch)
        boundary = p.engine.is_gradient_accumulation_boundary()
        if boundary:
            p.experts.reduce_grads()  # expert grads over their expert-data-parallel group
            if t.zero_stage == 0 and not p.bf16 and not p.experts.names:
                # DeepSpeed reports no norm for plain fp32 data parallel; grads are reduced by now
                grad_norm = grad_l2_norm(p.model)
            skipped = p.guard.decide()  # all-reduced: every rank skips alike
        with p.guard.suppress(boundary and skipped):  # no update; DeepSpeed's counters still move
            p.engine.step()
            if boundary and p.experts.names:
                grad_norm = p.experts.step()  # clipped with, and returning, the global norm
    p.guard.count(skipped)
    stats.load = balance_routers(p.model.moe_layers, skipped)
    stats.steps, stats.skipped = 1, int(skipped)
    stats.lr, stats.grad_norm = lr, grad_norm
    return stats


def balance_routers(moe_layers, skipped: bool) -> torch.Tensor | None:
    """Expert loads of this step summed over ranks (one all-reduce, on the device), and the
    aux-loss-free bias update from them. -> (L, 3, E) float64, or None without MoE layers."""
    if not moe_layers:
        return None
    load = torch.stack([layer.take_load() for layer in moe_layers]).to(dist.comm_device())  # (L, 3, E)
    dist.all_reduce(load)
    if not skipped:  # a skipped step leaves the router biases as they were too
        for layer, layer_load in zip(moe_layers, load):
            layer.update_bias(layer_load.sum(0))
    return load


def log_row(reduced: dict, stats: StepStats, step: int, parts: StepParts, derived, batches,
            fpt: float, peak: float | None) -> dict:
    """The metrics.jsonl row of a logging interval (figures already reduced over ranks)."""
    n, seconds = stats.steps, max(stats.seconds, 1e-9)
    tokens = derived.tokens_per_step * n
    count = reduced["loss_count"]
    row = {"step": step, "loss": float(reduced["loss_sum"].sum() / count.sum().clamp(min=1)),
           "lr": stats.lr}
    for i, name in enumerate(MODALITIES):
        if count[i] > 0:
            row[f"loss/{name}"] = float(reduced["loss_sum"][i] / count[i])
        row[f"tokens/{name}"] = round(float(reduced["tokens"][i]) / n)  # per step, all ranks
    # of every row position trained on: padding, and positions whose target carries the loss
    row["data/padding"] = 1.0 - float(reduced["tokens"].sum()) / tokens
    row["data/loss_tokens"] = float(count.sum()) / tokens
    grad_norm = stats.grad_norm
    if grad_norm is None:
        grad_norm = parts.engine.get_global_grad_norm()
    if isinstance(grad_norm, torch.Tensor):
        grad_norm = dist.fetch_float(grad_norm, "logging: grad_norm")
    row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    row["tokens_per_s"] = tokens / seconds
    row["mfu"] = (fpt * tokens / seconds / (peak * 1e12 * dist.world())) if peak else None
    if parts.device.type == "cuda":  # this rank's peak since start (fusion-plan predicts it)
        row["mem/peak_gib"] = torch.cuda.max_memory_allocated(parts.device) / 2 ** 30
    row["aux_loss"], row["z_loss"] = reduced["aux"], reduced["z"]
    if parts.distiller is not None:
        row.update(parts.distiller.take_metrics())  # distill/kl (all ranks: it all-reduces)
    row["nonfinite_skips"] = parts.guard.total
    if reduced["load"] is not None:
        row.update(router_metrics(reduced["load"]))
    for m, share in batches.shares().items():
        row[f"data/share/{m}"] = share
        row[f"data/target/{m}"] = batches.probs[m]
    for reason, count in batches.failures().items():
        row[f"data/failed/{reason}"] = count
    return row


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def train(cfg: Config) -> int:
    import deepspeed

    from fusion.checkpoint import choose_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
    from fusion.data.mixing import build_batches
    from fusion.data.tokenizer import build_tokenizer
    from fusion.distill import build_distiller
    from fusion.model.fusion import build_model
    from fusion.model.kernels import Kernels
    from fusion.model.streams import CudaStreams
    from fusion.parallel import ExpertParallel

    rank, world, device = init_distributed()
    derived = finalize(cfg, world)
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, run_metadata()))
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    # ---- model, optimizer, engine ----
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer)
    model.tokenizer = tokenizer  # for in-training evaluation
    model.decoder.checkpoint_every = cfg.train.activation_checkpointing
    if cfg.train.compile:
        model.decoder.compile_blocks()  # torch.compile each block; compiles at the first step
    fpt = flops_per_token(model, cfg)  # before the experts are sharded over ranks
    bf16 = use_bf16(cfg.train.precision, device)
    distiller = build_distiller(cfg, model, device, bf16)  # distill.teacher: frozen, same process
    t = cfg.train
    # routed experts: sharded over model.moe.ep_size ranks and trained beside DeepSpeed (fusion/parallel.py)
    experts = ExpertParallel(model, cfg.model.moe.ep_size)
    groups = param_groups(model, t.weight_decay, cfg.model.vision.lr_scale)
    optimizer = torch.optim.AdamW([g for g in groups if g["name"] != "experts"],
                                  lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    ds_config = deepspeed_config(cfg, world, bf16)
    engine, optimizer, _, _ = deepspeed.initialize(model=experts.engine_module(), optimizer=optimizer,
                                                   config=ds_config)
    experts.attach(engine, [g for g in groups if g["name"] == "experts"], t.betas, t.grad_clip)
    experts.restore_buffer_dtypes()  # the router bias stays fp32 and the load counts float64 in bf16
    # kernel choices, asked of the device once, now that the model is on it in its dtype
    kernels = Kernels.for_device(device, torch.bfloat16 if bf16 else torch.float32)
    streams = CudaStreams(device) if kernels.side_stream else None
    model.use_kernels(kernels, streams)
    peak = peak_tflops(cfg, device)
    # skip updates on NaN/Inf (faults first: its gradient hook must run before the guard's)
    faults = Faults(os.environ.get("FUSION_FAULTS", ""), rank, model)
    guard = NonFiniteGuard(model, [innermost_optimizer(engine.optimizer), experts.optimizer], device,
                           streams)
    parts = StepParts(cfg=cfg, engine=engine, optimizer=optimizer, experts=experts, guard=guard,
                      faults=faults, distiller=distiller, model=model, device=device, bf16=bf16)

    # ---- data ----
    batches = build_batches(cfg, tokenizer, rank, world)

    # ---- resume ----
    step = 0
    resume_path = choose_checkpoint(t.resume, run_dir, rank)  # verified against its manifest
    if resume_path is not None:
        state = load_checkpoint(engine, resume_path, rank, experts)
        step = state["step"]
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if rank == 0:
            print(f"resumed from {resume_path} at step {step}", flush=True)

    log = MetricsLog(run_dir, rank == 0, start_step=step)
    debug = DebugLog(run_dir, rank, t.debug_log)
    run_load = None  # (L, 3, E) expert load summed over ranks since the start, on the device
    last_saved = step if resume_path is not None else -1
    interval: StepStats | None = None  # the steps since the last logged row
    first_step, started = step, time.perf_counter()
    engine.train()
    while step < t.steps:
        t0 = time.perf_counter()
        stats = train_step(parts, batches, step)
        step += 1
        if stats.load is not None:
            run_load = stats.load if run_load is None else run_load + stats.load
        stats.seconds = time.perf_counter() - t0
        interval = stats if interval is None else interval.merge(stats)

        # ---- evaluate (the ranks share the questions; rank 0 writes the files) ----
        eval_row = {}
        evaluate_now = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
        if evaluate_now:
            # sharded experts: every rank gathers them and scores with an unsharded copy
            eval_model = model if cfg.model.moe.ep_size == 1 else experts.unsharded_copy()
            eval_row = evaluate_in_training(eval_model, cfg, run_dir, step)

        # ---- log: one row per logged step, figures over the steps since the last row ----
        if step % t.log_every == 0 or step == t.steps or evaluate_now:
            row = log_row(interval.reduce(), interval, step, parts, derived, batches, fpt, peak)
            log.log({**row, **eval_row})
            interval = None
            if rank == 0:
                elapsed = time.perf_counter() - started
                eta = elapsed / (step - first_step) * (t.steps - step)
                print(f"step {step}/{t.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                      f"tok/s {row['tokens_per_s']:.0f} elapsed {format_duration(elapsed)} "
                      f"eta {format_duration(eta)}", flush=True)

        debug.log(step, batches.take_keys(), model, bool(stats.skipped))
        if stats.skipped and rank == 0:
            print(f"step {step}: non-finite loss or gradient, optimizer step skipped "
                  f"({guard.in_a_row} in a row, {guard.total} in all)", flush=True)
        if t.max_nonfinite and guard.in_a_row >= t.max_nonfinite:
            last = choose_checkpoint("auto", run_dir, rank)
            raise NonFiniteError(
                f"{guard.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(config key 'train.max_nonfinite'={t.max_nonfinite}); stopped at step {step}. "
                f"The last checkpoint, {last or 'none'}, is intact: lower train.lr, check the data, "
                f"or resume with train.resume=auto")

        # ---- checkpoint ----
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
            save_checkpoint(engine, run_dir, step, rank, batches.state_dict(), cfg, experts)
            last_saved = step
            if rank == 0:
                draw_plots(run_dir, run_load, derived.moe_layers, log)

    if last_saved != step and step > 0:
        save_checkpoint(engine, run_dir, step, rank, batches.state_dict(), cfg, experts)
    log.close()
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
