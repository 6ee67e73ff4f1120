"""Training: config -> model -> deepspeed.initialize -> loop -> checkpoints.

One process:          fusion-train --config configs/debug.yaml data.text=DIR
Several (CPU or GPU): deepspeed --num_gpus 2 --module fusion.train --config configs/debug.yaml data.text=DIR
(on CPU, set DS_ACCELERATOR=cpu; ranks talk over gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from fusion.config import (MODALITIES, Config, ConfigError, deepspeed_config, dump_yaml, finalize,
                           load_config)
from fusion.data.mixing import NoDataError


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fusion-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of overrides (see configs/); defaults otherwise")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the DeepSpeed launcher; not for users")
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
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def release_shm_buffer(shm_dir: str = "/dev/shm") -> Path | None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every local rank has mapped it.

    On CPU, DeepSpeed maps a 66 MiB shared-memory file per rank, named after MASTER_ADDR and
    MASTER_PORT, and never removes it: every run on a new port would leave 66 MiB per rank in
    /dev/shm (RAM) until reboot. The peers open each other's files during init_distributed, so
    after a barrier the names are no longer needed; the memory is freed when the last rank exits,
    even if it crashes. Returns the path removed, if any.
    """
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    dist.barrier()
    path = Path(shm_dir) / "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        dist.get_rank())
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


def grad_l2_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


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


def router_metrics(load: torch.Tensor) -> dict:
    """load (L, 3, E) routed assignments of one step, summed over ranks.
    max_load: the largest expert load over the mean load of its layer; dead: experts with none."""
    out = {}
    per_expert = load.sum(1)  # (L, E)
    mean = per_expert.mean(1, keepdim=True).clamp(min=1e-9)
    out["router/max_load"] = float((per_expert / mean).max())
    out["router/dead_experts"] = int((per_expert == 0).sum())
    for i, name in enumerate(MODALITIES):
        mod = load[:, i]  # (L, E)
        if mod.sum() > 0:
            mod_mean = mod.mean(1, keepdim=True).clamp(min=1e-9)
            out[f"router/max_load/{name}"] = float((mod / mod_mean).max())
    return out


def evaluate_in_training(model, cfg: Config, run_dir: Path, step: int) -> dict:
    """Toy-VQA accuracy of the live model on `data.eval` sets -> metrics `eval/acc/{type}` (first
    set holding that type) and `eval/{set}/acc`, `eval/{set}/blind_acc`; files in eval/step_N/,
    copied to eval/ (SET.json there is always the latest)."""
    from fusion.eval.vqa import evaluate_run

    import shutil

    sets = [s for s in cfg.data.eval.split(",") if s]
    out_dir = run_dir / "eval" / f"step_{step}"
    results = evaluate_run(run_dir, sets, model=model, out_dir=out_dir,
                           step=step, limit=cfg.data.eval_limit or None, n_frames=cfg.data.n_frames,
                           examples=8, progress=False)
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
        plot_expert_load(run_load.numpy(), layer_ids, run_dir / "plots" / "expert_load.png")


# ---------------------------------------------------------------------------------------------
# non-finite guard, fault injection and the per-rank debug log (issue #8)
# ---------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def innermost_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16): the one whose step() updates."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class NonFiniteGuard:
    """Skips the optimizer update of a step whose loss or gradients are NaN/Inf on any rank.

    Gradients are watched by a hook on every parameter as backward produces them (before DeepSpeed
    reduces or partitions them, whatever the ZeRO stage): the squared norms are summed on this rank,
    so the check costs no extra pass and no sync until `decide()`, which all-reduces one flag so
    every rank skips alike. A skipped step still goes through `engine.step()` with the torch
    optimizers' `step` made a no-op: DeepSpeed zeroes the gradients and advances its counters, while
    the weights, the AdamW moments and AdamW's own step count stay as they were.
    """

    def __init__(self, model: torch.nn.Module, optimizers: list, device: torch.device):
        self.optimizers = [o for o in optimizers if o is not None]
        self.device = device
        self.total = 0         # skipped steps since this process started
        self.in_a_row = 0
        self._reset()
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._watch)

    def _reset(self) -> None:
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        self.grad_sq = torch.zeros((), dtype=torch.float32, device=self.device)

    def _watch(self, grad: torch.Tensor) -> None:
        self.grad_sq = self.grad_sq + torch.linalg.vector_norm(grad.detach(), dtype=torch.float32) ** 2

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss = self.bad_loss | ~torch.isfinite(loss.detach())

    def decide(self) -> bool:
        """Collective, at the accumulation boundary: True when any rank saw a non-finite loss or
        gradient since the last decision."""
        import torch.distributed as dist

        flag = (self.bad_loss | ~torch.isfinite(self.grad_sq)).to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._reset()
        return bool(flag.item())

    def count(self, skipped: bool) -> None:
        self.total += int(skipped)
        self.in_a_row = self.in_a_row + 1 if skipped else 0

    @contextlib.contextmanager
    def suppress(self, active: bool):
        """Within the block, the torch optimizers' step() does nothing (when `active`)."""
        if active:
            for opt in self.optimizers:
                opt.step = lambda *args, **kwargs: None  # instance attribute shadows the method
        try:
            yield
        finally:
            if active:
                for opt in self.optimizers:
                    del opt.step


