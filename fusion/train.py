"""Training: config -> model -> deepspeed.initialize -> loop -> checkpoints.

One process:          fusion-train --config configs/debug.yaml data.text=DIR
Several (CPU or GPU): deepspeed --num_gpus 2 --module fusion.train --config configs/debug.yaml data.text=DIR
(on CPU, set DS_ACCELERATOR=cpu; ranks talk over gloo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from fusion.config import (MODALITIES, Config, ConfigError, deepspeed_config, dump_yaml, finalize,
                           load_config)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fusion-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of overrides (see configs/); defaults otherwise")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the DeepSpeed launcher; not for users")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, applied after the YAML file (e.g. train.steps=50)")
    return p.parse_args(argv)


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
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks on one host share its cores; oversubscribed intra-op threads spin and crawl
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


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
    set holding that type) and `eval/{set}/acc`, `eval/{set}/blind_acc`; files in eval/step_N/."""
    from fusion.eval.vqa import evaluate_run

    sets = [s for s in cfg.data.eval.split(",") if s]
    results = evaluate_run(run_dir, sets, model=model, out_dir=run_dir / "eval" / f"step_{step}",
                           step=step, limit=cfg.data.eval_limit or None, n_frames=cfg.data.n_frames,
                           examples=8, progress=False)
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


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0; nothing elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))

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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fusion-train: error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"fusion-train: error: {e}", file=sys.stderr)
        return 2


def train(cfg: Config) -> int:
    import deepspeed
    import torch.distributed as dist

    from fusion.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_rng_state
    from fusion.data.mixing import build_batches
    from fusion.data.tokenizer import build_tokenizer
    from fusion.model.fusion import build_model
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
    fpt = flops_per_token(model, cfg)  # before the experts are sharded over ranks
    bf16 = use_bf16(cfg.train.precision, device)
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

    # ---- data ----
    batches = build_batches(cfg, tokenizer, rank, world)

    # ---- resume ----
    step = 0
    resume_path = resolve_resume(t.resume, run_dir)
    if resume_path is not None:
        state = load_checkpoint(engine, resume_path, rank, experts)
        step = state["step"]
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if rank == 0:
            print(f"resumed from {resume_path} at step {step}", flush=True)

    log = MetricsLog(run_dir, rank == 0)
    run_load = None  # (L, 3, E) expert load summed over ranks, since the last heatmap
    last_saved = step if resume_path is not None else -1
    engine.train()
    while step < t.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in [*optimizer.param_groups, *experts.param_groups]:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        # ---- micro-steps: forward, backward, (DeepSpeed steps at the accumulation boundary) ----
        stats = torch.zeros(9, dtype=torch.float64)  # loss_sum[3], loss_count[3], aux, z, micro
        grad_norm = None
        for _ in range(t.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            out = engine(batch["input_ids"], labels=batch["labels"], positions=batch["positions"],
                         doc_ids=batch["doc_ids"], sample_modality=batch["sample_modality"],
                         images=batch.get("images"), videos=batch.get("videos"))
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                experts.reduce_grads()  # expert grads over their expert-data-parallel group
                if t.zero_stage == 0 and not bf16 and not experts.names:
                    # DeepSpeed reports no norm for plain fp32 data parallel; grads are reduced by now
                    grad_norm = grad_l2_norm(model)
            engine.step()
            if boundary and experts.names:
                grad_norm = experts.step()  # clipped with, and returning, the global norm
            stats[0:3] += out.loss_sum.double().cpu()
            stats[3:6] += out.loss_count.double().cpu()
            stats[6] += float(out.aux_loss)
            stats[7] += float(out.z_loss)
            stats[8] += 1
        step += 1

        # ---- router balancing: expert loads summed over ranks; aux-free bias update ----
        if moe_layers:
            load = torch.stack([layer.take_load() for layer in moe_layers]).to(torch.float64)  # (L, 3, E)
            dist.all_reduce(load)
            for layer, layer_load in zip(moe_layers, load):
                layer.update_bias(layer_load.sum(0).to(device))
            run_load = load if run_load is None else run_load + load
        dist.all_reduce(stats)

        # ---- log ----
        if step % t.log_every == 0 or step == t.steps:
            elapsed = time.perf_counter() - t0
            tokens = derived.tokens_per_step
            row = {"step": step, "loss": float(stats[0:3].sum() / stats[3:6].sum().clamp(min=1)),
                   "lr": lr}
            for i, name in enumerate(MODALITIES):
                if stats[3 + i] > 0:
                    row[f"loss/{name}"] = float(stats[i] / stats[3 + i])
                row[f"tokens/{name}"] = int(stats[3 + i])
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
            row["tokens_per_s"] = tokens / elapsed
            row["mfu"] = (fpt * tokens / elapsed / (peak * 1e12 * world)) if peak else None
            row["aux_loss"] = float(stats[6] / stats[8])
            row["z_loss"] = float(stats[7] / stats[8])
            if moe_layers:
                row.update(router_metrics(load))
            for m, share in batches.shares().items():
                row[f"data/share/{m}"] = share
                row[f"data/target/{m}"] = batches.probs[m]
            for reason, n in batches.failures().items():
                row[f"data/failed/{reason}"] = n
            log.log(row)
            if rank == 0:
                print(f"step {step}/{t.steps} loss {row['loss']:.4f} lr {lr:.2e} "
                      f"tok/s {row['tokens_per_s']:.0f}", flush=True)

        # ---- evaluate (rank 0 scores the VQA sets; the others wait at the next collective) ----
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            # sharded experts: every rank gathers them, rank 0 scores an unsharded copy
            eval_model = model if cfg.model.moe.ep_size == 1 else experts.unsharded_copy()
            if rank == 0:
                log.log({"step": step, **evaluate_in_training(eval_model, cfg, run_dir, step)})
            dist.barrier()

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
