"""Training: config -> model -> deepspeed.initialize -> loop -> checkpoints.

One process:          fusion-train --config configs/debug.yaml data.text=DIR
Several (CPU or GPU): deepspeed --num_gpus 2 --module fusion.train --config configs/debug.yaml data.text=DIR
(on CPU, set DS_ACCELERATOR=cpu; ranks talk over gloo).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from fusion import dist
from fusion.config import Config, ConfigError, deepspeed_config, dump_yaml, finalize, load_config
from fusion.data.mixing import NoDataError
from fusion.faults import Faults
from fusion.guard import NonFiniteError, NonFiniteGuard, innermost_optimizer
from fusion.metrics import (
    DebugLog,
    MetricsLog,
    StepStats,
    draw_plots,
    flops_per_token,
    log_row,
    peak_tflops,
    progress_line,
)
from fusion.schema import MODALITIES
from fusion.step import StepParts, build_optimizers, train_step


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fusion-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of overrides (see configs/); defaults otherwise")
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the DeepSpeed launcher; not for users",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run one step of the config on an accelerator stand-in (meta tensors, a fake "
        "process group: no GPU, no data needed) and print what it checked, the tensor "
        "shapes per part and the memory fusion-plan predicts; exits 1 on what a GPU run "
        "would hit (README: 'Checking the GPU path without a GPU')",
    )
    p.add_argument(
        "--world",
        type=int,
        default=1,
        metavar="N",
        help="with --dry-run: the number of ranks to check the step for (default 1)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, applied after the YAML file (e.g. train.steps=50)",
    )
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
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
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
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.rank()
    )
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


def run_metadata() -> dict:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    import deepspeed

    return {
        "git_sha": sha or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def evaluate_in_training(model, cfg: Config, run_dir: Path, step: int) -> dict:
    """Toy-VQA accuracy of the live model on `data.eval` sets -> metrics `eval/acc/{type}` (first
    set holding that type) and `eval/{set}/acc`, `eval/{set}/blind_acc`; files in eval/step_N/,
    copied to eval/ (SET.json there is always the latest). Collective: the ranks share the
    questions (one reduction per set), rank 0 writes the files; every rank gets the row."""
    import shutil

    from fusion.eval.vqa import evaluate_run

    sets = [s for s in cfg.data.eval.split(",") if s]
    out_dir = run_dir / "eval" / f"step_{step}"
    results = evaluate_run(
        run_dir,
        sets,
        model=model,
        out_dir=out_dir,
        step=step,
        limit=cfg.data.eval_limit or None,
        n_frames=cfg.data.n_frames,
        examples=8,
        progress=False,
        shard=(dist.rank(), dist.world()),
    )
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
        raise ConfigError(
            "config keys 'data.text', 'data.image', 'data.video' are all empty: give at "
            "least one shard directory"
        )
    for m in used:
        try:
            list_shards(getattr(cfg.data, m))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key 'data.{m}': {e}") from None
    for name in filter(None, cfg.data.eval.split(",")):
        if not Path(name).is_dir():
            raise ConfigError(f"config key 'data.eval': no VQA set directory '{name}'")
    if cfg.data.tokenizer not in ("", "byte") and not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(
            f"config key 'data.tokenizer': no tokenizer file '{cfg.data.tokenizer}' "
            "(give 'byte' or a local tokenizer.json)"
        )
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).exists():
        raise ConfigError(f"config key 'train.resume': no checkpoint at {cfg.train.resume}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.world != 1 and not args.dry_run:
        print(
            "fusion-train: error: --world is for --dry-run (the launcher sets the world of a real run)",
            file=sys.stderr,
        )
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
# the run
# ---------------------------------------------------------------------------------------------


def build_parts(cfg: Config, rank: int, world: int, device: torch.device):
    """Tokenizer, model, DeepSpeed engine, routed experts, kernels, guard. -> (StepParts,
    tokenizer, training FLOPs per token)."""
    import deepspeed

    from fusion.data.tokenizer import build_tokenizer
    from fusion.distill import build_distiller
    from fusion.model.fusion import build_model
    from fusion.model.kernels import Kernels
    from fusion.model.moe.streams import CudaStreams
    from fusion.parallel import ExpertParallel

    t = cfg.train
    torch.manual_seed(t.seed)  # same initial weights on every rank
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer)
    model.tokenizer = tokenizer  # for in-training evaluation
    model.question = cfg.data.question  # and how it asks (model.json keeps it)
    model.loss_average = t.loss_average
    model.decoder.checkpoint_every = t.activation_checkpointing
    if t.compile:
        model.decoder.compile_blocks()  # torch.compile each block; compiles at the first step
    fpt = flops_per_token(model, cfg)  # before the experts are sharded over ranks
    bf16 = use_bf16(t.precision, device)
    distiller = build_distiller(cfg, model, device, bf16)  # distill.teacher: frozen, same process
    # routed experts: sharded over model.moe.ep_size ranks and trained beside DeepSpeed (fusion/parallel/)
    experts = ExpertParallel(model, cfg.model.moe.ep_size)
    optimizer, expert_groups = build_optimizers(model, cfg)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=experts.engine_module(), optimizer=optimizer, config=deepspeed_config(cfg, world, bf16)
    )
    experts.attach(engine, expert_groups, t.betas, t.grad_clip, t.optimizer)
    experts.restore_buffer_dtypes()  # the router bias stays fp32 and the load counts float64 in bf16
    # kernel choices, asked of the device once, now that the model is on it in its dtype
    kernels = Kernels.for_device(device, torch.bfloat16 if bf16 else torch.float32)
    streams = CudaStreams(device) if kernels.side_stream else None
    model.use_kernels(kernels, streams)
    # skip updates on NaN/Inf (faults first: its gradient hook must run before the guard's)
    faults = Faults(os.environ.get("FUSION_FAULTS", ""), rank, model)
    guard = NonFiniteGuard(model, [innermost_optimizer(engine.optimizer), experts.optimizer], device, streams)
    parts = StepParts(
        cfg=cfg,
        engine=engine,
        optimizer=optimizer,
        experts=experts,
        guard=guard,
        faults=faults,
        distiller=distiller,
        model=model,
        device=device,
        bf16=bf16,
    )
    return parts, tokenizer, fpt


def resume(parts: StepParts, batches, run_dir: Path, rank: int) -> tuple[int, bool]:
    """Load the checkpoint `train.resume` names (verified), if any. -> (step, resumed)"""
    from fusion.checkpoint import choose_checkpoint, load_checkpoint, set_rng_state

    path = choose_checkpoint(parts.cfg.train.resume, run_dir, rank)  # verified against its manifest
    if path is None:
        return 0, False
    state = load_checkpoint(parts.engine, path, rank, parts.experts)
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    if rank == 0:
        print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"], True


def stop_if_nonfinite(guard: NonFiniteGuard, cfg: Config, run_dir: Path, rank: int, step: int) -> None:
    from fusion.checkpoint import choose_checkpoint

    limit = cfg.train.max_nonfinite
    if limit and guard.in_a_row >= limit:
        last = choose_checkpoint("auto", run_dir, rank)
        raise NonFiniteError(
            f"{guard.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
            f"(config key 'train.max_nonfinite'={limit}); stopped at step {step}. "
            f"The last checkpoint, {last or 'none'}, is intact: lower train.lr, check the data, "
            f"or resume with train.resume=auto"
        )


def train(cfg: Config) -> int:
    from fusion.checkpoint import save_checkpoint
    from fusion.data.mixing import build_batches

    # ---- setup ----
    rank, world, device = init_distributed()
    derived = finalize(cfg, world)
    t, run_dir = cfg.train, Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg, run_metadata()))
    parts, tokenizer, fpt = build_parts(cfg, rank, world, device)
    peak = peak_tflops(cfg, device)
    batches = build_batches(cfg, tokenizer, rank, world)
    step, resumed = resume(parts, batches, run_dir, rank)
    log = MetricsLog(run_dir, rank == 0, start_step=step)
    debug = DebugLog(run_dir, rank, t.debug_log)
    run_load = None  # (L, 3, E) expert load summed over ranks since the start, on the device
    last_saved = step if resumed else -1
    interval: StepStats | None = None  # the steps since the last logged row
    first_step, started = step, time.perf_counter()
    parts.engine.train()

    while step < t.steps:
        # ---- one optimizer step ----
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
            model = parts.model if cfg.model.moe.ep_size == 1 else parts.experts.unsharded_copy()
            eval_row = evaluate_in_training(model, cfg, run_dir, step)

        # ---- log: one row per logged step, figures over the steps since the last row ----
        if step % t.log_every == 0 or step == t.steps or evaluate_now:
            row = log_row(interval.reduce(), interval, step, parts, derived, batches, fpt, peak)
            log.log({**row, **eval_row})
            interval = None
            if rank == 0:
                print(
                    progress_line(row, step, t.steps, time.perf_counter() - started, step - first_step),
                    flush=True,
                )

        # ---- the non-finite guard's record ----
        debug.log(step, batches.take_keys(), parts.model, bool(stats.skipped))
        if stats.skipped and rank == 0:
            print(
                f"step {step}: non-finite loss or gradient, optimizer step skipped "
                f"({parts.guard.in_a_row} in a row, {parts.guard.total} in all)",
                flush=True,
            )
        stop_if_nonfinite(parts.guard, cfg, run_dir, rank, step)

        # ---- checkpoint ----
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
            save_checkpoint(parts.engine, run_dir, step, rank, batches.state_dict(), cfg, parts.experts)
            last_saved = step
            if rank == 0:
                draw_plots(run_dir, run_load, derived.moe_layers, log)

    if last_saved != step and step > 0:
        save_checkpoint(parts.engine, run_dir, step, rank, batches.state_dict(), cfg, parts.experts)
    log.close()
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