class Faults:
    """Test-only fault injection from the environment: FUSION_FAULTS="loss@3,grad@5:1,router@7"
    makes step 3's loss NaN, one gradient of step 5 NaN on rank 1 only, and the router logits
    (and gates) of step 7 NaN; without `:rank`, on every rank. Steps count from 1."""

    KINDS = ("loss", "grad", "router")

    def __init__(self, spec: str, rank: int, model: torch.nn.Module):
        self.at: dict[str, set[int]] = {k: set() for k in self.KINDS}
        self.step = 0
        for item in filter(None, (s.strip() for s in spec.split(","))):
            m = re.fullmatch(r"(loss|grad|router)@(\d+)(?::(\d+))?", item)
            if m is None:
                raise ValueError(f"FUSION_FAULTS: cannot read '{item}' (expected e.g. loss@3 or grad@5:1)")
            if m.group(3) is None or int(m.group(3)) == rank:
                self.at[m.group(1)].add(int(m.group(2)))
        if self.at["grad"]:
            # registered before NonFiniteGuard's hooks, so the guard sees the injected NaN
            next(p for p in model.parameters() if p.requires_grad).register_hook(self._grad)
        if self.at["router"]:
            for layer in model.moe_layers:
                layer.router.register_forward_hook(self._router)

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.step in self.at["loss"] else loss

    def _grad(self, grad: torch.Tensor):
        return grad * float("nan") if self.step in self.at["grad"] else None

    def _router(self, module, inputs, output):
        if self.step not in self.at["router"]:
            return None
        topk_idx, gates, logits = output
        return topk_idx, gates * float("nan"), logits * float("nan")


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter and buffer of this rank's model, in float64 (equal on every rank of
    a data-parallel run; unchanged by a skipped step)."""
    with torch.no_grad():
        return float(sum(v.detach().double().sum() for v in model.state_dict().values()
                         if v.is_floating_point()))


class DebugLog:
    """`train.debug_log`: RUN/debug/rank{r}.jsonl, one line per step with the keys of the samples
    this rank consumed and a checksum of its weights (for checking exact resume and that the ranks
    agree). A resumed run appends: for a step written twice, the last line is the one that counts."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.file = None
        if enabled:
            (run_dir / "debug").mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "debug" / f"rank{rank}.jsonl", "a")

    def log(self, step: int, keys: list[str], model: torch.nn.Module, skipped: bool) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "keys": keys, "skipped": skipped,
                                    "weights": weights_checksum(model)}) + "\n")
        self.file.flush()


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0; nothing elsewhere.

    A run that starts at `start_step` (0, or the step it resumed from) repeats the steps after it,
    so rows logged past it by an earlier attempt move to metrics.replaced.jsonl (appended; nothing
    is lost) and TensorBoard purges its events past it: metrics.jsonl keeps one row per step.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / "metrics.jsonl"
        if path.is_file():
            keep, replaced = [], []
            for line in path.read_text().splitlines(keepends=True):
                try:
                    row_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    row_step = None  # a line cut short by a crash
                (keep if isinstance(row_step, int) and row_step <= start_step else replaced).append(line)
            if replaced:
                with open(run_dir / "metrics.replaced.jsonl", "a") as out:
                    out.writelines(l if l.endswith("\n") else l + "\n" for l in replaced)
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(keep))
                os.replace(tmp, path)
        self.file = open(path, "a")
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(key, value, row["step"])

    def flush(self) -> None:
        if self.enabled:
            self.file.flush()
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


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
    try:
        cfg = load_config(args.config, args.overrides)
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


def train(cfg: Config) -> int:
    import deepspeed
    import torch.distributed as dist

    from fusion.checkpoint import choose_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
    from fusion.data.mixing import build_batches
    from fusion.data.tokenizer import build_tokenizer
    from fusion.model.fusion import build_model
    from fusion.distill import build_distiller
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
    distiller = build_distiller(cfg, model, device, bf16)  # distill.teacher: frozen, same process (issue #9)
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
    moe_layers = model.moe_layers
    peak = peak_tflops(cfg, device)
    # skip updates on NaN/Inf (faults first: its gradient hook must run before the guard's)
    faults = Faults(os.environ.get("FUSION_FAULTS", ""), rank, model)
    guard = NonFiniteGuard(model, [innermost_optimizer(engine.optimizer), experts.optimizer], device)

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
    run_load = None  # (L, 3, E) expert load summed over ranks, since the last heatmap
    last_saved = step if resume_path is not None else -1
    # sums over the steps since the last logged row: a row reports the whole interval
    interval = torch.zeros(12, dtype=torch.float64)
    interval_steps, interval_seconds, interval_load = 0, 0.0, None
    engine.train()
    while step < t.steps:
        t0 = time.perf_counter()
        tokens_before = dict(batches.tokens)
        lr = lr_at(step, cfg)
        for group in [*optimizer.param_groups, *experts.param_groups]:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        # ---- micro-steps: forward, backward, (DeepSpeed steps at the accumulation boundary) ----
        # loss_sum[3], loss_count[3], aux, z, micro-steps, non-padding tokens[3] (per modality)
        stats = torch.zeros(12, dtype=torch.float64)
        grad_norm, skipped = None, False
        faults.step = step + 1
        for _ in range(t.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            out = engine(batch["input_ids"], labels=batch["labels"], positions=batch["positions"],
                         doc_ids=batch["doc_ids"], sample_modality=batch["sample_modality"],
                         images=batch.get("images"), videos=batch.get("videos"),
                         return_logits=distiller is not None)
            loss = faults.loss(out.loss if distiller is None else distiller.mix(out, batch))
            guard.observe_loss(loss)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                experts.reduce_grads()  # expert grads over their expert-data-parallel group
                if t.zero_stage == 0 and not bf16 and not experts.names:
                    # DeepSpeed reports no norm for plain fp32 data parallel; grads are reduced by now
                    grad_norm = grad_l2_norm(model)
            if boundary:
                skipped = guard.decide()  # all-reduced: every rank skips alike
            with guard.suppress(boundary and skipped):  # no update; DeepSpeed's counters still move
                engine.step()
                if boundary and experts.names:
                    grad_norm = experts.step()  # clipped with, and returning, the global norm
            stats[0:3] += out.loss_sum.double().cpu()
            stats[3:6] += out.loss_count.double().cpu()
            stats[6] += float(out.aux_loss)
            stats[7] += float(out.z_loss)
            stats[8] += 1
        step += 1
        guard.count(skipped)

        # ---- router balancing: expert loads summed over ranks; aux-free bias update ----
        if moe_layers:
            load = torch.stack([layer.take_load() for layer in moe_layers]).to(torch.float64)  # (L, 3, E)
            dist.all_reduce(load)
            for layer, layer_load in zip(moe_layers, load):
                if not skipped:  # a skipped step leaves the router biases as they were too
                    layer.update_bias(layer_load.sum(0).to(device))
            run_load = load if run_load is None else run_load + load
            interval_load = load if interval_load is None else interval_load + load
        for i, name in enumerate(MODALITIES):
            stats[9 + i] = batches.tokens[name] - tokens_before[name]
        dist.all_reduce(stats)
        interval += stats
        interval_steps += 1
        interval_seconds += time.perf_counter() - t0

        # ---- evaluate (rank 0 scores the VQA sets; the others wait at the barrier) ----
        eval_row = {}
        evaluate_now = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
        if evaluate_now:
            # sharded experts: every rank gathers them, rank 0 scores an unsharded copy
            eval_model = model if cfg.model.moe.ep_size == 1 else experts.unsharded_copy()
            if rank == 0:
                eval_row = evaluate_in_training(eval_model, cfg, run_dir, step)
            dist.barrier()

        # ---- log: one row per logged step, averages over the steps since the last row ----
        if step % t.log_every == 0 or step == t.steps or evaluate_now:
            n, seconds = interval_steps, interval_seconds
            tokens = derived.tokens_per_step * n
            row = {"step": step, "loss": float(interval[0:3].sum() / interval[3:6].sum().clamp(min=1)),
                   "lr": lr}
            for i, name in enumerate(MODALITIES):
                if interval[3 + i] > 0:
                    row[f"loss/{name}"] = float(interval[i] / interval[3 + i])
                row[f"tokens/{name}"] = round(float(interval[9 + i]) / n)  # per step, all ranks
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
            row["tokens_per_s"] = tokens / seconds
            row["mfu"] = (fpt * tokens / seconds / (peak * 1e12 * world)) if peak else None
            if device.type == "cuda":  # this rank's peak since start (fusion-plan predicts it)
                row["mem/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            row["aux_loss"] = float(interval[6] / interval[8])
            row["z_loss"] = float(interval[7] / interval[8])
            if distiller is not None:
                row.update(distiller.take_metrics())  # distill/kl (all ranks: it all-reduces)
            row["nonfinite_skips"] = guard.total
            if moe_layers:
                row.update(router_metrics(interval_load))
            for m, share in batches.shares().items():
                row[f"data/share/{m}"] = share
                row[f"data/target/{m}"] = batches.probs[m]
            for reason, count in batches.failures().items():
                row[f"data/failed/{reason}"] = count
            log.log({**row, **eval_row})
            interval.zero_()
            interval_steps, interval_seconds, interval_load = 0, 0.0, None
            if rank == 0:
                print(f"step {step}/{t.steps} loss {row['loss']:.4f} lr {lr:.2e} "
                      f"tok/s {row['tokens_per_s']:.0f}", flush=True)

        debug.log(step, batches.take_keys(), model, skipped)
        if skipped and rank == 0:
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
